"""Pallas kernels for the accelerator paths (jaxgen.backend chooses them; the pure-JAX path in
jaxgen.model is the fallback and the reference each is tested against, on CPU in interpret mode).

`decode_attention`: one new query token per row against a global layer's cache, reading only the
row's own live slots. Why a kernel: the einsum reads every slot of the bucket (a 40-token row in a
4,096-slot bucket reads 4,096 per layer per step), and a data-dependent loop in XLA (model.attend_blocked)
runs on GPU as a while loop whose predicate the host reads each iteration. Here the loop over key
blocks runs inside the kernel, up to each row's length, and the cache is read in its own layout
[B, S, K, H] (jax's bundled GQA decode kernel wants [B, K, S, H]: a transposed copy of the whole
cache per layer per step). The sequence is split over programs (flash-decoding), so a batch-1,
one-kv-head model still spreads over the GPU's SMs; the splits are merged by their softmax statistics.
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NEG = -1e30  # finite: a split that reads nothing merges with weight exp(NEG - max) = 0, no NaN
# key slots per loop step: at most 128, and 64 for head dim 256, so that a step's key and value tiles
# (double-buffered) fit an SM's shared memory: 2 stages x 2 x 64 x 256 x 2 bytes = 128 KB of 228
MAX_BLOCK = 128
BLOCK_ELEMS = 128 * 128  # slots x head dim per tile
TARGET_PROGRAMS = 256  # (row, kv head, split) programs to aim for: about two per SM of an H100 / H200


@functools.cache
def available() -> bool:
    """Whether this jax has Pallas's Triton backend, which the kernel is written for (plgpu.dot; also in
    interpret mode). JAX 0.11 deprecated that backend (a DeprecationWarning at each lowering) and says a
    later version removes it: without it the model takes the pure-JAX path rather than failing."""
    try:
        importlib.import_module("jax.experimental.pallas.triton")
    except ImportError:
        return False
    return True


def decode_supported(S: int, H: int, k) -> bool:
    """Whether `decode_attention` takes this layer: a float cache (int8 pairs take the XLA path),
    power-of-two head dims (Triton's tiles), a bucket that splits into blocks of >= 16 slots, and a jax
    that has the Triton backend (`available`)."""
    return not isinstance(k, tuple) and S % 16 == 0 and H >= 16 and H & (H - 1) == 0 and available()


def _block(S: int, H: int) -> int:
    """The largest power of two <= MAX_BLOCK and <= BLOCK_ELEMS / H that divides S (>= 16: S % 16 == 0)."""
    b = max(16, min(MAX_BLOCK, BLOCK_ELEMS // H))
    while S % b:
        b //= 2
    return b


def _kernel(q_ref, k_ref, v_ref, n_ref, o_ref, m_ref, l_ref, *, block, span, scale, softcap, f32):
    """One (row, kv head, split) program. q_ref [Gp, H]; k_ref / v_ref [span, H] (this split's slots
    of the row's kv head); n_ref [] the row's live slots; o_ref [Gp, H] unnormalized output, m_ref /
    l_ref [Gp] the running max and sum (flash attention's statistics) for the merge."""
    from jax.experimental.pallas import triton as plgpu

    start = pl.program_id(2) * span
    todo = jnp.clip(n_ref[...] - start, 0, span)  # this split's live slots
    q = q_ref[...]
    Gp, H = q.shape
    tf32 = False if f32 else None  # f32 caches: full-precision dots (TF32 would round them)

    def body(i, carry):
        o, m, l = carry
        sl = pl.ds(i * block, block)
        s = plgpu.dot(q, k_ref[sl, :], trans_b=True, allow_tf32=tf32).astype(jnp.float32) * scale  # [Gp, block]
        if softcap:
            s = softcap * jnp.tanh(s / softcap)
        live = (i * block + jnp.arange(block)) < todo
        s = jnp.where(live[None, :], s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # Every block read holds a live slot (the loop stops at `todo`), so after the first block
        # m_new is a real score and masked slots weigh exp(NEG - m_new) = 0.
        p = jnp.exp(s - m_new[:, None])
        corr = jnp.exp(m - m_new)
        v = v_ref[sl, :]
        pv = plgpu.dot(p.astype(v.dtype), v, allow_tf32=tf32).astype(jnp.float32)  # [Gp, H]
        return o * corr[:, None] + pv, m_new, l * corr + jnp.sum(p, axis=1)

    init = (jnp.zeros((Gp, H), jnp.float32), jnp.full((Gp,), NEG, jnp.float32), jnp.zeros((Gp,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, pl.cdiv(todo, block), body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "interpret", "splits"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array, *, scale: float,
                     softcap: float = 0.0, interpret: bool = False, splits: int = 0) -> jax.Array:
    """q [B, 1, N, H] (one new token per row), k / v [B, S, K, H] with slot s holding position s
    (global layers), kv_len [B] the live slots of each row (its query position + 1; 0 = a finished
    row, whose output is 0) -> [B, 1, N, H]; scores softcap * tanh(s / softcap) when softcap > 0.
    Equals model.attend with the causal mask of those positions (float rounding only).
    splits: programs per (row, kv head) along the cache (0: chosen from the batch and heads)."""
    B, _, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    Gp = max(16, pl.next_power_of_2(G))  # Triton's dots need >= 16 rows: zero query rows pad G
    block = _block(S, H)
    if not splits:
        splits = 1
        while (S // block) % (splits * 2) == 0 and B * K * splits * 2 <= TARGET_PROGRAMS:
            splits *= 2
    if S % splits or (S // splits) % 16:
        raise ValueError(f"splits={splits} must cut the {S} slots into spans of a multiple of 16")
    span = S // splits
    qg = jnp.pad(q.reshape(B, K, G, H), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))  # [B, K, Gp, H]
    kernel = functools.partial(_kernel, block=_block(span, H), span=span, scale=scale, softcap=softcap,
                               f32=q.dtype == jnp.float32)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
    o, m, l = pl.pallas_call(
        kernel, grid=(B, K, splits),
        in_specs=[pl.BlockSpec((None, None, Gp, H), lambda b, h, j: (b, h, 0, 0)),
                  pl.BlockSpec((None, span, None, H), lambda b, h, j: (b, j, h, 0)),
                  pl.BlockSpec((None, span, None, H), lambda b, h, j: (b, j, h, 0)),
                  pl.BlockSpec((None,), lambda b, h, j: (b,))],
        out_specs=[pl.BlockSpec((None, None, None, Gp, H), lambda b, h, j: (b, h, j, 0, 0)),
                   pl.BlockSpec((None, None, None, Gp), lambda b, h, j: (b, h, j, 0)),
                   pl.BlockSpec((None, None, None, Gp), lambda b, h, j: (b, h, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, K, splits, Gp, H), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, splits, Gp), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, splits, Gp), jnp.float32)],
        interpret=interpret, name="jaxgen_decode_attention", **params,
    )(qg, k, v, kv_len.astype(jnp.int32))
    # merge the splits: weights exp(m_j - max m) on each split's unnormalized output and sum
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # [B, K, splits, Gp]
    num = jnp.sum(o * w[..., None], axis=2)  # [B, K, Gp, H]
    den = jnp.sum(l * w, axis=2)  # [B, K, Gp]
    out = num / jnp.where(den > 0, den, 1.0)[..., None]
    return out[:, :, :G].reshape(B, 1, N, H).astype(q.dtype)
