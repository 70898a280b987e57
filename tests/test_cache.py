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
