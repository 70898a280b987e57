"""Weight-only quantization (int8 / int4) as pure functions over a quantized param pytree.

A quantized weight is a `QMatrix`: the matrix w [..., I, O] of `y = x @ w` stored as integers plus one
scale per group of `group` consecutive inputs and per output column:

  int8 (symmetric):         w[i, o] ~= q[i, o] * scale[i // group, o],                 q in [-127, 127]
  int4 (min-max per group): w[i, o] ~= u[i, o] * scale[i // group, o] + zero[i // group, o], u in [0, 15]

group == I is per output channel; the default is groups of 32 for both, as GGUF's blocks (on Gemma 3
270M int8 per channel had 5x the KL divergence of groups of 32 at the same speed; min-max int4 had 37%
less weight error than symmetric). GGUF Q8_0 is exactly int8 in groups of 32 along the input axis, so
it loads as a QMatrix without a float round trip. int4 is packed two per byte along I: row i in the low
nibble, row i + I/2 in the high one. Why halves and not neighbouring rows: unpacking is two contiguous
slabs and the matmul splits x in two, where interleaving rows cost more than the int4 read saved.

`quantize_params` swaps the big matrices for QMatrix leaves (the projections in their 2-D [in, out]
form, a mixture-of-experts layer's expert matrices as [E, in, out], the float [V, D] embedding
transposed to its [D, V] unembedding orientation, groups along D, whose columns also serve the lookup);
norms, biases and routers stay float.
`model.py` dispatches on the leaf type; the matmul dequantizes on the fly with f32 accumulation.
Scales are stored in the model's compute dtype. (The int8 KV cache is in `cache.py`.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

MODES = ("int8", "int4")
FORMAT = 1  # bumped when the quantized layout changes (cached conversions are keyed on it)
DEFAULT_GROUP = {"int8": 32, "int4": 32}  # 0 = per output channel (group = I)
# Outputs per block of the CPU matmul: XLA:CPU does not fuse an int8->float convert into its dot, so a
# whole dequantized 262k x 640 unembedding would be written and read back in f32 every step; column
# blocks keep each dequantized block in cache.
CPU_BLOCK = 2048


@struct.dataclass
class QMatrix:
    q: jax.Array  # int8 [..., I, O]; int4: uint8 [..., I/2, O] (two inputs per byte)
    scale: jax.Array  # [..., I/group, O] compute dtype
    zero: jax.Array | None = None  # [..., I/group, O] int4 only: the group's minimum (w = u * scale + zero)
    bits: int = struct.field(pytree_node=False, default=8)

    @property
    def shape(self) -> tuple:
        *lead, i, o = self.q.shape
        return (*lead, i * (2 if self.bits == 4 else 1), o)

    @property
    def group(self) -> int:
        return self.shape[-2] // self.scale.shape[-2]

    @property
    def dtype(self):  # the compute dtype (what the float weight it replaces would have had)
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        return int(sum(a.size * a.dtype.itemsize for a in (self.q, self.scale, self.zero) if a is not None))


def group_for(I: int, group: int, bits: int) -> int:
    """The group actually used for an input dim I: `group` (0 = I) or, when it does not divide I, the
    largest divisor of I below it (even for int4, which packs pairs of inputs)."""
    g = group or I
    if bits == 4 and I % 2:
        raise ValueError(f"quantize: int4 needs an even input dim, got {I}")
    span = I if bits == 8 else I // 2  # int4 groups must not straddle the two packed halves
    for cand in range(min(g, span), 0, -1):
        if span % cand == 0:
            return cand
    raise AssertionError("unreachable")


def quantize(w, bits: int = 8, group: int = 0, dtype=None) -> QMatrix:
    """QMatrix of w [..., I, O] (numpy or jax; numpy stays on the host). group 0 = per output channel."""
    xp = np if isinstance(w, np.ndarray) else jnp
    if xp is np and w.shape[-1] > 16384:  # in column chunks: the f32 temporaries stay small
        parts = [quantize(w[..., i:i + 16384], bits, group, dtype) for i in range(0, w.shape[-1], 16384)]
        cat = lambda f: None if getattr(parts[0], f) is None else np.concatenate([getattr(p, f) for p in parts], -1)
        return QMatrix(q=cat("q"), scale=cat("scale"), zero=cat("zero"), bits=bits)
    *lead, I, O = w.shape
    if bits not in (4, 8):
        raise ValueError(f"quantize: bits must be 4 or 8, got {bits}")
    g = group_for(I, group, bits)
    wg = w.astype(xp.float32).reshape(*lead, I // g, g, O)
    dtype = dtype or (w.dtype if w.dtype != xp.int8 else xp.float32)
    if bits == 8:
        scale = xp.max(xp.abs(wg), axis=-2) / xp.float32(127)  # [..., I/g, O]
        safe = xp.where(scale > 0, scale, xp.float32(1))[..., None, :]
        # Division, not a multiply by 1/scale: exact in IEEE on host and device, so both round alike.
        q = xp.clip(xp.round(wg / safe), -127, 127).reshape(*lead, I, O).astype(xp.int8)
        return QMatrix(q=q, scale=scale.astype(dtype), bits=8)
    lo, hi = xp.min(wg, axis=-2), xp.max(wg, axis=-2)  # [..., I/g, O]
    scale = (hi - lo) / xp.float32(15)
    safe = xp.where(scale > 0, scale, xp.float32(1))[..., None, :]
    u = xp.clip(xp.round((wg - lo[..., None, :]) / safe), 0, 15).reshape(*lead, I, O).astype(xp.uint8)
    q = u[..., :I // 2, :] | (u[..., I // 2:, :] << 4)  # [..., I/2, O]
    return QMatrix(q=q, scale=scale.astype(dtype), zero=lo.astype(dtype), bits=4)


def _values(w: QMatrix, dtype):
    """The integer values of w.q as `dtype` [..., I, O] (int4 unpacked)."""
    if w.bits == 8:
        return w.q.astype(dtype)
    return jnp.concatenate(_halves(w.q, dtype), axis=-2)  # rows [0, I/2) then [I/2, I)


def _halves(q, dtype):
    """The two int4 slabs of packed q [..., I/2, O]: rows [0, I/2) and [I/2, I), as `dtype`."""
    return (q & 15).astype(dtype), (q >> 4).astype(dtype)


def dequantize(w: QMatrix, dtype=None) -> jax.Array:
    """The float matrix [..., I, O] a QMatrix stands for."""
    dtype = dtype or w.dtype
    v = _values(w, jnp.float32)
    *lead, I, O = v.shape
    g = w.group
    out = v.reshape(*lead, I // g, g, O) * w.scale.astype(jnp.float32)[..., None, :]
    if w.zero is not None:
        out = out + w.zero.astype(jnp.float32)[..., None, :]
    return out.reshape(*lead, I, O).astype(dtype)


def _dot_block(x2: jax.Array, w: QMatrix, dt=jnp.float32) -> jax.Array:
    """x2 [M, I] @ w [I, O] with f32 accumulation, the weights dequantized to `dt` (float32, or
    bfloat16 on accelerators: jaxgen.backend's `dequant`, so the dot runs on the tensor cores / MXU;
    x2 is rounded to `dt` too). Per-channel int8 scales the output (one multiply per output);
    grouped scales are applied to the weights before the dot; int4 is two dots over the halves."""
    x2 = x2.astype(dt)
    if w.bits == 4:
        O = w.shape[-1]
        g, half = w.group, w.shape[-2] // 2
        y = 0.0
        f32 = lambda a: a.astype(jnp.float32)[:, None, :]
        for part, xs, sc, z in zip(_halves(w.q, jnp.float32), (x2[:, :half], x2[:, half:]),
                                   (w.scale[:half // g], w.scale[half // g:]), (w.zero[:half // g], w.zero[half // g:])):
            wf = (part.reshape(half // g, g, O) * f32(sc) + f32(z)).reshape(half, O).astype(dt)
            y = y + jnp.dot(xs, wf, preferred_element_type=jnp.float32)
        return y
    if w.group == w.shape[-2]:
        y = jnp.dot(x2, _values(w, dt), preferred_element_type=jnp.float32)
        return y * w.scale[0].astype(jnp.float32)
    return jnp.dot(x2, dequantize(w, dt), preferred_element_type=jnp.float32)


def matmul(x: jax.Array, w: QMatrix, dequant=jnp.float32) -> jax.Array:
    """x [..., I] @ w [I, O] -> [..., O] in x.dtype, dequantizing on the fly to `dequant` (f32
    accumulation).

    On CPU a matrix with many outputs runs as a loop over column blocks (see CPU_BLOCK); on GPU/TPU
    XLA fuses the dequantization into the dot, so it is one dot."""
    I, O = w.shape
    x2 = x.reshape(-1, x.shape[-1])
    nb = O // CPU_BLOCK if jax.default_backend() == "cpu" and O % CPU_BLOCK == 0 else 1
    if nb <= 1:
        y = _dot_block(x2, w, dequant)
    else:
        # Slice each block out by index inside the loop (a reshape + swapaxes of the whole matrix
        # would copy it every call: measured 160 ms per step for Gemma's unembedding).
        def block(i):
            b = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i * CPU_BLOCK, CPU_BLOCK, axis=-1), w)
            return _dot_block(x2, b, dequant)

        y = jax.lax.map(block, jnp.arange(nb))  # [nb, M, CPU_BLOCK]
        y = y.swapaxes(0, 1).reshape(x2.shape[0], O)
    return y.reshape(*x.shape[:-1], O).astype(x.dtype)


def take_columns(w: QMatrix, idx: jax.Array) -> jax.Array:
    """Dequantized columns w[:, idx] as [*idx.shape, I]: the embedding lookup from the [D, V] table."""
    cols = jax.tree.map(lambda a: jnp.take(a, idx.reshape(-1), axis=-1), w)  # [I', n] each
    return dequantize(cols).T.reshape(*idx.shape, w.shape[-2])


# ---- params --------------------------------------------------------------------------------------
LAYER_MATS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
MOE_MATS = ("we_gate", "we_up", "we_down")  # [L, E, I, O] as they are (per expert); the router stays float


def present(layers, names) -> list[str]:
    """The matrices of `names` a layer has (a dense layer has no expert matrices, an MoE layer no w_up)."""
    return [n for n in names if getattr(layers, n) is not None]


def matrix_shape(name: str, shape: tuple) -> tuple:
    """The 2-D matmul form [L, I, O] of a layer weight's shape (wq [L, D, N, H] -> [L, D, N*H];
    wo [L, N, H, D] -> [L, N*H, D])."""
    L = shape[0]
    if name == "wo":
        return L, int(np.prod(shape[1:-1])), shape[-1]
    return L, shape[1], int(np.prod(shape[2:]))


def as_matrix(name: str, w):
    """A layer weight [L, ...] in its 2-D matmul form (see matrix_shape); the model reshapes the
    outputs back to heads."""
    return w.reshape(matrix_shape(name, w.shape))


def quantize_params(params, mode: str = "int8", group: int | None = None):
    """Params with every projection matrix and the embedding (tied unembedding) as QMatrix leaves.
    Norms and biases stay float. Works on host numpy params (nothing is placed on a device) or on
    device arrays. mode: "int8" or "int4", in groups of `group` inputs (default 32; 0 = per output
    channel)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {MODES}")
    if isinstance(params.layers, tuple):  # per-layer params come back stacked: see model.unstack_layers
        # (model.stack_layers, written out: quant is below model, which imports it)
        stack = jnp.stack if isinstance(jax.tree.leaves(params.layers)[0], jax.Array) else np.stack
        return quantize_params(params.replace(layers=jax.tree.map(lambda *a: stack(a), *params.layers)), mode, group)
    bits = 8 if mode == "int8" else 4
    group = DEFAULT_GROUP[mode] if group is None else group
    lp = params.layers
    layers = lp.replace(**{n: quantize(as_matrix(n, getattr(lp, n)), bits, group) for n in present(lp, LAYER_MATS)},
                        **{n: quantize(getattr(lp, n), bits, group) for n in present(lp, MOE_MATS)})
    table = lambda t: t if t is None or isinstance(t, QMatrix) else quantize(t.T, bits, group)  # T:vd_dv
    embed, unembed = table(params.embed), table(params.unembed)
    return params.replace(embed=embed, layers=layers, unembed=unembed)


def is_quantized(params) -> bool:
    return isinstance(params.embed, QMatrix)


def quant_mode(params) -> str | None:
    """"int8" / "int4" for quantized params, None for float ones."""
    if not is_quantized(params):
        return None
    return "int8" if params.embed.bits == 8 else "int4"


def param_bytes(params) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def groups_of(params) -> dict:
    """{matrix name: group} of quantized params (0 = per output channel), for `quantized_shapes`."""
    layers = params.layers[0] if isinstance(params.layers, tuple) else params.layers
    mats = {n: getattr(layers, n) for n in present(layers, LAYER_MATS + MOE_MATS)}
    mats["embed"] = params.embed
    if params.unembed is not None:
        mats["unembed"] = params.unembed
    return {n: (0 if m.group == m.shape[-2] else m.group) for n, m in mats.items()}


def quantized_shapes(shapes, mode: str, groups: dict | None = None):
    """ShapeDtypeStructs of quantized params for float param shapes (for Orbax restore targets).
    groups: {matrix name: group} where it differs from the mode's default (a GGUF Q8_0 tensor keeps
    its groups of 32)."""
    dt = shapes.embed.dtype
    bits = 8 if mode == "int8" else 4
    groups = groups or {}
    group = DEFAULT_GROUP[mode]

    def qshape(shape, group=group):  # shape of the [.., I, O] matrix
        *lead, I, O = shape
        g = group_for(I, group, bits)
        sc = jax.ShapeDtypeStruct((*lead, I // g, O), dt)
        return QMatrix(q=jax.ShapeDtypeStruct((*lead, I // (2 if bits == 4 else 1), O), jnp.int8 if bits == 8 else jnp.uint8),
                       scale=sc, zero=sc if bits == 4 else None, bits=bits)

    lp = shapes.layers
    layers = lp.replace(**{n: qshape(matrix_shape(n, getattr(lp, n).shape), groups.get(n, group))
                           for n in present(lp, LAYER_MATS)},
                        **{n: qshape(getattr(lp, n).shape, groups.get(n, group)) for n in present(lp, MOE_MATS)})
    V, D = shapes.embed.shape  # the float [V, D] tables are quantized as [D, V] (quantize_params)
    unembed = None if shapes.unembed is None else qshape((D, V), groups.get("unembed", group))
    return shapes.replace(embed=qshape((D, V), groups.get("embed", group)), layers=layers, unembed=unembed)
