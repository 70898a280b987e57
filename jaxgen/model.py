"""The decoder: params pytree, `init_params`, and a pure `forward` for prefill (T > 1) and decode (T = 1).

Axis legend (einsum letters and shape comments):
  B batch   T new tokens this call   S cache slots   D model   N query heads   K kv heads
  G query heads per kv head (N = K * G)   H head dim   F ffn   V vocab   L layers

Layers are either stacked on a leading L axis and run with `lax.scan`, one layer per step (compile
time does not grow with depth), or a tuple of per-layer params run unrolled (faster decode on CPU:
see `unstack_layers`). Sliding-window (local) and global layers keep caches of different lengths
(Gemma 3: five local then one global, repeated); a scan step picks its kind with `lax.cond`, an
unrolled layer knows it statically. `Model` bundles what generation needs: config, params, tokenizer.
Backend-sensitive steps (decode and prefill attention, dequantization) take their implementation
from a static jaxgen.backend.Paths; the reference paths are the plain einsums below.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen import backend
from jaxgen import cache as kvc
from jaxgen import kernels, moe, quant
from jaxgen.cache import KVCache
from jaxgen.config import ModelConfig
from jaxgen.lora import delta as lora_delta


@struct.dataclass
class LayerParams:  # stacked: leaves lead with an L axis (layers in order); per layer: no L axis
    attn_norm: jax.Array  # [L, D]
    wq: jax.Array  # [L, D, N, H]
    wk: jax.Array  # [L, D, K, H]
    wv: jax.Array  # [L, D, K, H]
    wo: jax.Array  # [L, N, H, D]
    ffn_norm: jax.Array  # [L, D]
    w_gate: jax.Array | None  # [L, D, F] (None with cfg.n_experts: the MLP is the experts below)
    w_up: jax.Array | None  # [L, D, F]
    w_down: jax.Array | None  # [L, F, D]
    bq: jax.Array | None = None  # [L, N, H] if cfg.qkv_bias
    bk: jax.Array | None = None  # [L, K, H]
    bv: jax.Array | None = None  # [L, K, H]
    q_norm: jax.Array | None = None  # [L, H] if cfg.qk_norm
    k_norm: jax.Array | None = None  # [L, H]
    post_attn_norm: jax.Array | None = None  # [L, D] if cfg.sandwich_norm
    post_ffn_norm: jax.Array | None = None  # [L, D]
    # mixture of experts (cfg.n_experts = E > 0; jaxgen.moe), Fe = cfg.d_ff_expert
    router: jax.Array | None = None  # [L, D, E]
    we_gate: jax.Array | None = None  # [L, E, D, Fe]
    we_up: jax.Array | None = None  # [L, E, D, Fe]
    we_down: jax.Array | None = None  # [L, E, Fe, D]


@struct.dataclass
class Params:
    # [V, D]: a row per token, as every checkpoint format stores it. The unembedding contracts D of
    # it: XLA:CPU read the 262k x 640 Gemma 3 table (63% of the weights a decode step reads) at 1.3-1.6x
    # the speed of [D, V] from 2 rows up, in float32 and bfloat16 (measured 2026-12-06). jaxgen 0.2 stored
    # [D, V] for the float32 one-row product (24 ms against 26 for the best [V, D] form: `_unembed_dot`).
    # The ranking is the host's: on an AMD EPYC (2026-12-07) float32 [D, V] read in 19.8 / 39.7 / 49.5 ms
    # at 1 / 4 / 8 rows against [V, D]'s 23.2 / 48.3 / 55.7, equal at 2, 16 and 32 and in bfloat16.
    # Kept [V, D]: one layout, as checkpoints store it, and the larger gains were the Xeon's.
    embed: jax.Array  # [V, D] token embedding (also the unembedding when tied); a quantized
    # table is a QMatrix [D, V] (jaxgen.quant: every QMatrix is [in, out], its groups along D)
    # LayerParams with a leading L axis (run by lax.scan: one compiled layer), or a tuple of
    # per-layer LayerParams without it (run unrolled; see unstack_layers).
    layers: LayerParams | tuple
    final_norm: jax.Array  # [D]
    unembed: jax.Array | None = None  # [V, D] if not cfg.tie_embeddings (same layout as embed)
    # LoRA adapters applied unmerged (jaxgen.lora.LoraTable: per target a [L, M, I, R], b [L, M, R, O];
    # always stacked on L): each cache row names its slot (KVCache.adapter). None: no adapters.
    lora: Any = None


PREFILL_CHUNK = 512  # prompt tokens per forward pass of a prefill (`prefill_hidden`): Model.prefill_chunk


@dataclasses.dataclass(frozen=True)
class Model:
    """What generation needs: a config, params and (optionally) a tokenizer for text in/out. Loaders
    (`jaxgen.checkpoint`) return it; the host API (`jaxgen.generate`) takes it."""
    cfg: ModelConfig
    params: Params
    tokenizer: Any = None
    mesh: Any = None  # a jax.sharding.Mesh when params are sharded (see jaxgen.sharding)
    kv_quant: str | None = None  # None (cache in the params' dtype) or "int8" (see jaxgen.cache)
    prefill_chunk: int = PREFILL_CHUNK  # prompt tokens per prefill forward pass (see prefill_hidden)
    # jaxgen.backend.Paths (attention kernels, sampling gates, dequantization) the programs run; None =
    # the default backend's, with JAXGEN_PATHS's overrides, read when a program is traced
    paths: backend.Paths | None = None

    def __post_init__(self):
        if isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {self.prefill_chunk!r}")
        if self.paths is not None and not isinstance(self.paths, backend.Paths):
            raise ValueError(f"paths must be a jaxgen.backend.Paths or None, got {self.paths!r}")


def param_shapes(cfg: ModelConfig, dtype=jnp.float32) -> Params:
    """ShapeDtypeStructs of the params: the contract loaders assert against."""
    L, D, N, K, H, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                           cfg.d_ff, cfg.vocab_size)
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    opt = lambda cond, *shape: s(*shape) if cond else None
    E, Fe, dense = cfg.n_experts, cfg.d_ff_expert, not cfg.n_experts
    layers = LayerParams(
        attn_norm=s(L, D), wq=s(L, D, N, H), wk=s(L, D, K, H), wv=s(L, D, K, H), wo=s(L, N, H, D),
        ffn_norm=s(L, D), w_gate=opt(dense, L, D, F), w_up=opt(dense, L, D, F), w_down=opt(dense, L, F, D),
        bq=opt(cfg.qkv_bias, L, N, H), bk=opt(cfg.qkv_bias, L, K, H), bv=opt(cfg.qkv_bias, L, K, H),
        q_norm=opt(cfg.qk_norm, L, H), k_norm=opt(cfg.qk_norm, L, H),
        post_attn_norm=opt(cfg.sandwich_norm, L, D), post_ffn_norm=opt(cfg.sandwich_norm, L, D),
        router=opt(not dense, L, D, E), we_gate=opt(not dense, L, E, D, Fe), we_up=opt(not dense, L, E, D, Fe),
        we_down=opt(not dense, L, E, Fe, D))
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
        fan_in = {"wo": cfg.n_heads * cfg.head_dim, "w_down": cfg.d_ff, "we_down": cfg.d_ff_expert}.get(name, cfg.d_model)
        if name in ("embed", "unembed"):  # drawn [D, V] and transposed: the values of jaxgen 0.2's tables
            return (fan_in ** -0.5 * jax.random.normal(k, sd.shape[::-1], jnp.float32)).T.astype(dtype)
        return (fan_in ** -0.5 * jax.random.normal(k, sd.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [init(p, sd, k) for (p, sd), k in zip(leaves, keys)])


def unstack_layers(params: Params) -> Params:
    """Params whose layers are a tuple of per-layer LayerParams (leading L axis removed), which
    `forward` runs as an unrolled loop. Why: inside the compiled decode loop, a `lax.scan` step copies
    its layer's weights out of the stacked arrays before the matmuls (XLA:CPU materializes each
    dynamic slice: forward 48 vs 42 ms at batch 1 on Gemma 3 270M); separate arrays are read in place.
    The price is compile time (each layer is compiled): `jaxgen.load` returns this layout for float
    decoding; stacked layers (one compiled layer) suit training and tests. Leaves are copied.
    Quantized (QMatrix) layers are better left stacked: as separate arrays their dequantization is
    loop-invariant, and XLA hoists it out of the decode loop (measured: +1.1 GB resident for Gemma
    3 270M int8, and float bytes read per step instead of int8)."""
    if isinstance(params.layers, tuple):
        return params
    n = jax.tree.leaves(params.layers)[0].shape[0]
    layers = tuple(jax.tree.map(lambda a: a[i], params.layers) for i in range(n))
    return params.replace(layers=layers)


def stack_layers(params: Params) -> Params:
    """The inverse of `unstack_layers`: layers as one LayerParams with a leading L axis."""
    if not isinstance(params.layers, tuple):
        return params
    stack = jnp.stack if isinstance(jax.tree.leaves(params.layers)[0], jax.Array) else np.stack
    return params.replace(layers=jax.tree.map(lambda *a: stack(a), *params.layers))


# ---- building blocks ----------------------------------------------------------------------------
def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis in f32; `w` is the full multiplier (Gemma's +1 already folded in)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies [H/2] (float32, host) of a layer kind's RoPE. Local layers: plain, their own
    base. Global layers: "default" divides positions by rope_scaling (linear scaling: the same as
    dividing every frequency); "llama3" (Llama 3.1+) divides the low frequencies by the factor, keeps
    the high ones and interpolates between, by wavelength against the original context."""
    H = cfg.head_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = (1.0 / theta ** (np.arange(0, H, 2, dtype=np.float64) / H))  # [H/2]
    if local:
        return inv.astype(np.float32)
    factor = cfg.rope_scaling
    if cfg.rope_type == "llama3":
        wavelen = 2 * np.pi / inv
        low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor  # longer: scaled
        high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor  # shorter: kept
        smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        inv = np.where(wavelen > low_wavelen, inv / factor,
                       np.where(wavelen < high_wavelen, inv, (1 - smooth) * inv / factor + smooth * inv))
    else:
        inv = inv / factor
    return inv.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray):
    """cos, sin [B, T, H/2] for positions [B, T] and inverse frequencies [H/2] (`rope_frequencies`)."""
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    cs = jnp.stack([jnp.cos(angle), jnp.sin(angle)])  # [2, B, T, H/2]
    # Computed once, read by every layer. XLA:CPU fuses an elementwise producer into each of its consumers
    # (and drops optimization barriers): every layer's q and k fusions recomputed these cosines and sines
    # (measured, a 512-token Gemma 3 prefill: each layer's q fusion 4.2 -> 1.9 ms). A reduction is never
    # fused into its consumers: two copies summed, then halved (the same bits), make a buffer the layers read.
    cs = jax.lax.reduce(jnp.stack([cs, cs]), np.float32(0), jax.lax.add, (0,)) * 0.5
    return cs[0], cs[1]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate halves (x[..., :H/2], x[..., H/2:]) of x [B, T, heads, H]; GGUF llama q/k weights are
    un-permuted at load time so that every family uses this one convention."""
    # The halves as an axis of their own ([..., 2, H/2]), not a split and concatenate of the last axis:
    # XLA:CPU then vectorizes along H/2 (measured, a 512-token Gemma 3 query: 0.81 -> 0.25 ms, the same bits).
    B, T, heads, H = x.shape
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if T == 1:  # (decode: the split and concatenate measured faster at this size)
        x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, 1, heads, H/2] each
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
    xs = x.astype(jnp.float32).reshape(B, T, heads, 2, H // 2)
    x1, x2 = xs[..., 0, :], xs[..., 1, :]  # [B, T, heads, H/2] each
    return jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-2).reshape(B, T, heads, H).astype(x.dtype)


def _scores(q: jax.Array, k, scale: float, softcap: float = 0.0) -> jax.Array:
    """Scores [B, K, G, T, S] (f32) of q [B, T, K, G, H] against k [B, S, K, H] or an int8 pair
    (values, scales [B, S, K]): the key scale multiplies the scores (no dequantized copy of the cache).
    softcap > 0: softcap * tanh(scores / softcap) (Gemma 2), applied before any mask."""
    k_scale = None
    if isinstance(k, tuple):
        k, k_scale = k
        k = k.astype(q.dtype)
    if q.shape[1] == 1:  # one token per row: XLA:CPU's dot reads k in place and transposes the small q
        s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    else:
        # A chunk: its queries transposed first. A dot's output follows its operands' axes, so [B, T, K, G, H]
        # queries gave scores [B, K, T, G, S] and a transposed copy of every score (measured, a 512-token Gemma
        # 3 chunk: attend 9.2 -> 3.7 ms per layer, the same bits). One token per row is the opposite case: the
        # transposed queries made XLA:CPU copy k transposed instead (attend 1.3 -> 2.6 ms at batch 32).
        s = jnp.einsum("bkgth,bskh->bkgts", q.transpose(0, 2, 3, 1, 4), k, preferred_element_type=jnp.float32)
    s = s * scale
    if k_scale is not None:
        s = s * k_scale.transpose(0, 2, 1)[:, :, None, None, :]  # [B, K, 1, 1, S]
    return softcap * jnp.tanh(s / softcap) if softcap else s


def _mix(probs: jax.Array, v, dtype) -> jax.Array:
    """probs [B, K, G, T, S] (f32) times v [B, S, K, H] (or an int8 pair, converted to `dtype`, the
    queries': the value scale multiplies the probabilities) -> [B, K, G, T, H] f32."""
    if isinstance(v, tuple):
        v, v_scale = v
        probs = probs * v_scale.transpose(0, 2, 1)[:, :, None, None, :]
        v = v.astype(dtype)
    return jnp.einsum("bkgts,bskh->bkgth", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def attend(q: jax.Array, k, v, mask: jax.Array, scale: float, softcap: float = 0.0, dpa: bool = False) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]; softmax in f32.
    k / v may be int8 cache pairs (values [B, S, K, H], scales [B, S, K]): the key scale multiplies
    the scores and the value scale the probabilities; the int8 values of this layer are converted
    here (a per-step, per-layer conversion; scales are never applied to the cache itself).
    dpa: through jax.nn.dot_product_attention where it applies (float keys, no softcap; see `_dpa`)."""
    if dpa and not softcap and not isinstance(k, tuple):
        return _dpa(q, k, v, mask, scale)
    B, T, N, H = q.shape
    K = (k[0] if isinstance(k, tuple) else k).shape[2]
    scores = _scores(q.reshape(B, T, K, N // K, H), k, scale, softcap)  # [B, K, G, T, S]
    scores = jnp.where(mask[:, None, None], scores, kvc.NEG_INF)
    out = _mix(jax.nn.softmax(scores, axis=-1), v, q.dtype)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)


def _dpa(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """`attend` as jax.nn.dot_product_attention computes it: cuDNN's fused attention on GPU for
    bf16 / f16 where cuDNN takes the shapes (the mask becomes its bias), XLA's otherwise (CPU, TPU,
    f32: the same einsums)."""
    run = lambda impl, q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                                            implementation=impl)
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return run("cudnn", q, k, v)
        except (ValueError, NotImplementedError, RuntimeError):  # shapes / versions cuDNN refuses (at trace time)
            pass
    if jax.default_backend() == "cpu" and q.dtype != jnp.float32:
        # XLA's form multiplies the probabilities by v with a bf16 result, a dot XLA:CPU cannot emit
        # under jaxgen's options (backend.CPU_COMPILER_OPTIONS): on CPU, where "dpa" is only forced
        # (tests, benchmarks.accelerator --smoke), it runs in float32
        f32 = lambda a: a.astype(jnp.float32)
        return run("xla", f32(q), f32(k), f32(v)).astype(q.dtype)
    return run("xla", q, k, v)


def decode_global(q: jax.Array, k, v, q_pos: jax.Array, k_pos: jax.Array, mask: jax.Array, scale: float,
                  softcap: float, how: str, block: int = 256) -> jax.Array:
    """One new token per row [B, 1, N, H] against a global layer's cache k / v [B, S, K, H] (slot p holds
    position p), as jaxgen.backend's decode_attention says: "full" `attend` over every slot; "live"
    key blocks of `block` slots up to the longest live row (`attend_blocked`); "pallas"
    jaxgen.kernels, each row up to its own length (where kernels.decode_supported: int8 pairs, other
    head dims and a jax without Pallas's Triton backend take "live"). All equal "full" up to float
    rounding."""
    S, H = k_pos.shape[1], q.shape[-1]
    if how == "pallas" and kernels.decode_supported(S, H, k):
        kv_len = jnp.maximum(q_pos[:, 0] + 1, 0)  # a finished row (position -1) reads nothing
        return kernels.decode_attention(q, k, v, kv_len, scale=scale, softcap=softcap,
                                        interpret=jax.default_backend() != "gpu")
    if how in ("live", "pallas") and S > block:
        return attend_blocked(q, k, v, q_pos, k_pos, scale, block, softcap)
    return attend(q, k, v, mask, scale, softcap)


def attend_blocked(q: jax.Array, k, v, q_pos: jax.Array, k_pos: jax.Array, scale: float, block: int,
                   softcap: float = 0.0) -> jax.Array:
    """Causal attention of a prefill chunk over a global layer's whole cache, as `attend` with the
    mask attention_mask(q_pos, k_pos, 0) computes it, holding one key block of scores at a time.

    q [B, T, N, H] at positions q_pos [B, T]; k / v [B, S, K, H] (or int8 pairs) holding positions
    k_pos [B, S], position p in slot p (global layers never wrap). Key blocks of `block` slots are
    read in order with an online softmax (running max m, running sum l, rescaled accumulator), and
    only up to the block holding the chunk's last query position: later slots are in the future of
    every query. Why: the one-pass scores are [B, N, T, S] (a 512-token chunk over a 32k cache: 256 MB
    per layer at 4 heads) and most of them are masked; here they are [B, N, T, block]."""
    B, T, N, H = q.shape
    S, K = k_pos.shape[1], (k[0] if isinstance(k, tuple) else k).shape[2]
    block = min(block, S)
    qg = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    n_blocks = jnp.minimum(jnp.max(q_pos) // block + 1, -(-S // block))  # >= 1: a chunk's rows may all be padding

    def body(i, carry):
        m, l, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H]
        # The last block is read as the final `block` slots when S is not a multiple of it; the
        # slots it shares with the block before are hidden (position -1) so none counts twice.
        start = jnp.minimum(i * block, S - block)
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, block, axis=1)
        fresh = start + jnp.arange(block) >= i * block  # [block]
        pos = jnp.where(fresh[None, :], take(k_pos), -1)  # [B, block]
        s = _scores(qg, jax.tree.map(take, k), scale, softcap)  # [B, K, G, T, block]
        s = jnp.where(kvc.attention_mask(q_pos, pos, 0)[:, None, None], s, kvc.NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        # While a row has seen only masked keys, m is NEG_INF and they weigh exp(0): the first visible
        # key's exp(NEG_INF - m_new) = 0 then wipes them (NEG_INF is finite: no inf - inf NaN).
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + _mix(p, jax.tree.map(take, v), q.dtype)

    init = (jnp.full((B, K, N // K, T), kvc.NEG_INF, jnp.float32), jnp.zeros((B, K, N // K, T), jnp.float32),
            jnp.zeros((B, K, N // K, T, H), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / l[..., None]  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)


def _matmul(x: jax.Array, w, out_dtype=None, dequant=jnp.float32) -> jax.Array:
    """x [..., I] @ w [I, O] as one plain 2-D dot (or a quantized QMatrix's dequantizing matmul, its
    weights dequantized to `dequant`: jaxgen.backend's choice).
    Why not einsum over split head axes: XLA:CPU then picks layouts that transpose the weight matrix
    on every call (measured: a copy of wq and wo per layer per decode step)."""
    if isinstance(w, quant.QMatrix):
        y = quant.matmul(x, w, dequant)
        return y if out_dtype is None else y.astype(out_dtype)
    x2 = x.reshape(-1, x.shape[-1])  # [M, I]
    # f32 accumulation always: a bfloat16-output dot made XLA:CPU convert the weights to f32 first
    y = jnp.dot(_rows_for(x2, w.dtype), w, preferred_element_type=jnp.float32)[:x2.shape[0]]
    return y.astype(out_dtype or jnp.result_type(x, w)).reshape(*x.shape[:-1], w.shape[-1])


def _rows_for(x2: jax.Array, w_dtype) -> jax.Array:
    """x2 [M, I] as the left operand of a product with a `w_dtype` matrix: one row padded with a zero
    row for a bfloat16 matrix on CPU, where XLA:CPU's bfloat16 matrix-vector path is ~10x slower than
    its matrix-matrix one (Gemma's unembedding: 230 ms against 23 ms). Callers keep the first M rows."""
    if x2.shape[0] == 1 and w_dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jnp.pad(x2, ((0, 1), (0, 0)))
    return x2


def _proj(h: jax.Array, w, heads: int, dequant=jnp.float32) -> jax.Array:
    """h [B, T, D] @ w [D, heads, H] (or its quantized 2-D form [D, heads * H]) -> [B, T, heads, H]."""
    if not isinstance(w, quant.QMatrix):
        w = w.reshape(w.shape[0], -1)  # [D, heads * H]
    return _matmul(h, w, dequant=dequant).reshape(*h.shape[:2], heads, -1)


def _write_layer(stack, layer, new, slots, enabled, by_row: bool = False):
    """Scatter new [B, T, K, H] into stack [L*, B, W|S, K, H] at (layer, row, slot); a disabled write
    (the layer is of the other kind) drops every slot. One scatter straight into the carried stack is
    done in place; slicing the layer out, scattering and putting it back copied the slice twice
    (measured at batch 32: 67 ms against 0.04 ms per step for 18 layers).
    by_row (on a mesh): the row a batching dimension of the scatter (cache.row_scatter), not an index.
    Why: GSPMD cannot tell that indexed rows stay on their device, so each write all-gathered every
    row's new keys or values and slots to every device (4 collectives per layer per decode step).
    Without a mesh the indexed form stays: on one CPU both ran alike (benchmarks/decode_ab.py, Gemma 3
    270M f32, batch 32: 173.6 / 178.6 against 182.3 / 167.6 tokens/s), and it is the one measured
    everywhere else."""
    if isinstance(stack, tuple):  # int8 cache: (values, scales), each written the same way
        return tuple(_write_layer(s, layer, n, slots, enabled, by_row) for s, n in zip(stack, kvc.quantize_kv(new)))
    slots = jnp.where(enabled, slots, stack.shape[2])  # out of range -> dropped
    if by_row:
        return kvc.row_scatter(stack, new, slots, layer)
    rows = jnp.arange(stack.shape[1])[:, None]
    return kvc.bit_scatter(stack, (layer, rows, slots), new)


def _index(stack, i):
    """Layer i of a cache stack (an array or an int8 (values, scales) pair)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stack)


def _concat_chunk(buf, new):
    """The ring buffer [B, W, ...] followed by a chunk's keys or values [B, T, ...] (quantized like
    the buffer, so a chunk attends to itself as later steps will see it)."""
    if isinstance(buf, tuple):
        return tuple(jnp.concatenate([b, n], axis=1) for b, n in zip(buf, kvc.quantize_kv(new)))
    return jnp.concatenate([buf, new.astype(buf.dtype)], axis=1)


def _layer(cfg: ModelConfig, carry, xs, ctx):
    """One decoder layer, as a scan step (traced xs) or an unrolled one (Python bool and ints).
    carry: x [B, T, D] and the four cache stacks; xs: this layer's params, whether it is global, and
    its index among the local / global layers."""
    x, *stacks = carry
    kl, vl, kg, vg = ctx["pin"](stacks)
    lp, is_global, li, gi, lo = xs
    eps = cfg.norm_eps
    paths = ctx["paths"]
    dq = jnp.dtype(paths.dequant)
    dpa = paths.prefill_attention == "dpa"

    def lora(target, inp, y):  # y + the rows' adapter update of this projection (jaxgen.lora)
        w = None if lo is None else getattr(lo, target)
        if w is None:
            return y
        return y + lora_delta(inp, w, ctx["lora_rows"]).reshape(y.shape).astype(y.dtype)

    h = rms_norm(x, lp.attn_norm, eps)
    q = lora("q", h, _proj(h, lp.wq, cfg.n_heads, dq))  # [B, T, N, H]
    k = lora("k", h, _proj(h, lp.wk, cfg.n_kv_heads, dq))  # [B, T, K, H]
    v = lora("v", h, _proj(h, lp.wv, cfg.n_kv_heads, dq))  # [B, T, K, H]
    if cfg.qkv_bias:
        q, k, v = q + lp.bq, k + lp.bk, v + lp.bv
    if cfg.qk_norm:
        q, k = rms_norm(q, lp.q_norm, eps), rms_norm(k, lp.k_norm, eps)
    T = q.shape[1]
    both = bool(cfg.n_local and cfg.n_global)
    static = isinstance(is_global, bool)  # unrolled: the kind is known, only its branch is built
    rot = {}  # kind -> rotated (q, k): local and global layers use different RoPE bases
    for kind, present in (("local", cfg.n_local), ("global", cfg.n_global)):
        if present and not (static and both and (kind == "global") != is_global):
            cos, sin = ctx[f"rope_{kind}"]
            rot[kind] = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    # Cache writes happen outside the cond (masked by kind), and the cond returns only the attention
    # output: a cond that returns the cache stacks makes XLA copy them every layer.
    def write(kl, vl, kg, vg):
        if cfg.n_local and not (static and both and is_global):
            on = ~is_global if both and not static else True
            kl = _write_layer(kl, li, rot["local"][1], ctx["slots_local"], on, ctx["by_row"])
            vl = _write_layer(vl, li, v, ctx["slots_local"], on, ctx["by_row"])
        if cfg.n_global and not (static and both and not is_global):
            on = is_global if both and not static else True
            kg = _write_layer(kg, gi, rot["global"][1], ctx["slots_global"], on, ctx["by_row"])
            vg = _write_layer(vg, gi, v, ctx["slots_global"], on, ctx["by_row"])
        return ctx["pin"]((kl, vl, kg, vg))

    def local(kl, vl, kg, vg):
        q_l, k_l = rot["local"]
        k_buf, v_buf = _index(kl, li), _index(vl, li)  # [B, W, K, H]
        if T == 1:  # already written
            return attend(q_l, k_buf, v_buf, ctx["mask_local"], cfg.attn_scale, cfg.attn_logit_softcap)
        # A multi-token chunk may wrap the ring past keys its early queries need: attend over the
        # old ring plus the chunk (the write comes after).
        keys, vals = _concat_chunk(k_buf, k_l), _concat_chunk(v_buf, v)  # [B, W + T, K, H]
        return attend(q_l, keys, vals, ctx["mask_local_chunk"], cfg.attn_scale, cfg.attn_logit_softcap, dpa)

    def global_(kl, vl, kg, vg):
        q_g, k_g = rot["global"]
        k_buf, v_buf = _index(kg, gi), _index(vg, gi)  # [B, S, K, H]
        if T > 1:  # the write comes after: attend over a written copy of this layer's slice
            write = lambda buf, new: kvc.write(buf, new, ctx["slots_global"], ctx["by_row"])
            k_buf, v_buf = write(k_buf, k_g), write(v_buf, v)
        if "mask_global" not in ctx:  # a prefill chunk over a long cache: one key block at a time
            return attend_blocked(q_g, k_buf, v_buf, ctx["positions"], ctx["pos_global"], cfg.attn_scale,
                                  ctx["key_block"], cfg.attn_logit_softcap)
        if T == 1:
            return decode_global(q_g, k_buf, v_buf, ctx["positions"], ctx["pos_global"], ctx["mask_global"],
                                 cfg.attn_scale, cfg.attn_logit_softcap, paths.decode_attention, paths.decode_block)
        return attend(q_g, k_buf, v_buf, ctx["mask_global"], cfg.attn_scale, cfg.attn_logit_softcap, dpa)

    if T == 1:
        kl, vl, kg, vg = write(kl, vl, kg, vg)
    if both and static:
        o = (global_ if is_global else local)(kl, vl, kg, vg)
    elif both:  # the layer kind is data here: one branch runs
        o = jax.lax.cond(is_global, global_, local, kl, vl, kg, vg)
    else:
        o = (local if cfg.n_local else global_)(kl, vl, kg, vg)
    if T > 1:
        kl, vl, kg, vg = write(kl, vl, kg, vg)
    B, _, N, H = o.shape
    wo = lp.wo if isinstance(lp.wo, quant.QMatrix) else lp.wo.reshape(N * H, -1)  # [N * H, D]
    o = lora("o", o.reshape(B, T, N * H), _matmul(o.reshape(B, T, N * H), wo, dequant=dq))  # [B, T, D]
    if cfg.sandwich_norm:
        o = rms_norm(o, lp.post_attn_norm, eps)
    x = x + o

    h = rms_norm(x, lp.ffn_norm, eps)
    if cfg.n_experts:  # mixture of experts: the chosen experts only (jaxgen.moe)
        o = moe.mlp(cfg, h, lp, None if paths.moe == "auto" else paths.moe)  # [B, T, D]
    else:
        gate = lora("gate", h, _matmul(h, lp.w_gate, dequant=dq))  # [B, T, F]
        up = lora("up", h, _matmul(h, lp.w_up, dequant=dq))  # [B, T, F]
        act = moe.activation(cfg, gate) * up
        o = lora("down", act, _matmul(act, lp.w_down, dequant=dq))  # [B, T, D]
    if cfg.sandwich_norm:
        o = rms_norm(o, lp.post_ffn_norm, eps)
    return (x + o, kl, vl, kg, vg), None


def _pin(stacks: tuple, shardings: tuple | None) -> tuple:
    """The cache stacks held in their shardings (None: left to the compiler) as they enter each layer
    and after its write (either pin alone left the gathers in). Why: where the kv heads do not divide
    the mesh's `model` axis the rules replicate the cache, but GSPMD wrote it split by the kv-head
    groups of the query heads that attend it, then all-gathered every stack whole where the decode
    loop's carry pins it: the whole KV cache crossed the mesh every step (2 kv heads, 4 query heads on
    a data=2,model=4 mesh; tests/test_sharding.py)."""
    if shardings is None:
        return tuple(stacks)
    return jax.tree.map(jax.lax.with_sharding_constraint, tuple(stacks), tuple(shardings))


def forward_hidden(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                   cfg: ModelConfig, key_block: int = 0, paths: backend.Paths | None = None,
                   stack_shardings: tuple | None = None) -> tuple[jax.Array, KVCache]:
    """Final-normed hidden states [B, T, D] and the updated cache.

    tokens, positions: [B, T] int32. Within a row, valid positions are contiguous and ascending
    (the row's next positions); -1 marks padding, which is neither written nor attended.
    key_block > 0 (static): a multi-token call attends global layers `attend_blocked`, one block of
    that many cache slots at a time, when the cache is longer (prefill chunks; see `prefill_hidden`).
    paths (static): jaxgen.backend's implementation choices (None: the default backend's).
    stack_shardings: on a mesh, the NamedShardings of cache.stacks() (`sharding.stack_shardings`),
    which the cache keeps from layer to layer (`_pin`); None: as the compiler propagates them.

    Stacked layers run as one `lax.scan` with one layer per step; the layer kind (local ring /
    global cache) is then data, chosen by `lax.cond`. (A Python loop over static slices of the
    stacked arrays, or a scan over groups of one local/global period, copied every weight slice:
    4-6x slower.) A tuple of per-layer params runs as an unrolled loop over separate arrays.
    """
    B, T = tokens.shape
    if isinstance(params.embed, quant.QMatrix):  # the [D, V] QMatrix: take columns
        x = quant.take_columns(params.embed, tokens)  # [B, T, D]
    else:
        x = jnp.take(params.embed, tokens, axis=0)  # [B, T, D]: rows of the [V, D] table
    x = x * jnp.asarray(cfg.embed_multiplier, x.dtype) if cfg.embed_scale else x

    lengths = kvc.new_lengths(cache.lengths, positions)  # [B]
    W, S = cache.window_slots, cache.max_len
    ctx = {"rope_global": rope_tables(positions, rope_frequencies(cfg)),
           "slots_global": kvc.slots_for(positions, lengths, S), "paths": backend.resolve(paths),
           "by_row": stack_shardings is not None}  # on a mesh: cache writes that stay on each device's rows
    pos_global = kvc.write(cache.pos_global, positions, ctx["slots_global"], ctx["by_row"])  # [B, S]
    ctx.update(positions=positions, pos_global=pos_global)
    if T > 1 and 0 < key_block < S:  # no [B, T, S] mask either
        ctx["key_block"] = key_block
    else:
        ctx["mask_global"] = kvc.attention_mask(positions, pos_global, 0)  # [B, T, S]
    pos_local = cache.pos_local
    if cfg.n_local:
        window = cfg.sliding_window
        ctx["rope_local"] = rope_tables(positions, rope_frequencies(cfg, local=True))
        ctx["slots_local"] = kvc.slots_for(positions, lengths, W)
        if T > 1:  # keys: the old ring, then the chunk
            # Ring slots past the row's length are stale (speculative decoding rolls a row back by
            # its length and leaves rejected keys in place): hide them; the chunk rewrites them.
            old = jnp.where(pos_local < cache.lengths[:, None], pos_local, -1)
            chunk_pos = jnp.concatenate([old, positions], axis=1)  # [B, W + T]
            ctx["mask_local_chunk"] = kvc.attention_mask(positions, chunk_pos, window)
        pos_local = kvc.write(pos_local, positions, ctx["slots_local"], ctx["by_row"])  # [B, W]
        ctx["mask_local"] = kvc.attention_mask(positions, pos_local, window)

    if params.lora is not None:  # each row's adapter slot: the cache row's (see jaxgen.lora)
        if cache.adapter is None:
            raise ValueError("params carry a LoRA table (params.lora) but the cache names no adapter per row: "
                             "set cache.adapter [B] (0 = none), as engine.start(adapters=...) does")
        ctx["lora_rows"] = cache.adapter
    elif cache.adapter is not None:
        raise ValueError("the cache names a LoRA adapter per row (cache.adapter) but params carry no LoRA table "
                         "(params.lora): its keys were computed with adapters these params do not apply")
    kinds = np.array(cfg.layer_kinds, bool)  # [L] True = global
    local_index = np.maximum(np.cumsum(~kinds) - 1, 0)  # [L] slot among the local layers (unused for global)
    global_index = np.maximum(np.cumsum(kinds) - 1, 0)
    xs = (params.layers, jnp.asarray(kinds), jnp.asarray(local_index, jnp.int32),
          jnp.asarray(global_index, jnp.int32), params.lora)
    ctx["pin"] = lambda stacks: _pin(stacks, stack_shardings)
    carry = (x, *cache.stacks())
    if isinstance(params.layers, tuple):  # one LayerParams per layer: unrolled, layer kinds static
        for i, lp in enumerate(params.layers):
            lo = jax.tree.map(lambda a: a[i], params.lora)  # the adapter table stays stacked
            carry, _ = _layer(cfg, carry, (lp, bool(kinds[i]), int(local_index[i]), int(global_index[i]), lo), ctx)
        x, *stacks = carry
    else:
        (x, *stacks), _ = jax.lax.scan(lambda c, xs: _layer(cfg, c, xs, ctx), carry, xs)

    x = rms_norm(x, params.final_norm, cfg.norm_eps)
    cache = cache.with_stacks(stacks, pos_local=pos_local, pos_global=pos_global, lengths=lengths)
    return x, cache


def prefill_hidden(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache, cfg: ModelConfig,
                   chunk: int = PREFILL_CHUNK, paths: backend.Paths | None = None,
                   stack_shardings: tuple | None = None) -> tuple[jax.Array, KVCache]:
    """Write right-padded prompts tokens [B, T] at positions [B, T] (as `forward_hidden` takes them)
    into the cache, `chunk` tokens per forward pass, and return the final-normed hidden state at each
    row's last valid position [B, D] (what the first new token is sampled from) with the cache.

    Why chunks: one pass over T tokens holds [T, .] activations and, for global layers, [T, S]
    scores: time and memory grew with the square of the prompt (16k tokens: 18 GB). A chunk attends
    the ring plus itself on local layers and global keys in blocks of 2 x chunk slots
    (`attend_blocked`), so the peak is the cache plus O(chunk x block), whatever the prompt length.
    Exact: chunked attention is the same softmax, evaluated in another order (float rounding only)."""
    B = tokens.shape[0]
    last = jnp.argmax(positions, axis=1)  # [B] column of each row's last valid token (0 if none)

    def keep_last(h_last, h, start):  # the row's last token, if it is in this chunk
        col = last - start
        here = (col >= 0) & (col < h.shape[1])
        at = jnp.take_along_axis(h, jnp.clip(col, 0, h.shape[1] - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
        return jnp.where(here[:, None], at, h_last)

    h_shape = jax.eval_shape(lambda: forward_hidden(params, tokens[:, :chunk], positions[:, :chunk], cache, cfg)[0])
    return fold_chunks(params, tokens, positions, cache, cfg, chunk, paths, keep_last,
                       jnp.zeros((B, h_shape.shape[-1]), h_shape.dtype), stack_shardings)


def fold_chunks(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache, cfg: ModelConfig,
                chunk: int, paths: backend.Paths | None, fn, carry, stack_shardings: tuple | None = None):
    """Run right-padded tokens [B, T] (positions as `forward_hidden` takes them) through the model
    `chunk` tokens per forward pass, folding each pass's hidden states into `carry`:
    carry = fn(carry, h [B, t, D], start) for the columns start .. start + t - 1. Returns (carry, cache).
    stack_shardings: as `forward_hidden` takes them.

    The chunks run in a `fori_loop` (one compiled chunk for every bucket above `chunk`) that stops
    after the last chunk holding a valid token of some row (a bucket's padding costs nothing); T <= chunk
    is one pass. `prefill_hidden` keeps each row's last hidden state, `score_spans` the spans' ones."""
    B, T = tokens.shape
    if T <= chunk:
        h, cache = forward_hidden(params, tokens, positions, cache, cfg, key_block=2 * chunk, paths=paths,
                                  stack_shardings=stack_shardings)
        return fn(carry, h, 0), cache
    n = -(-T // chunk)
    if n * chunk > T:  # T is a bucket, a multiple of power-of-two chunks; other chunk sizes pad
        tokens = jnp.pad(tokens, ((0, 0), (0, n * chunk - T)))
        positions = jnp.pad(positions, ((0, 0), (0, n * chunk - T)), constant_values=-1)
    used = jnp.max(jnp.where(positions >= 0, jnp.arange(n * chunk)[None, :], 0)) // chunk + 1  # chunks with a valid token

    def run(i, state):
        carry, cache = state
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1)  # [B, chunk]
        h, cache = forward_hidden(params, take(tokens), take(positions), cache, cfg, key_block=2 * chunk,
                                  paths=paths, stack_shardings=stack_shardings)
        return fn(carry, h, i * chunk), cache

    return jax.lax.fori_loop(0, used, run, (carry, cache))


def unembed(params: Params, h: jax.Array, cfg: ModelConfig, paths: backend.Paths | None = None) -> jax.Array:
    """Logits [..., V] in f32 from hidden states [..., D] and the [V, D] table (or its [D, V] QMatrix)."""
    table = params.embed if cfg.tie_embeddings else params.unembed
    if isinstance(table, quant.QMatrix):
        logits = quant.matmul(h.astype(jnp.float32), table, jnp.dtype(backend.resolve(paths).dequant))
    else:
        logits = _unembed_dot(h.reshape(-1, h.shape[-1]), table).reshape(*h.shape[:-1], table.shape[0])
    if cfg.final_logit_softcap:
        logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    return logits


def _unembed_dot(h: jax.Array, table: jax.Array) -> jax.Array:
    """h [M, D] contracted with the [V, D] table's D -> [M, V] f32 (f32 accumulation, as `_matmul`).
    One row is the decode step at batch 1, where XLA:CPU is slowest (measured 2026-12-06, Gemma 3's
    table): a bfloat16 row takes the two-row path (`_rows_for`), and a float32 one is written
    table @ h (26 ms against 27-32 for h @ table^T)."""
    contract_d = (((1,), (1,)), ((), ()))
    if h.shape[0] == 1 and table.dtype != jnp.bfloat16 and jax.default_backend() == "cpu":
        return jax.lax.dot_general(table, h, contract_d, preferred_element_type=jnp.float32).T  # [V, 1] -> [1, V]
    y = jax.lax.dot_general(_rows_for(h, table.dtype), table, contract_d, preferred_element_type=jnp.float32)
    return y[:h.shape[0]]


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            cfg: ModelConfig, paths: backend.Paths | None = None) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] (f32) for tokens [B, T] at positions [B, T], and the updated cache.

    Pure: the cache goes in and comes out. `cfg` and `paths` (jaxgen.backend) are static; everything
    else is traced.
    """
    h, cache = forward_hidden(params, tokens, positions, cache, cfg, paths=paths)
    return unembed(params, h, cfg, paths), cache


def score(params: Params, tokens: jax.Array, lengths: jax.Array, cfg: ModelConfig,
          adapters: jax.Array | None = None) -> jax.Array:
    """Teacher-forced log-probabilities [B, T-1] of tokens[:, 1:] given the tokens before them, for
    right-padded sequences tokens [B, T] of per-row lengths [B] (0 past a row's end).

    Pure and differentiable in params (policy-gradient losses take grad of it); it equals the
    `logprobs` generate reports for the tokens it sampled (raw model, before sampling transforms).
    adapters [B] int32: each row's slot in params.lora (with a LoRA table; 0 = none)."""
    from jaxgen.cache import init_cache

    B, T = tokens.shape
    idx = jnp.arange(T)[None, :]
    positions = jnp.where(idx < lengths[:, None], idx, -1).astype(jnp.int32)  # [B, T]
    cache = init_cache(cfg, B, T, params.embed.dtype)
    if adapters is not None:
        cache = cache.replace(adapter=jnp.asarray(adapters, jnp.int32))
    h, _ = forward_hidden(params, tokens, positions, cache, cfg)
    logits = unembed(params, h[:, :-1], cfg)  # [B, T-1, V] predicting tokens[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    return jnp.where(idx[:, 1:] < lengths[:, None], picked, 0.0)


def score_spans(params: Params, tokens: jax.Array, targets: jax.Array, first: jax.Array, lengths: jax.Array,
                cfg: ModelConfig, chunk: int = PREFILL_CHUNK, paths: backend.Paths | None = None,
                adapters: jax.Array | None = None, piece_logits: int = 2 ** 27) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced log-likelihood of K continuations per row: for right-padded tokens [B, T] of
    lengths [B], continuation k of row b is the columns first[b, k] <= i < lengths[b] (first [B, K]),
    its tokens targets[b, k, j] the ones that follow column base[b] + j (targets [B, K, C], aligned at
    the row's earliest span start base = min_k first[b, k]; C >= lengths - base). Returns the summed
    log-probability [B, K] of each continuation and whether each of its tokens is the argmax [B, K] bool
    (lm-eval's is-greedy: the continuation is what greedy decoding gives). An unused k: first = lengths.

    K > 1 is lm-eval's multiple choice: choices that share every input token but the last (one-token
    answers, say) are one row, one forward, their targets picked from the same log-probs.
    Only the spans' columns are unembedded: the forward runs `chunk` tokens at a time (`fold_chunks`),
    keeping the hidden states [B, C, D] of columns base .. base + C - 1; their logits are then made a few
    columns at a time (at most piece_logits per piece, static), so a 262k vocabulary at batch 32 holds
    16 columns' logits. Log-probs are float32 (`unembed`)."""
    B, T = tokens.shape
    C = targets.shape[2]
    idx = jnp.arange(T)[None, :]
    positions = jnp.where(idx < lengths[:, None], idx, -1).astype(jnp.int32)  # [B, T]
    cache = kvc.init_cache(cfg, B, T, params.embed.dtype)
    if adapters is not None:
        cache = cache.replace(adapter=jnp.asarray(adapters, jnp.int32))
    base = jnp.min(first, axis=1)  # [B]
    cols = base[:, None] + jnp.arange(C)[None, :]  # [B, C] the columns kept

    def keep_span(hs, h, start):  # the kept columns' hidden states that lie in this chunk
        local = cols - start
        here = (local >= 0) & (local < h.shape[1])
        got = jnp.take_along_axis(h, jnp.clip(local, 0, h.shape[1] - 1)[..., None], axis=1)  # [B, C, D]
        return jnp.where(here[..., None], got, hs)

    h_shape = jax.eval_shape(lambda: forward_hidden(params, tokens[:, :1], positions[:, :1], cache, cfg)[0])
    hs, _ = fold_chunks(params, tokens, positions, cache, cfg, chunk, paths, keep_span,
                        jnp.zeros((B, C, h_shape.shape[-1]), h_shape.dtype))
    m = (cols[:, None, :] >= first[:, :, None]) & (cols[:, None, :] < lengths[:, None, None])  # [B, K, C]
    s = math.gcd(C, 2 ** int(math.log2(max(1, piece_logits // (B * cfg.vocab_size)))))  # columns per piece
    split = lambda a: jnp.moveaxis(a.reshape(*a.shape[:-1], C // s, s), -2, 0)  # [..., C] -> [C/s, ..., s]

    def piece(args):
        hh, tt, mm = args  # [B, s, D], [B, K, s], [B, K, s]
        logits = unembed(params, jnp.moveaxis(hh, -1, 1), cfg, paths)  # [B, s, V] f32
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.swapaxes(jnp.take_along_axis(logp, jnp.swapaxes(tt, 1, 2), axis=2), 1, 2)  # [B, K, s]
        hit = jnp.argmax(logits, axis=-1)[:, None, :] == tt  # [B, K, s]
        return jnp.sum(jnp.where(mm, picked, 0.0), axis=-1), jnp.all(jnp.where(mm, hit, True), axis=-1)

    sums, hits = jax.lax.map(piece, (split(jnp.moveaxis(hs, 1, -1)), split(targets), split(m)))  # [C/s, B, K]
    return sums.sum(0), hits.all(0)
