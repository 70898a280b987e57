import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.cache import attention_mask, cache_bytes, init_cache, ring_size, slots_for
from jaxgen.config import load_config
from tests.conftest import TINY_GEMMA, TINY_QWEN


@pytest.mark.parametrize("cfg", [TINY_GEMMA, TINY_QWEN], ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_bytes_matches_allocation(cfg, dtype):
    c = init_cache(cfg, 3, 40, dtype)
    actual = sum(x.nbytes for x in jax.tree.leaves(c))
    assert cache_bytes(cfg, 3, 40, dtype) == actual


def test_gemma3_270m_ring_buffers_are_small():
    cfg = load_config("gemma3-270m")
    S = 8192
    assert ring_size(cfg, S) == 512
    ours = cache_bytes(cfg, 1, S)
    full = 2 * cfg.n_layers * S * cfg.n_kv_heads * cfg.head_dim * 4
    kv = 2 * 4 * cfg.n_kv_heads * cfg.head_dim * (15 * 512 + 3 * S)  # keys+values, f32
    assert ours == kv + 4 * (512 + S + 1)  # plus slot positions and lengths
    assert ours < full / 4
    assert ring_size(cfg, 100) == 100  # never more slots than the cache length


def test_slots_drop_padding_and_overwritten():
    # W = 4, a chunk of 6 tokens at positions 0..5 in row 0; row 1 has 2 tokens then padding.
    pos = jnp.array([[0, 1, 2, 3, 4, 5], [7, 8, -1, -1, -1, -1]])
    lengths = jnp.array([6, 9])
    s = np.asarray(slots_for(pos, lengths, 4))
    # row 0: positions 0 and 1 are overwritten by 4 and 5 in the same chunk -> dropped (slot 4)
    np.testing.assert_array_equal(s[0], [4, 4, 2, 3, 0, 1])
    np.testing.assert_array_equal(s[1], [3, 0, 4, 4, 4, 4])


def test_mask_window_and_causality():
    q = jnp.array([[5]])
    k = jnp.array([[0, 1, 2, 3, 4, 5, 6, -1]])
    np.testing.assert_array_equal(np.asarray(attention_mask(q, k, 0))[0, 0],
                                  [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(attention_mask(q, k, 3))[0, 0],
                                  [0, 0, 0, 1, 1, 1, 0, 0])


def test_cache_longer_than_model_context():
    with pytest.raises(ValueError, match="max_seq_len"):
        init_cache(TINY_GEMMA, 1, TINY_GEMMA.max_seq_len + 1)


def test_bfloat16_scatter_by_bit_pattern():
    """bit_scatter writes bfloat16 values exactly (as their uint16 bits) and drops out-of-range slots."""
    from jaxgen.cache import bit_scatter

    buf = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 3)), jnp.bfloat16)
    new = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 3)), jnp.float32)
    rows, slots = jnp.arange(2)[:, None], jnp.asarray([[1, 4], [5, 6]])  # slot 6 is out of range
    got = bit_scatter(buf, (rows, slots), new)
    want = buf.astype(jnp.float32).at[rows, slots].set(new.astype(jnp.bfloat16).astype(jnp.float32), mode="drop")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("layer", [None, 2])
def test_row_scatter_equals_the_indexed_write(dtype, layer, monkeypatch):
    """The rows-as-a-batching-dimension scatter (cache.row_scatter, the cache writes on a mesh) writes what
    the indexed one does: each row's new keys at its slots of `layer` (or of a [B, W, ...] buffer), slots
    out of range dropped; bfloat16 by value and by bit pattern, an int8 (values, scales) pair quantized."""
    from jaxgen import backend
    from jaxgen.cache import quantize_kv, row_scatter, write

    rng = np.random.default_rng(0)
    L, B, T, W, K, H = 3, 4, 3, 7, 2, 5
    lead = () if layer is None else (L,)
    slots = np.stack([rng.permutation(W + 3)[:T] for _ in range(B)])  # distinct per row; >= W dropped
    assert (slots >= W).any() and (slots < W).any()
    new = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    idx = ((layer,) if layer is not None else ()) + (np.arange(B)[:, None], jnp.asarray(slots))
    if dtype == "int8":
        buf = quantize_kv(jnp.asarray(rng.normal(size=lead + (B, W, K, H)), jnp.float32))
        if layer is None:
            got = write(buf, new, jnp.asarray(slots), by_row=True)
        else:
            got = tuple(row_scatter(b, n, jnp.asarray(slots), layer) for b, n in zip(buf, quantize_kv(new)))
        want = tuple(b.at[idx].set(n, mode="drop") for b, n in zip(buf, quantize_kv(new)))
    else:
        buf = jnp.asarray(rng.normal(size=lead + (B, W, K, H)), dtype)
        want = buf.at[idx].set(new.astype(dtype), mode="drop")
        got = row_scatter(buf, new, jnp.asarray(slots), layer)
        if dtype == "bfloat16":  # and by the bit pattern (a user's jit on XLA:CPU)
            monkeypatch.setattr(backend, "cpu_bf16_normalized", lambda: True)
            bits = row_scatter(buf, new, jnp.asarray(slots), layer)
            assert bits.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(bits, np.float32), np.asarray(want, np.float32))
        got, want = (got,), (want,)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("dtype", ["int32", "float32", "bfloat16"])
def test_row_scatter_add_accumulates_repeated_slots(dtype, monkeypatch):
    """add=True (the penalty counts: a block of speculative tokens may repeat one) adds every update,
    repeated slots included, as buf.at[rows, slots].add does; a bfloat16 buffer is added by value even
    where a set goes by bit pattern (adding bit patterns would be wrong)."""
    from jaxgen import backend
    from jaxgen.cache import row_scatter

    rng = np.random.default_rng(1)
    B, T, W = 4, 6, 5
    slots = rng.integers(0, W + 2, size=(B, T))  # repeats within a row; >= W dropped
    assert any(len(set(r)) < T for r in slots.tolist()) and (slots >= W).any()
    buf = jnp.asarray(rng.integers(0, 3, size=(B, W)), dtype)
    new = jnp.asarray(rng.integers(1, 4, size=(B, T)), dtype)
    want = buf.at[np.arange(B)[:, None], jnp.asarray(slots)].add(new, mode="drop")
    monkeypatch.setattr(backend, "cpu_bf16_normalized", lambda: True)
    got = row_scatter(buf, new, jnp.asarray(slots), add=True)
    assert got.dtype == buf.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
