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


def test_per_layer_params_equal_stacked(tiny_model):
    """The unrolled decode layout (one LayerParams per layer) computes what the scan over stacked
    layers computes: prefill then cached decode, local rings wrapping; stack_layers inverts it."""
    cfg = tiny_model.cfg
    per_layer = unstack_layers(tiny_model.params)
    assert isinstance(per_layer.layers, tuple) and len(per_layer.layers) == cfg.n_layers
    assert per_layer.layers[1].wq.shape == tiny_model.params.layers.wq.shape[1:]
    jax.tree.map(np.testing.assert_array_equal, stack_layers(per_layer), tiny_model.params)
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
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), outs["per_layer"][1], outs["stacked"][1])


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
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_cache) == jax.tree.map(lambda a: (a.shape, a.dtype), cache)


def test_scan_keeps_compile_size_flat_in_depth(tiny_model):
    """The lowered program of a 2x deeper model is not 2x larger: layers are scanned, not unrolled."""
    cfg = tiny_model.cfg
    sizes = []
    for mult in (1, 4):
        c = cfg.replace(n_layers=cfg.n_layers * mult)
        hlo = jax.jit(lambda p, t, ca: _forward(p, t, t, ca, c)).lower(
            param_shapes(c), jax.ShapeDtypeStruct((1, 4), jnp.int32), cache_shapes(c, 1, 16)).as_text()
        sizes.append(len(hlo))
    assert sizes[1] < 1.2 * sizes[0]
