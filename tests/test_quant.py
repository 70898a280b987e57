"""Quantization on tiny random models: the kernels compute exactly what their dequantized weights
say (so any quality loss is rounding, never a wrong layout), the int8 KV cache keeps cached decode
equal to a full pass, and quantized params shard, checkpoint and compile like float ones."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .conftest import TINY_GEMMA, TINY_QWEN, CompileCounter, random_params
from jaxgen import quant
from jaxgen.cache import cache_bytes, init_cache
from jaxgen.generate import generate
from jaxgen.model import Model
from jaxgen.model import forward as _forward
from jaxgen.model import stack_layers

forward = jax.jit(_forward, static_argnames="cfg")


def dequantized_params(qp):
    """The float params a quantized tree stands for (QMatrix -> its float matrix, original layout)."""
    L = qp.layers
    deq = lambda m: np.asarray(quant.dequantize(m))
    layers = {}
    for n in quant.LAYER_MATS:
        w = deq(getattr(L, n))  # [L, I, O]
        layers[n] = w
    # the tables: quantized as [D, V], float [V, D]
    return qp.replace(embed=deq(qp.embed).T, layers=L.replace(**layers),
                      unembed=None if qp.unembed is None else deq(qp.unembed).T)


def reshape_like(float_params, flat):
    """Put 2-D layer matrices back into the model's head-split shapes."""
    return flat.replace(layers=flat.layers.replace(**{n: getattr(flat.layers, n).reshape(getattr(float_params.layers, n).shape)
                                                      for n in quant.LAYER_MATS}))


@pytest.mark.parametrize("bits,group", [(8, 0), (8, 4), (4, 4), (4, 8), (4, 0)])
def test_quantize_round_trip_error_is_at_most_half_a_step(bits, group):
    w = np.random.default_rng(0).standard_normal((2, 16, 24)).astype(np.float32)
    m = quant.quantize(w, bits, group)
    g = group or (16 if bits == 8 else 8)  # int4 groups stay within one packed half
    G = 16 // g
    assert m.shape == (2, 16, 24) and m.group == g and m.scale.shape == (2, G, 24)
    assert m.q.dtype == (np.int8 if bits == 8 else np.uint8) and m.q.shape[-2] == (16 if bits == 8 else 8)
    deq = np.asarray(quant.dequantize(m))
    step = np.repeat(np.asarray(m.scale), g, axis=-2)
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-6)
    grouped = lambda a: a.reshape(2, G, g, 24)
    if bits == 8:  # symmetric: each group's largest magnitude is exact
        np.testing.assert_allclose(np.abs(grouped(deq)).max(2), np.abs(grouped(w)).max(2), rtol=1e-6)
    else:  # min-max: each group's minimum and maximum are exact
        np.testing.assert_allclose(grouped(deq).min(2), grouped(w).min(2), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(grouped(deq).max(2), grouped(w).max(2), rtol=1e-5, atol=1e-6)


def test_int4_packing_is_exact_on_representable_values():
    rng = np.random.default_rng(1)
    ints = rng.integers(0, 16, (8, 6))
    ints[0], ints[1], ints[4], ints[5] = 0, 15, 0, 15  # each group of 4 spans 0..15: scale 1, zero 0
    m = quant.quantize(ints.astype(np.float32), 4, 4)
    np.testing.assert_allclose(quant.dequantize(m), ints, atol=1e-5)
    # row i in the low nibble, row i + I/2 in the high one
    np.testing.assert_array_equal(np.asarray(m.q) & 15, ints[:4])
    np.testing.assert_array_equal(np.asarray(m.q) >> 4, ints[4:])


@pytest.mark.parametrize("bits,group,block", [(8, 0, 2048), (8, 0, 8), (4, 8, 2048), (4, 8, 8), (8, 8, 8)])
def test_matmul_equals_dequantized_dot(bits, group, block, monkeypatch):
    monkeypatch.setattr(quant, "CPU_BLOCK", block)  # 8: the column-blocked loop runs
    rng = np.random.default_rng(2)
    m = quant.quantize(rng.standard_normal((32, 64)).astype(np.float32), bits, group)
    x = jnp.asarray(rng.standard_normal((3, 5, 32)).astype(np.float32))
    got = jax.jit(quant.matmul)(x, m)
    np.testing.assert_allclose(got, x @ quant.dequantize(m), atol=1e-4, rtol=1e-5)
    idx = jnp.asarray([[3, 0, 63], [7, 7, 1]])
    np.testing.assert_allclose(quant.take_columns(m, idx), np.asarray(quant.dequantize(m)).T[np.asarray(idx)], atol=1e-6)


@pytest.mark.parametrize("cfg", [TINY_GEMMA, TINY_QWEN], ids=["gemma", "qwen"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_forward_equals_float_forward_on_dequantized_weights(cfg, mode, monkeypatch):
    monkeypatch.setattr(quant, "CPU_BLOCK", 16)  # the vocab (64) runs as 4 column blocks
    p = random_params(cfg)
    qp = quant.quantize_params(p, mode)
    ref_params = reshape_like(p, dequantized_params(qp))
    T = 12
    tok = jax.random.randint(jax.random.key(3), (2, T), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    got = forward(qp, tok, pos, init_cache(cfg, 2, 16), cfg)[0]
    ref = forward(ref_params, tok, pos, init_cache(cfg, 2, 16), cfg)[0]
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
    # and int8 stays close to the unquantized model (a broken scale would not)
    full = forward(p, tok, pos, init_cache(cfg, 2, 16), cfg)[0]
    lp, lq = jax.nn.log_softmax(full), jax.nn.log_softmax(got)
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))
    assert kl < (0.01 if mode == "int8" else 0.5), kl


def test_param_bytes_shrink():
    p = random_params(TINY_GEMMA)
    f32 = quant.param_bytes(p)
    assert quant.param_bytes(quant.quantize_params(p, "int8")) < 0.4 * f32
    assert quant.param_bytes(quant.quantize_params(p, "int4")) < 0.3 * f32


@pytest.mark.parametrize("cfg", [TINY_GEMMA, TINY_QWEN], ids=["gemma", "qwen"])
def test_int8_kv_cache_cached_decode_equals_one_pass(cfg):
    """With the int8 cache, token-by-token decode and chunked prefill see the same quantized keys as a
    single pass over the sequence (the logits agree to rounding), and stay near the f32 cache."""
    p = random_params(cfg)
    B, T = 2, 23
    tok = jax.random.randint(jax.random.key(4), (B, T), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    one = forward(p, tok, pos, init_cache(cfg, B, 32, kv_quant="int8"), cfg)[0]
    cache = init_cache(cfg, B, 32, kv_quant="int8")
    outs = []
    for a, b in [(0, 7)] + [(t, t + 1) for t in range(7, T)]:
        lg, cache = forward(p, tok[:, a:b], pos[:, a:b], cache, cfg)
        outs.append(lg)
    # float rounding of a key before quantization can flip one int8 step: tolerance of a few 1e-4
    np.testing.assert_allclose(jnp.concatenate(outs, 1), one, atol=2e-3, rtol=1e-3)
    assert cache.k_global.dtype == jnp.int8 and cache.k_global_scale.shape == cache.k_global.shape[:-1]
    f32 = forward(p, tok, pos, init_cache(cfg, B, 32), cfg)[0]
    lp, lq = jax.nn.log_softmax(f32), jax.nn.log_softmax(one)
    assert float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1))) < 1e-3


def test_int8_kv_cache_bytes():
    f32 = cache_bytes(TINY_GEMMA, 4, 128)
    i8 = cache_bytes(TINY_GEMMA, 4, 128, kv_quant="int8")
    assert i8 < 0.35 * f32
    with pytest.raises(ValueError, match="KV cache quantization"):
        cache_bytes(TINY_GEMMA, 4, 128, kv_quant="int4")


def test_quantized_generate_compiles_once_and_shards_like_unsharded():
    from jaxgen import sharding as shd

    cfg = TINY_GEMMA
    qp = quant.quantize_params(random_params(cfg), "int8")
    model = Model(cfg, qp, kv_quant="int8")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    counter = CompileCounter()
    ref = generate(model, prompts, max_new_tokens=10, stop_ids=[], temperature=0.8, top_k=5, seed=1)
    n = len(counter.names)
    generate(model, prompts, max_new_tokens=10, stop_ids=[], temperature=0.3, top_p=0.9, seed=2)
    assert len(counter.names) == n, counter.names[n:]  # knobs are traced
    mesh = shd.make_mesh("data=2,model=4")
    sharded = Model(cfg, shd.shard_params(qp, cfg, mesh), mesh=mesh, kv_quant="int8")
    wq = sharded.params.layers.wq
    assert wq.q.sharding.spec == wq.scale.sharding.spec  # integers and scales split alike
    assert "model" in tuple(wq.q.sharding.spec)
    got = generate(sharded, prompts, max_new_tokens=10, stop_ids=[], temperature=0.8, top_k=5, seed=1)
    assert [g.tokens for g in got] == [r.tokens for r in ref]


def test_quantized_orbax_round_trip(tmp_path):
    from jaxgen.checkpoint import load, orbax

    cfg = TINY_QWEN
    for mode in ("int8", "int4"):
        qp = quant.quantize_params(random_params(cfg), mode)
        orbax.save(tmp_path / mode, cfg, qp)
        model = load(str(tmp_path / mode), "float32")
        assert quant.quant_mode(model.params) == mode
        for a, b in zip(jax.tree.leaves(qp), jax.tree.leaves(stack_layers(model.params))):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError, match="quantized as"):
            load(str(tmp_path / mode), "float32", quant="int8" if mode == "int4" else "int4")
    # a float checkpoint quantizes at load
    orbax.save(tmp_path / "f32", cfg, random_params(cfg))
    model = load(str(tmp_path / "f32"), "float32", quant="int8", kv_quant="int8")
    assert quant.quant_mode(model.params) == "int8" and model.kv_quant == "int8"
    with pytest.raises(ValueError, match="unknown quantization"):
        load(str(tmp_path / "f32"), "float32", quant="int3")


def test_bfloat16_quantized_scales():
    p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), random_params(TINY_GEMMA))
    qp = quant.quantize_params(p, "int8")
    assert qp.embed.dtype == jnp.bfloat16 and qp.layers.wq.q.dtype == jnp.int8
    out = generate(dataclasses.replace(Model(TINY_GEMMA, qp)), [[1, 2, 3]], max_new_tokens=8, stop_ids=[])[0]
    # against the float32 model of the same (dequantized) weights, teacher-forced on the same tokens:
    # each log-probability within bfloat16 rounding, and each greedy choice its (near-)argmax. Rounding
    # here is every bfloat16 operation's, through 8 layers (jaxgen's CPU programs round each one, as the
    # program says: backend.CPU_COMPILER_OPTIONS): 0.058 at most on these 8 tokens (0.045 when XLA:CPU
    # kept chains of bfloat16 arithmetic in float32), so 0.1 for the log-probabilities
    f32 = random_params(TINY_GEMMA)
    ref = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), reshape_like(f32, dequantized_params(qp)))
    seq = jnp.asarray([[1, 2, 3] + out.tokens], jnp.int32)
    logits = _forward(ref, seq, jnp.arange(seq.shape[1])[None], init_cache(TINY_GEMMA, 1, seq.shape[1]), TINY_GEMMA)[0]
    lp = np.asarray(jax.nn.log_softmax(logits[0, 2:-1], axis=-1))  # [8, V] for the 8 new tokens
    chosen = lp[np.arange(8), out.tokens]
    np.testing.assert_allclose(out.logprobs, chosen, atol=0.1)
    assert np.all(chosen >= lp.max(axis=-1) - 0.05), (chosen, lp.max(axis=-1))


def test_gguf_q8_0_tensors_load_as_int8_without_float(tmp_path):
    """A llama GGUF whose matrices are Q8_0 (the q/k rows permuted for interleaved RoPE): with
    quant="int8" they are taken as stored, rows un-permuted on the integers and scales alike, and
    dequantize to exactly the float32 load of the same file."""
    import gguf

    from jaxgen.checkpoint import gguf as G

    from .test_checkpoint import TINY_LLAMA, write_gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    real_add = gguf.GGUFWriter.add_tensor

    def add_q8(self, name, arr, **kw):  # every tensor whose rows split into blocks of 32 goes in as Q8_0
        arr = np.asarray(arr, np.float32)
        if arr.ndim == 2 and arr.shape[1] % 32 == 0:
            return real_add(self, name, gguf.quants.quantize(arr, q8), raw_dtype=q8)
        return real_add(self, name, arr, **kw)

    gguf.GGUFWriter.add_tensor = add_q8
    try:
        path = write_gguf(tmp_path / "q8.gguf", TINY_LLAMA, random_params(TINY_LLAMA, seed=5))
    finally:
        gguf.GGUFWriter.add_tensor = real_add
    reader = G.open_gguf(path)
    assert reader.tensors[0].tensor_type == q8  # token_embd
    f32 = G.load_params(reader, TINY_LLAMA)
    q = G.load_params(reader, TINY_LLAMA, quant="int8")
    for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up"):  # Q8_0 in the file: taken as is
        m = getattr(q.layers, n)
        assert m.q.dtype == np.int8 and m.group == 32
        np.testing.assert_allclose(quant.dequantize(m), quant.as_matrix(n, getattr(f32.layers, n)), rtol=1e-6, atol=1e-7)
    assert q.layers.w_down.group == 24  # float in the file (48 inputs): quantized here, largest divisor <= 32
    np.testing.assert_allclose(np.asarray(quant.dequantize(q.embed)).T, f32.embed, rtol=1e-6, atol=1e-7)
    # and the model built from it is the float model of the same file (w_down: of its int8 rounding)
    tok = jnp.asarray([[1, 5, 9, 200, 3]])
    pos = jnp.arange(5)[None]
    f32 = f32.replace(layers=f32.layers.replace(w_down=np.asarray(quant.dequantize(q.layers.w_down))))
    a = forward(jax.tree.map(jnp.asarray, f32), tok, pos, init_cache(TINY_LLAMA, 1, 8), TINY_LLAMA)[0]
    b = forward(jax.tree.map(jnp.asarray, q), tok, pos, init_cache(TINY_LLAMA, 1, 8), TINY_LLAMA)[0]
    np.testing.assert_allclose(a, b, atol=1e-4)
