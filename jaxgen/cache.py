"""The KV cache: an explicit pytree that goes into `forward` and comes back out.

Every layer kind keeps a ring buffer of key/value slots plus, per row, the position held in each slot:

- global layers: S slots (the cache length); a position p lives in slot p, so it never wraps as long
  as positions stay below S (callers check prompt + new tokens <= S before compiling);
- sliding-window layers: W = min(window + extra, S) slots; position p lives in slot p % W. Gemma 3
  270M has 15 of 18 layers with a 512 window, so at long lengths the cache is ~6x smaller than a
  full-length buffer for every layer. `extra` slots let a caller roll back up to `extra` tokens
  (speculative decoding) without losing keys that are still inside the window.

Storing the slot positions (`pos_*`, -1 = empty) makes the attention mask a pure function of query and
key positions: key p is visible to query q iff 0 <= p <= q and (global or q - p < window).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.config import ModelConfig

NEG_INF = -1e30  # finite, so a fully masked (padding) query row gives no NaN


@struct.dataclass
class KVCache:
    k_local: jax.Array  # [Ll, B, W, K, H] keys of sliding-window layers (Ll = cfg.n_local)
    v_local: jax.Array  # [Ll, B, W, K, H]
    pos_local: jax.Array  # [B, W] int32 position held by each ring slot, -1 = empty
    k_global: jax.Array  # [Lg, B, S, K, H] keys of global layers (Lg = cfg.n_global)
    v_global: jax.Array  # [Lg, B, S, K, H]
    pos_global: jax.Array  # [B, S] int32
    lengths: jax.Array  # [B] int32 tokens written per row == the next position

    @property
    def max_len(self) -> int:
        return self.pos_global.shape[1]

    @property
    def window_slots(self) -> int:
        return self.pos_local.shape[1]


def ring_size(cfg: ModelConfig, max_len: int, extra: int = 0) -> int:
    """Slots of a sliding-window layer's ring buffer (0 when the model has no local layers)."""
    if cfg.n_local == 0:
        return 0
    return min(cfg.sliding_window + extra, max_len)


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, extra: int = 0):
    """ShapeDtypeStructs of a cache, for sizing and ahead-of-time compilation without allocating."""
    w = ring_size(cfg, max_len, extra)
    kv = lambda n, s: jax.ShapeDtypeStruct((n, batch, s, cfg.n_kv_heads, cfg.head_dim), dtype)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    return KVCache(k_local=kv(cfg.n_local, w), v_local=kv(cfg.n_local, w), pos_local=i32(batch, w),
                   k_global=kv(cfg.n_global, max_len), v_global=kv(cfg.n_global, max_len),
                   pos_global=i32(batch, max_len), lengths=i32(batch))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, extra: int = 0) -> int:
    """Bytes a cache for `batch` rows of up to `max_len` tokens will take; call it before allocating."""
    leaves = jax.tree.leaves(cache_shapes(cfg, batch, max_len, dtype, extra))
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, extra: int = 0) -> KVCache:
    """An empty cache: zero keys/values, every slot empty, every row of length 0."""
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds {cfg.name}'s max_seq_len {cfg.max_seq_len}")
    shapes = cache_shapes(cfg, batch, max_len, dtype, extra)
    return KVCache(
        k_local=jnp.zeros(shapes.k_local.shape, dtype), v_local=jnp.zeros(shapes.v_local.shape, dtype),
        pos_local=jnp.full(shapes.pos_local.shape, -1, jnp.int32),
        k_global=jnp.zeros(shapes.k_global.shape, dtype), v_global=jnp.zeros(shapes.v_global.shape, dtype),
        pos_global=jnp.full(shapes.pos_global.shape, -1, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32))


# ---- writing ------------------------------------------------------------------------------------
def new_lengths(lengths: jax.Array, positions: jax.Array) -> jax.Array:
    """[B] lengths after writing tokens at `positions` [B, T] (-1 = padding, not written)."""
    return jnp.maximum(lengths, jnp.max(positions, axis=1) + 1)


def slots_for(positions: jax.Array, lengths: jax.Array, size: int) -> jax.Array:
    """[B, T] ring slot of each new token, or `size` (dropped by the scatter) for padding and for
    tokens that a later token of the same chunk overwrites (position < new length - size)."""
    keep = (positions >= 0) & (positions >= lengths[:, None] - size)
    return jnp.where(keep, positions % max(size, 1), size)


def write(buf: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatter new [B, T, ...] into buf [B, W, ...] at slots [B, T]; out-of-range slots are dropped."""
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, slots].set(new.astype(buf.dtype), mode="drop")


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
