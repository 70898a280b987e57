import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.cache import cache_shapes, init_cache
from jaxgen.config import load_config, preset_names
from jaxgen.model import forward as _forward, param_shapes, stack_layers, unstack_layers

forward = jax.jit(_forward, static_argnames="cfg")  # eager dispatch of every op is slow


def full_logits(model, tokens):
    """Reference: one forward pass over the whole sequence from an empty cache. tokens [B, T]."""
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    return forward(model.params, tokens, pos, init_cache(model.cfg, B, T), model.cfg)[0]


def test_cached_decode_equals_full_forward(tiny_model):
    cfg = tiny_model.cfg
    B, T = 3, 23  # longer than the 5-token window: the local rings wrap several times
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    ref = full_logits(tiny_model, tokens)
    cache = init_cache(cfg, B, 32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    outs = []
    for a, b in [(0, 7)] + [(t, t + 1) for t in range(7, T)]:  # prefill, then one token at a time
        lg, cache = forward(tiny_model.params, tokens[:, a:b], pos[:, a:b], cache, cfg)
        outs.append(lg)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), ref, atol=5e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.lengths, [T] * B)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3])
def test_unembedding_forms_equal_numpy(tiny_model, dtype, rows):
    """The unembedding contracts D of the [V, D] table in a form chosen by row count and dtype
    (one row: table @ h in float32, two padded rows in bfloat16): each is h @ table.T in float32."""
    from jaxgen.model import _unembed_dot

    table = tiny_model.params.embed.astype(dtype)  # [V, D]
    h = jax.random.normal(jax.random.key(rows), (rows, table.shape[1])).astype(dtype)
    got = jax.jit(_unembed_dot)(h, table)
    assert got.shape == (rows, table.shape[0]) and got.dtype == jnp.float32
    want = np.asarray(h, np.float32) @ np.asarray(table, np.float32).T
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_per_layer_params_equal_stacked(tiny_model):
    """The unrolled decode layout (one LayerParams per layer) computes what the scan over stacked
    layers computes: prefill then cached decode, local rings wrapping; stack_layers inverts it."""
    cfg = tiny_model.cfg
    per_layer = unstack_layers(tiny_model.params)
    assert isinstance(per_layer.layers, tuple) and len(per_layer.layers) == cfg.n_layers
    assert per_layer.layers[1].wq.shape == tiny_model.params.layers.wq.shape[1:]
    chex.assert_trees_all_equal(stack_layers(per_layer), tiny_model.params)
    B, T = 2, 15
    tokens = jax.random.randint(jax.random.key(4), (B, T), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    outs = {}
    for name, params in (("stacked", tiny_model.params), ("per_layer", per_layer)):
        cache, got = init_cache(cfg, B, 16), []
        for a, b in [(0, 6)] + [(t, t + 1) for t in range(6, T)]:
            lg, cache = forward(params, tokens[:, a:b], pos[:, a:b], cache, cfg)
            got.append(lg)
        outs[name] = (jnp.concatenate(got, 1), cache)
    np.testing.assert_allclose(outs["per_layer"][0], outs["stacked"][0], atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(outs["per_layer"][1], outs["stacked"][1], atol=2e-5, rtol=0)


def test_chunked_prefill_equals_full_forward(tiny_model):
    cfg = tiny_model.cfg
    tokens = jax.random.randint(jax.random.key(2), (2, 20), 0, cfg.vocab_size)
    ref = full_logits(tiny_model, tokens)
    cache = init_cache(cfg, 2, 24)
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    outs = []
    for a, b in [(0, 3), (3, 12), (12, 20)]:  # chunks longer than the window
        lg, cache = forward(tiny_model.params, tokens[:, a:b], pos[:, a:b], cache, cfg)
        outs.append(lg)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), ref, atol=5e-5, rtol=1e-5)


def test_ragged_right_padded_batch_equals_rows_alone(tiny_model):
    cfg = tiny_model.cfg
    lengths = [11, 4, 8]
    T = max(lengths)
    rows = [jax.random.randint(jax.random.key(10 + i), (n,), 0, cfg.vocab_size) for i, n in enumerate(lengths)]
    tokens = jnp.stack([jnp.pad(r, (0, T - len(r))) for r in rows])
    pos = jnp.stack([jnp.where(jnp.arange(T) < n, jnp.arange(T), -1) for n in lengths])
    logits, cache = forward(tiny_model.params, tokens, pos, init_cache(cfg, 3, 16), cfg)
    np.testing.assert_array_equal(cache.lengths, lengths)
    for i, r in enumerate(rows):
        ref = full_logits(tiny_model, r[None])[0]
        np.testing.assert_allclose(logits[i, :lengths[i]], ref, atol=5e-5, rtol=1e-5)
    # then one decode step per row at its own position
    nxt = jnp.array([[1], [2], [3]])
    lg, _ = forward(tiny_model.params, nxt, jnp.array(lengths)[:, None], cache, cfg)
    for i, r in enumerate(rows):
        ref = full_logits(tiny_model, jnp.concatenate([r, nxt[i]])[None])[0, -1]
        np.testing.assert_allclose(lg[i, 0], ref, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("name", preset_names())
def test_real_presets_shapes_without_memory(name):
    """jax.eval_shape runs the real-size forward abstractly: shapes check, nothing is allocated."""
    cfg = load_config(name)
    params = param_shapes(cfg, jnp.bfloat16)
    cache = cache_shapes(cfg, 2, 1024, jnp.bfloat16)
    tok = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    logits, new_cache = jax.eval_shape(lambda p, t, c: _forward(p, t, t, c, cfg), params, tok, cache)
    chex.assert_shape(logits, (2, 16, cfg.vocab_size))
    chex.assert_type(logits, jnp.float32)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_cache) == jax.tree.map(lambda a: (a.shape, a.dtype), cache)


def test_scan_keeps_compile_size_flat_in_depth(tiny_model):
    """The lowered program of a 2x deeper model is not 2x larger: layers are scanned, not unrolled."""
    cfg = tiny_model.cfg
    sizes = []
    for mult in (1, 4):
        c = cfg.replace(n_layers=cfg.n_layers * mult, layer_pattern=cfg.layer_pattern * mult)
        hlo = jax.jit(lambda p, t, ca: _forward(p, t, t, ca, c)).lower(
            param_shapes(c), jax.ShapeDtypeStruct((1, 4), jnp.int32), cache_shapes(c, 1, 16)).as_text()
        sizes.append(len(hlo))
    assert sizes[1] < 1.2 * sizes[0]


def numpy_qwen2_forward(params, tokens, cfg):
    """Logits [T, V] of one sequence by a float64 numpy forward written from the Qwen2 architecture
    (not from jaxgen.model): RMSNorm, q/k/v projections with bias, RoPE on halves, grouped-query
    causal attention (query head n reads kv head n // (N / K)), SwiGLU MLP, untied output matrix."""
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    L, eps, H = P.layers, cfg.norm_eps, cfg.head_dim
    T = len(tokens)
    norm = lambda v, w: v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w
    ang = np.arange(T)[:, None] * cfg.rope_theta ** (-np.arange(0, H, 2) / H)  # [T, H/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(v):  # v [T, heads, H]
        a, b = v[..., :H // 2], v[..., H // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    x = P.embed[np.asarray(tokens)]  # embed is stored [V, D]: row t  [T, D]
    G = cfg.n_heads // cfg.n_kv_heads
    causal = np.tril(np.ones((T, T), bool))
    for l in range(cfg.n_layers):
        h = norm(x, L.attn_norm[l])
        q = rope(np.einsum("td,dnh->tnh", h, L.wq[l]) + L.bq[l])
        k = np.repeat(rope(np.einsum("td,dkh->tkh", h, L.wk[l]) + L.bk[l]), G, axis=1)  # [T, N, H]
        v = np.repeat(np.einsum("td,dkh->tkh", h, L.wv[l]) + L.bv[l], G, axis=1)
        s = np.where(causal, np.einsum("tnh,snh->nts", q, k) / np.sqrt(H), -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("tnh,nhd->td", np.einsum("nts,snh->tnh", p, v), L.wo[l])
        h = norm(x, L.ffn_norm[l])
        g = h @ L.w_gate[l]
        x = x + (g / (1 + np.exp(-g)) * (h @ L.w_up[l])) @ L.w_down[l]
    return norm(x, P.final_norm) @ P.unembed.T  # [T, V]


def test_qwen2_forward_equals_independent_numpy_forward():
    """The qwen2 architecture (QKV bias, untied output, GQA) in CI without the real model: a tiny
    random qwen2-shaped config against numpy, for the full forward and for generate's greedy tokens."""
    from jaxgen.generate import generate
    from jaxgen.model import Model

    from .conftest import TINY_QWEN, random_params

    cfg = TINY_QWEN
    assert cfg.qkv_bias and not cfg.tie_embeddings and cfg.n_kv_heads < cfg.n_heads
    params = random_params(cfg, seed=3)
    assert params.unembed is not None and params.layers.bq is not None
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 13)]
    got = forward(params, jnp.asarray([tokens]), jnp.arange(13)[None], init_cache(cfg, 1, 13), cfg)[0][0]
    np.testing.assert_allclose(got, numpy_qwen2_forward(params, tokens, cfg), atol=2e-4, rtol=1e-4)
    out = generate(Model(cfg, params), [tokens[:5]], max_new_tokens=8, stop_ids=[])[0]
    seq = tokens[:5]
    for t in out.tokens:  # each greedy token is the numpy forward's argmax
        assert t == int(np.argmax(numpy_qwen2_forward(params, seq, cfg)[-1]))
        seq = seq + [t]
