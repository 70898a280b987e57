"""The decoder: params pytree, `init_params`, and a pure `forward` for prefill (T > 1) and decode (T = 1).

Axis legend (einsum letters and shape comments):
  B batch   T new tokens this call   S cache slots   D model   N query heads   K kv heads
  G query heads per kv head (N = K * G)   H head dim   F ffn   V vocab   L layers

Layers are stacked on a leading L axis and run with `lax.scan`, so compile time does not grow with
depth. Models with sliding-window layers (Gemma 3: five local then one global, repeated) are scanned
over *groups* of one period, unrolled inside the scan body, because local and global layers keep
caches of different lengths; layers left over after the last full period (all local) get a second scan.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen import cache as kvc
from jaxgen.cache import KVCache
from jaxgen.config import ModelConfig


@struct.dataclass
class LayerParams:  # every leaf has a leading L axis (layers in order)
    attn_norm: jax.Array  # [L, D]
    wq: jax.Array  # [L, D, N, H]
    wk: jax.Array  # [L, D, K, H]
    wv: jax.Array  # [L, D, K, H]
    wo: jax.Array  # [L, N, H, D]
    ffn_norm: jax.Array  # [L, D]
    w_gate: jax.Array  # [L, D, F]
    w_up: jax.Array  # [L, D, F]
    w_down: jax.Array  # [L, F, D]
    bq: jax.Array | None = None  # [L, N, H] if cfg.qkv_bias
    bk: jax.Array | None = None  # [L, K, H]
    bv: jax.Array | None = None  # [L, K, H]
    q_norm: jax.Array | None = None  # [L, H] if cfg.qk_norm
    k_norm: jax.Array | None = None  # [L, H]
    post_attn_norm: jax.Array | None = None  # [L, D] if cfg.sandwich_norm
    post_ffn_norm: jax.Array | None = None  # [L, D]


@struct.dataclass
class Params:
    embed: jax.Array  # [V, D] token embedding (also the unembedding when tied)
    layers: LayerParams
    final_norm: jax.Array  # [D]
    unembed: jax.Array | None = None  # [V, D] if not cfg.tie_embeddings (same layout as embed)


def param_shapes(cfg: ModelConfig, dtype=jnp.float32) -> Params:
    """ShapeDtypeStructs of the params: the contract loaders assert against."""
    L, D, N, K, H, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                           cfg.d_ff, cfg.vocab_size)
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    opt = lambda cond, *shape: s(*shape) if cond else None
    layers = LayerParams(
        attn_norm=s(L, D), wq=s(L, D, N, H), wk=s(L, D, K, H), wv=s(L, D, K, H), wo=s(L, N, H, D),
        ffn_norm=s(L, D), w_gate=s(L, D, F), w_up=s(L, D, F), w_down=s(L, F, D),
        bq=opt(cfg.qkv_bias, L, N, H), bk=opt(cfg.qkv_bias, L, K, H), bv=opt(cfg.qkv_bias, L, K, H),
        q_norm=opt(cfg.qk_norm, L, H), k_norm=opt(cfg.qk_norm, L, H),
        post_attn_norm=opt(cfg.sandwich_norm, L, D), post_ffn_norm=opt(cfg.sandwich_norm, L, D))
    return Params(embed=s(V, D), layers=layers, final_norm=s(D),
                  unembed=opt(not cfg.tie_embeddings, V, D))


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random params: norms 1, biases 0, weights N(0, 1/fan_in); embeddings N(0, 1/D), so that
    embedded tokens (times sqrt(D) when embed_scale) and logits both come out near unit scale."""
    shapes = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))

    def init(path, sd, k):
        name = path[-1].name
        if "norm" in name:
            return jnp.ones(sd.shape, dtype)
        if name.startswith("b"):
            return jnp.zeros(sd.shape, dtype)
        fan_in = {"wo": cfg.n_heads * cfg.head_dim, "w_down": cfg.d_ff}.get(name, cfg.d_model)
        return (fan_in ** -0.5 * jax.random.normal(k, sd.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [init(p, sd, k) for (p, sd), k in zip(leaves, keys)])


# ---- building blocks ----------------------------------------------------------------------------
def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis in f32; `w` is the full multiplier (Gemma's +1 already folded in)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, scaling: float = 1.0):
    """cos, sin [B, T, H/2] for positions [B, T]."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [H/2]
    angle = (positions.astype(jnp.float32) / scaling)[..., None] * inv_freq  # [B, T, H/2]
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate halves (x[..., :H/2], x[..., H/2:]) of x [B, T, heads, H]; GGUF llama q/k weights are
    un-permuted at load time so that every family uses this one convention."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, heads, H/2] each
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]; softmax in f32."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, kvc.NEG_INF)  # [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype)


def _activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    if cfg.activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def _layer(cfg: ModelConfig, is_global: bool, x, lp: LayerParams, k_buf, v_buf, ctx):
    """One decoder layer. x [B, T, D]; lp holds one layer's params; k_buf/v_buf [B, W|S, K, H]."""
    eps = cfg.norm_eps
    h = rms_norm(x, lp.attn_norm, eps)
    q = jnp.einsum("btd,dnh->btnh", h, lp.wq)  # [B, T, N, H]
    k = jnp.einsum("btd,dkh->btkh", h, lp.wk)  # [B, T, K, H]
    v = jnp.einsum("btd,dkh->btkh", h, lp.wv)  # [B, T, K, H]
    if cfg.qkv_bias:
        q, k, v = q + lp.bq, k + lp.bk, v + lp.bv
    if cfg.qk_norm:
        q, k = rms_norm(q, lp.q_norm, eps), rms_norm(k, lp.k_norm, eps)
    kind = "global" if is_global else "local"
    cos, sin = ctx[f"rope_{kind}"]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    slots = ctx[f"slots_{kind}"]
    if is_global or q.shape[1] == 1:
        # The chunk cannot overwrite a slot one of its own queries still needs: write, then attend.
        k_buf, v_buf = kvc.write(k_buf, k, slots), kvc.write(v_buf, v, slots)
        o = attend(q, k_buf, v_buf, ctx[f"mask_{kind}"], cfg.attn_scale)
    else:
        # A multi-token chunk may wrap the ring past keys its early queries need: attend over the old
        # ring plus the chunk, then write.
        keys = jnp.concatenate([k_buf, k.astype(k_buf.dtype)], axis=1)  # [B, W + T, K, H]
        vals = jnp.concatenate([v_buf, v.astype(v_buf.dtype)], axis=1)
        o = attend(q, keys, vals, ctx["mask_local_chunk"], cfg.attn_scale)
        k_buf, v_buf = kvc.write(k_buf, k, slots), kvc.write(v_buf, v, slots)
    o = jnp.einsum("btnh,nhd->btd", o, lp.wo)  # [B, T, D]
    if cfg.sandwich_norm:
        o = rms_norm(o, lp.post_attn_norm, eps)
    x = x + o

    h = rms_norm(x, lp.ffn_norm, eps)
    gate = jnp.einsum("btd,df->btf", h, lp.w_gate)  # [B, T, F]
    up = jnp.einsum("btd,df->btf", h, lp.w_up)  # [B, T, F]
    o = jnp.einsum("btf,fd->btd", _activation(cfg, gate) * up, lp.w_down)  # [B, T, D]
    if cfg.sandwich_norm:
        o = rms_norm(o, lp.post_ffn_norm, eps)
    return x + o, k_buf, v_buf


def _run_layers(cfg: ModelConfig, pattern: tuple[bool, ...], x, layers, k_loc, v_loc, k_glb, v_glb, ctx):
    """Scan over groups of len(pattern) layers. layers: leaves [G, P, ...]; k_loc/v_loc
    [G, n_local_in_pattern, B, W, K, H]; k_glb/v_glb [G, n_global_in_pattern, B, S, K, H]."""

    def body(x, xs):
        lp_group, kl, vl, kg, vg = xs
        kl_out, vl_out, kg_out, vg_out = [], [], [], []
        for j, is_global in enumerate(pattern):
            lp = jax.tree.map(lambda a: a[j], lp_group)
            if is_global:
                i = len(kg_out)
                x, kb, vb = _layer(cfg, True, x, lp, kg[i], vg[i], ctx)
                kg_out.append(kb), vg_out.append(vb)
            else:
                i = len(kl_out)
                x, kb, vb = _layer(cfg, False, x, lp, kl[i], vl[i], ctx)
                kl_out.append(kb), vl_out.append(vb)
        stack = lambda bufs, like: jnp.stack(bufs) if bufs else like
        return x, (stack(kl_out, kl), stack(vl_out, vl), stack(kg_out, kg), stack(vg_out, vg))

    x, (k_loc, v_loc, k_glb, v_glb) = jax.lax.scan(body, x, (layers, k_loc, v_loc, k_glb, v_glb))
    return x, k_loc, v_loc, k_glb, v_glb


def forward_hidden(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                   cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """Final-normed hidden states [B, T, D] and the updated cache.

    tokens, positions: [B, T] int32. Within a row, valid positions are contiguous and ascending
    (the row's next positions); -1 marks padding, which is neither written nor attended.
    """
    B, T = tokens.shape
    x = params.embed[tokens]  # [B, T, D]
    x = x * jnp.asarray(cfg.embed_multiplier, x.dtype) if cfg.embed_scale else x

    lengths = kvc.new_lengths(cache.lengths, positions)  # [B]
    W, S = cache.window_slots, cache.max_len
    ctx = {"rope_global": rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
           "slots_global": kvc.slots_for(positions, lengths, S)}
    pos_global = kvc.write(cache.pos_global, positions, ctx["slots_global"])  # [B, S]
    ctx["mask_global"] = kvc.attention_mask(positions, pos_global, 0)  # [B, T, S]
    pos_local = cache.pos_local
    if cfg.n_local:
        window = cfg.sliding_window
        ctx["rope_local"] = rope_tables(positions, cfg.head_dim, cfg.rope_local_theta)
        ctx["slots_local"] = kvc.slots_for(positions, lengths, W)
        if T > 1:  # keys: the old ring, then the chunk
            chunk_pos = jnp.concatenate([pos_local, positions], axis=1)  # [B, W + T]
            ctx["mask_local_chunk"] = kvc.attention_mask(positions, chunk_pos, window)
        pos_local = kvc.write(pos_local, positions, ctx["slots_local"])  # [B, W]
        ctx["mask_local"] = kvc.attention_mask(positions, pos_local, window)

    P = cfg.global_every if cfg.n_local else 1
    G, tail = divmod(cfg.n_layers, P)
    n_loc_p = P - 1  # local layers per period
    group = lambda a, n, per: a[:n].reshape(G, per, *a.shape[1:])
    layers = jax.tree.map(lambda a: group(a, G * P, P), params.layers)
    x, kl, vl, kg, vg = _run_layers(
        cfg, (False,) * n_loc_p + (True,), x, layers,
        group(cache.k_local, G * n_loc_p, n_loc_p), group(cache.v_local, G * n_loc_p, n_loc_p),
        group(cache.k_global, G, 1), group(cache.v_global, G, 1), ctx)
    flat = lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])
    k_local, v_local, k_global, v_global = flat(kl), flat(vl), flat(kg), flat(vg)
    if tail:  # trailing local layers after the last global one
        tail_layers = jax.tree.map(lambda a: a[G * P:, None], params.layers)
        t_kl, t_vl = cache.k_local[G * n_loc_p:, None], cache.v_local[G * n_loc_p:, None]
        empty = cache.k_global[:0, None]
        x, t_kl, t_vl, _, _ = _run_layers(cfg, (False,), x, tail_layers, t_kl, t_vl,
                                          jnp.zeros((tail, 0) + empty.shape[2:], empty.dtype),
                                          jnp.zeros((tail, 0) + empty.shape[2:], empty.dtype), ctx)
        k_local = jnp.concatenate([k_local, flat(t_kl)])
        v_local = jnp.concatenate([v_local, flat(t_vl)])

    x = rms_norm(x, params.final_norm, cfg.norm_eps)
    cache = KVCache(k_local=k_local, v_local=v_local, pos_local=pos_local, k_global=k_global,
                    v_global=v_global, pos_global=pos_global, lengths=lengths)
    return x, cache


def unembed(params: Params, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [..., V] in f32 from hidden states [..., D]. The einsum contracts D of the [V, D]
    table directly, so no transposed copy of the 262k x 640 embedding is made per step."""
    table = params.embed if cfg.tie_embeddings else params.unembed
    logits = jnp.einsum("...d,vd->...v", h, table, preferred_element_type=jnp.float32)
    if cfg.final_logit_softcap:
        logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    return logits


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (f32) for tokens [B, T] at positions [B, T], and the updated cache.

    Pure: the cache goes in and comes out. `cfg` is static; everything else is traced.
    """
    h, cache = forward_hidden(params, tokens, positions, cache, cfg)
    return unembed(params, h, cfg), cache
