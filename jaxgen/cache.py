"""The KV cache: an explicit pytree that goes into `forward` and comes back out.

Every layer kind keeps a ring buffer of key/value slots plus, per row, the position held in each slot:

- global layers: S slots (the cache length); a position p lives in slot p, so it never wraps as long
  as positions stay below S (callers check prompt + new tokens <= S before compiling);
- sliding-window layers: W = min(window + extra, S) slots; position p lives in slot p % W. Gemma 3
  270M has 15 of 18 layers with a 512 window, so at long lengths the cache is ~6x smaller than a
  full-length buffer for every layer. `extra` slots let a caller roll back up to `extra` tokens
  (speculative decoding) without losing keys that are still inside the window.

With `kv_quant="int8"` keys and values are stored as int8 with one f32 scale per (row, slot, kv head)
(`quantize_kv` below): 1 byte per value plus 4 per head vector instead of 4 (f32) or 2 (bf16).
Attention applies the key scales to the scores and the value scales to the probabilities, so no
dequantized copy of the cache is made.

Storing the slot positions (`pos_*`, -1 = empty) makes the attention mask a pure function of query and
key positions: key p is visible to query q iff 0 <= p <= q and (global or q - p < window).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen import backend
from jaxgen.config import ModelConfig

NEG_INF = -1e30  # finite, so a fully masked (padding) query row gives no NaN
STACKS = ("k_local", "v_local", "k_global", "v_global")  # the key / value buffers, in carry order
SCALES = tuple(f"{n}_scale" for n in STACKS)  # their int8 scales (None unless kv_quant="int8")


@struct.dataclass
class KVCache:
    k_local: jax.Array  # [Ll, B, W, K, H] keys of sliding-window layers (Ll = cfg.n_local)
    v_local: jax.Array  # [Ll, B, W, K, H]
    pos_local: jax.Array  # [B, W] int32 position held by each ring slot, -1 = empty
    k_global: jax.Array  # [Lg, B, S, K, H] keys of global layers (Lg = cfg.n_global)
    v_global: jax.Array  # [Lg, B, S, K, H]
    pos_global: jax.Array  # [B, S] int32
    lengths: jax.Array  # [B] int32 tokens written per row == the next position
    # int8 cache only (kv_quant="int8"): one scale per stored head vector
    k_local_scale: jax.Array | None = None  # [Ll, B, W, K] f32
    v_local_scale: jax.Array | None = None  # [Ll, B, W, K]
    k_global_scale: jax.Array | None = None  # [Lg, B, S, K]
    v_global_scale: jax.Array | None = None  # [Lg, B, S, K]
    # LoRA (params.lora set): each row's adapter slot, 0 = none. A row's keys and values hold its
    # adapter's projections, so the slot travels with the row (jaxgen.lora). None: no adapters.
    adapter: jax.Array | None = None  # [B] int32

    @property
    def max_len(self) -> int:
        return self.pos_global.shape[1]

    @property
    def window_slots(self) -> int:
        return self.pos_local.shape[1]

    @property
    def quantized(self) -> bool:
        return self.k_global_scale is not None

    def stacks(self) -> tuple:
        """(k_local, v_local, k_global, v_global), each an array or, when quantized, (int8, scale)."""
        if not self.quantized:
            return tuple(getattr(self, n) for n in STACKS)
        return tuple((getattr(self, n), getattr(self, sc)) for n, sc in zip(STACKS, SCALES))

    def with_stacks(self, stacks, **changes) -> "KVCache":
        """A cache holding `stacks` (as `stacks()` returns them) and the other `changes`."""
        for n, sc, st in zip(STACKS, SCALES, stacks):
            if isinstance(st, tuple):
                changes[n], changes[sc] = st
            else:
                changes[n] = st
        return self.replace(**changes)

    def map_rows(self, f, *others: "KVCache") -> "KVCache":
        """A cache whose every per-row leaf is f(axis, leaf, *the same leaf of others), axis being the
        leaf's row axis (1 for the key / value stacks and scales [L, B, ...], 0 for positions,
        lengths and adapter slots): how n-sample copies, beam reordering and refills touch the rows,
        so none of them can forget a field."""
        row_axis = {n: 1 for n in STACKS + SCALES}
        return self.replace(**{n: f(row_axis.get(n, 0), getattr(self, n), *(getattr(o, n) for o in others))
                               for n in STACKS + SCALES + ("pos_local", "pos_global", "lengths", "adapter")
                               if getattr(self, n) is not None})


def ring_size(cfg: ModelConfig, max_len: int, extra: int = 0) -> int:
    """Slots of a sliding-window layer's ring buffer (0 when the model has no local layers)."""
    if cfg.n_local == 0:
        return 0
    return min(cfg.sliding_window + extra, max_len)


KV_QUANT = (None, "int8")


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, extra: int = 0,
                 kv_quant: str | None = None):
    """ShapeDtypeStructs of a cache, for sizing and ahead-of-time compilation without allocating."""
    if kv_quant not in KV_QUANT:
        raise ValueError(f"unknown KV cache quantization {kv_quant!r}; choose one of {KV_QUANT}")
    w = ring_size(cfg, max_len, extra)
    vdt = jnp.int8 if kv_quant == "int8" else dtype
    kv = lambda n, s: jax.ShapeDtypeStruct((n, batch, s, cfg.n_kv_heads, cfg.head_dim), vdt)
    sc = lambda n, s: jax.ShapeDtypeStruct((n, batch, s, cfg.n_kv_heads), jnp.float32) if kv_quant else None
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    return KVCache(k_local=kv(cfg.n_local, w), v_local=kv(cfg.n_local, w), pos_local=i32(batch, w),
                   k_global=kv(cfg.n_global, max_len), v_global=kv(cfg.n_global, max_len),
                   pos_global=i32(batch, max_len), lengths=i32(batch),
                   k_local_scale=sc(cfg.n_local, w), v_local_scale=sc(cfg.n_local, w),
                   k_global_scale=sc(cfg.n_global, max_len), v_global_scale=sc(cfg.n_global, max_len))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, extra: int = 0,
                kv_quant: str | None = None) -> int:
    """Bytes a cache for `batch` rows of up to `max_len` tokens will take; call it before allocating."""
    leaves = jax.tree.leaves(cache_shapes(cfg, batch, max_len, dtype, extra, kv_quant))
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, extra: int = 0,
               kv_quant: str | None = None) -> KVCache:
    """An empty cache: zero keys/values, every slot empty, every row of length 0."""
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds {cfg.name}'s max_seq_len {cfg.max_seq_len}")
    shapes = cache_shapes(cfg, batch, max_len, dtype, extra, kv_quant)
    fill = {"pos_local": -1, "pos_global": -1}
    return jax.tree_util.tree_map_with_path(lambda path, s: jnp.full(s.shape, fill.get(path[0].name, 0), s.dtype),
                                            shapes)


# ---- writing ------------------------------------------------------------------------------------
def new_lengths(lengths: jax.Array, positions: jax.Array) -> jax.Array:
    """[B] lengths after writing tokens at `positions` [B, T] (-1 = padding, not written)."""
    return jnp.maximum(lengths, jnp.max(positions, axis=1) + 1)


def padded_positions(lengths: jax.Array, T: int) -> jax.Array:
    """[B, T] positions of right-padded rows of `lengths` [B] tokens: 0..n-1, then -1 (padding)."""
    idx = jnp.arange(T)[None, :]
    return jnp.where(idx < lengths[:, None], idx, -1).astype(jnp.int32)


def slots_for(positions: jax.Array, lengths: jax.Array, size: int) -> jax.Array:
    """[B, T] ring slot of each new token, or `size` (dropped by the scatter) for padding and for
    tokens that a later token of the same chunk overwrites (position < new length - size)."""
    keep = (positions >= 0) & (positions >= lengths[:, None] - size)
    return jnp.where(keep, positions % max(size, 1), size)


def write(buf: jax.Array, new: jax.Array, slots: jax.Array, by_row: bool = False) -> jax.Array:
    """Scatter new [B, T, ...] into buf [B, W, ...] at slots [B, T]; out-of-range slots are dropped.
    A quantized buffer is an (int8, scale) pair; `new` is then quantized first. by_row: the row a
    batching dimension of the scatter (`row_scatter`), not an index: on a mesh each device then writes
    its own rows (GSPMD all-gathers indexed rows' slots and values to every device)."""
    if isinstance(buf, tuple):
        return tuple(write(b, n, slots, by_row) for b, n in zip(buf, quantize_kv(new)))
    if by_row:
        return row_scatter(buf, new, slots)
    rows = jnp.arange(buf.shape[0])[:, None]
    return bit_scatter(buf, (rows, slots), new)


def row_scatter(buf: jax.Array, new: jax.Array, slots: jax.Array, layer=None, add: bool = False) -> jax.Array:
    """buf [B, W, ...] (or a stack [L, B, W, ...] at `layer`) with new [B, T, ...] set (add: added,
    repeated slots accumulating) at each row's slots [B, T]; out-of-range slots dropped. The cache's
    writes on a mesh and every per-row write of the decode state (tokens, log-probs, penalty history).
    One scatter whose rows are a batching dimension (the operand's and the indices'), not indices:
    GSPMD then keeps each device's rows on it (with rows as indices it all-gathered every row's slots
    and values to every device), and no axis is moved (a jax.vmap of the indexed form transposed the
    whole stack, and the transposed copy was gathered across the mesh). As bit_scatter, a bfloat16
    buffer is set by its bit pattern where backend.cpu_bf16_normalized()."""
    new = new.astype(buf.dtype)
    if buf.dtype == jnp.bfloat16 and backend.cpu_bf16_normalized() and not add:
        bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)
        return jax.lax.bitcast_convert_type(row_scatter(bits(buf), bits(new), slots, layer), jnp.bfloat16)
    row = 0 if layer is None else 1  # buf's row axis
    idx = slots[..., None].astype(jnp.int32)  # [B, T, 1]: the slot
    if layer is not None:  # [B, T, 2]: (layer, slot)
        idx = jnp.concatenate([jnp.broadcast_to(jnp.asarray(layer, jnp.int32), idx.shape), idx], axis=-1)
    inserted = (row + 1,) if layer is None else (0, 2)  # the slot axis (and the layer axis): one element each
    dims = jax.lax.ScatterDimensionNumbers(
        update_window_dims=tuple(range(2, new.ndim)), inserted_window_dims=inserted,
        scatter_dims_to_operand_dims=inserted, operand_batching_dims=(row,), scatter_indices_batching_dims=(0,))
    scatter = jax.lax.scatter_add if add else jax.lax.scatter
    return scatter(buf, idx, new, dims, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def bit_scatter(buf: jax.Array, index: tuple, new: jax.Array) -> jax.Array:
    """buf.at[index].set(new) (out-of-range indices dropped). Where XLA:CPU's float-normalization-bf16
    pass is on (a user's jax.jit around jaxgen code: backend.cpu_bf16_normalized), a bfloat16 buffer is
    scattered as its uint16 bit pattern: that pass scatters bfloat16 by converting the whole buffer to f32
    and back (measured: every layer's write converted the entire 15-layer local stack, twice). Not in
    jaxgen's own programs (compiled with the pass off), which scatter bfloat16 in place: there the bit
    pattern's two conversions of each whole stack per decode step were 27% of a batch-32 Gemma 3 270M
    step (44 of 163 ms)."""
    new = new.astype(buf.dtype)
    if buf.dtype != jnp.bfloat16 or not backend.cpu_bf16_normalized():
        return buf.at[index].set(new, mode="drop")
    bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)
    out = bits(buf).at[index].set(bits(new), mode="drop")
    return jax.lax.bitcast_convert_type(out, jnp.bfloat16)


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (int8 [..., H], f32 scale [...]): one symmetric scale per head vector (per row,
    position and kv head), so a large key at one position does not coarsen the others."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x32 / safe[..., None]), -127, 127).astype(jnp.int8), scale


# ---- masking ------------------------------------------------------------------------------------
def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array:
    """[B, T, S] bool: key position k_pos [B, S] is visible to query position q_pos [B, T].

    window 0 means global (causal only); otherwise the query sees the last `window` positions,
    itself included, as in Gemma / Mistral sliding-window attention."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    visible = (k >= 0) & (k <= q)
    if window:
        visible &= q - k < window
    return visible
