"""jaxgen.backend: every accelerator path, forced on CPU, equals the reference (CPU) path: the Pallas
decode-attention kernel (interpret mode) and the length-aware "live" decode against `attend`; whole
generations (greedy and sampled, n samples, int8 KV, stacked and unrolled layers, softcaps, a mesh,
beam search, speculative decoding) with the accelerator paths against the reference: tokens identical,
log-probs within float rounding. bfloat16 dequantization against its definition. The GPU and TPU programs
(every preset's, every one the host API runs) lowered for CUDA and TPU from this CPU machine."""
import dataclasses
import re
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from jaxgen import backend, engine, kernels, quant
from jaxgen import cache as kvc
from jaxgen.generate import place, prepare, statics
from jaxgen.model import Model, attend, decode_global, stack_layers, unstack_layers
from tests.conftest import TINY_GEMMA, TINY_QWEN, random_params

REF = backend.REFERENCE
# every accelerator choice at once, with blocks small enough that the tiny caches span several
ACCEL = backend.Paths(decode_attention="pallas", prefill_attention="dpa", gates="where", dequant="float32",
                      unroll=False, decode_block=16)
LIVE = ACCEL.replace(decode_attention="live")
# Gemma-2-like softcaps on the tiny Gemma (the kernel applies the attention softcap itself)
CAPPED = dataclasses.replace(TINY_GEMMA, name="tiny-gemma-capped", attn_logit_softcap=8.0, final_logit_softcap=30.0)


def test_paths_validation_and_env(monkeypatch):
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        backend.Paths(decode_attention="flash")
    with pytest.raises(ValueError, match="unroll must be one of"):
        backend.Paths(unroll="yes")
    with pytest.raises(ValueError, match="decode_block must be a power of two"):
        backend.Paths(decode_block=100)
    assert backend.paths_for("cpu") == REF
    monkeypatch.setenv(backend.ENV, "decode_attention=live, gates=where,unroll=false,decode_block=64")
    assert backend.paths_for("cpu") == REF.replace(decode_attention="live", gates="where", unroll=False,
                                                   decode_block=64)
    for bad, msg in [("decode_attention", "is not field=value"), ("speed=fast", "is not field=value"),
                     ("unroll=maybe", "takes true / false"), ("gates=sometimes", "gates must be one of")]:
        monkeypatch.setenv(backend.ENV, bad)
        with pytest.raises(ValueError, match=msg):
            backend.current()
    with pytest.raises(ValueError, match="paths must be a jaxgen.backend.Paths"):
        Model(TINY_GEMMA, None, paths="pallas")


def _case(B, S, K, G, H, dtype, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(B, 1, K * G, H)), dtype)
    k = jnp.asarray(r.normal(size=(B, S, K, H)), dtype)
    v = jnp.asarray(r.normal(size=(B, S, K, H)), dtype)
    # rows at the start, the middle and the end of the bucket, and a finished row (position -1);
    # slots past a row's position hold stale keys (as after a speculative rollback): never attended
    pos = jnp.array([0, S // 2 + 3, S - 1, -1][:B], jnp.int32)[:, None]
    k_pos = jnp.where(jnp.arange(S)[None] <= jnp.maximum(pos, 0) + 5, jnp.arange(S)[None], -1)
    return q, k, v, pos, k_pos, kvc.attention_mask(pos, k_pos, 0)


@pytest.mark.parametrize("B,S,K,G,H,dtype,softcap,splits", [
    (4, 64, 2, 2, 16, jnp.float32, 0.0, 0),  # splits chosen (4 spans of 16)
    (4, 48, 1, 4, 32, jnp.float32, 8.0, 1),  # one span of three blocks, softcap
    (3, 256, 2, 1, 64, jnp.float32, 0.0, 8),  # one query head per kv head, 8 spans
    (4, 128, 2, 4, 16, jnp.bfloat16, 0.0, 0),
])
def test_decode_kernel_equals_attend(B, S, K, G, H, dtype, softcap, splits):
    q, k, v, pos, k_pos, mask = _case(B, S, K, G, H, dtype)
    ref = attend(q, k, v, mask, 0.25, softcap).astype(jnp.float32)
    out = kernels.decode_attention(q, k, v, jnp.maximum(pos[:, 0] + 1, 0), scale=0.25, softcap=softcap,
                                   interpret=True, splits=splits).astype(jnp.float32)
    live = np.asarray(pos[:, 0] >= 0)
    tol = 2e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out)[live], np.asarray(ref)[live], atol=tol, rtol=tol)
    assert not np.any(np.asarray(out)[~live])  # a finished row reads nothing and gives 0, not NaN
    for how in ("live", "pallas"):  # decode_global as the model calls it
        got = decode_global(q, k, v, pos, k_pos, mask, 0.25, softcap, how, block=16).astype(jnp.float32)
        np.testing.assert_allclose(np.asarray(got)[live], np.asarray(ref)[live], atol=tol, rtol=tol)


def test_decode_kernel_refuses_bad_splits():
    q, k, v, pos, _, _ = _case(2, 48, 1, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="splits=2 must cut the 48 slots"):
        kernels.decode_attention(q, k, v, pos[:, 0] + 1, scale=1.0, splits=2, interpret=True)
    assert not kernels.decode_supported(40, 16, k)  # not a multiple of 16: the XLA path
    assert not kernels.decode_supported(48, 16, (k, k))  # int8 pairs: the XLA path


def test_decode_without_the_triton_backend_takes_the_live_path(monkeypatch):
    """A jax without Pallas's Triton backend (deprecated in jax 0.11, to be removed): "pallas" layers run
    the pure-JAX "live" path, the same attention, instead of failing at the kernel's import."""
    q, k, v, pos, k_pos, mask = _case(4, 64, 2, 2, 16, jnp.float32)
    assert kernels.decode_supported(64, 16, k)  # this jax has it
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # import raises ImportError
    kernels.available.cache_clear()
    try:
        assert not kernels.decode_supported(64, 16, k)
        got = decode_global(q, k, v, pos, k_pos, mask, 0.25, 0.0, "pallas", block=16)
    finally:
        kernels.available.cache_clear()
    ref = attend(q, k, v, mask, 0.25, 0.0)
    live = np.asarray(pos[:, 0] >= 0)
    np.testing.assert_allclose(np.asarray(got)[live], np.asarray(ref)[live], atol=2e-6, rtol=2e-6)


PROMPTS = [list(range(1, 40)), [5, 9, 2], list(np.arange(70) % 60 + 1), [7] * 20]


def _run(model, paths, **kw):
    return jaxgen.generate(dataclasses.replace(model, paths=paths), PROMPTS, max_new_tokens=24, top_logprobs=2, **kw)


def _same(ref, got, tol=1e-4):
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=tol)
        for sa, sb in zip(a.top_logprobs or [], b.top_logprobs or []):
            assert [i for i, _ in sa] == [i for i, _ in sb]
            np.testing.assert_allclose([x for _, x in sb], [x for _, x in sa], atol=tol)


@pytest.fixture(scope="module")
def capped():
    return Model(CAPPED, unstack_layers(random_params(CAPPED, seed=3)))


@pytest.mark.parametrize("paths", [ACCEL, LIVE, REF.replace(prefill_attention="dpa"), REF.replace(gates="where")],
                         ids=["accel", "live", "dpa", "where"])
def test_generate_accelerator_paths_equal_reference(capped, paths):
    """Greedy and sampled rows (top-k / top-p / min-p, penalties, a bias: every sampling gate), local
    ring layers past their window and global layers over several key blocks."""
    knobs = dict(temperature=[0.0, 0.9, 1.1, 0.7], top_k=[0, 8, 0, 0], top_p=[1.0, 1.0, 0.8, 1.0],
                 min_p=[0.0, 0.0, 0.0, 0.1], repetition_penalty=[1.0, 1.2, 1.0, 1.0], seed=[0, 1, 2, 3],
                 logit_bias=[{}, {}, {}, {3: 2.0}])
    _same(_run(capped, REF, **knobs), _run(capped, paths, **knobs))


@pytest.mark.parametrize("cfg", [TINY_GEMMA, TINY_QWEN], ids=["gemma", "qwen"])
def test_stacked_layers_int8_kv_and_n_equal_reference(cfg):
    """Stacked layers (the scan, with lax.cond between layer kinds) with an int8 cache (the kernel hands
    int8 pairs to the "live" path), unrolled ones with a float cache, n samples per prompt. Each against
    the reference on the same layout: int8 rounding turns the layouts' float-rounding differences into
    whole quantization steps (stacked vs unrolled int8 log-probs differ by ~5e-3 on the reference path)."""
    params = random_params(cfg, seed=5)
    for model in (Model(cfg, stack_layers(params), kv_quant="int8"), Model(cfg, unstack_layers(params))):
        _same(_run(model, REF, n=2, temperature=0.8, seed=4), _run(model, ACCEL, n=2, temperature=0.8, seed=4))


def test_mesh_with_accelerator_paths_equals_unsharded(capped):
    """On a 2x4 mesh the kernel is replaced by the "live" path (engine._paths): a pallas_call is not
    partitioned by GSPMD. Sharded with the accelerator paths == unsharded reference."""
    from jaxgen.sharding import make_mesh, shard_params

    mesh = make_mesh("data=2,model=4")
    sharded = dataclasses.replace(capped, params=shard_params(stack_layers(capped.params), CAPPED, mesh), mesh=mesh)
    assert jaxgen.engine._paths(ACCEL, mesh).decode_attention == "live"
    _same(_run(capped, REF, temperature=0.7, seed=9), _run(sharded, ACCEL, temperature=0.7, seed=9))


def test_beam_and_speculative_with_accelerator_paths(capped):
    from jaxgen import speculative

    m = lambda p: dataclasses.replace(capped, paths=p)
    ref = jaxgen.generate(m(REF), PROMPTS[:2], max_new_tokens=12, num_beams=3)
    got = jaxgen.generate(m(ACCEL), PROMPTS[:2], max_new_tokens=12, num_beams=3)
    for a, b in zip(ref, got):
        assert a.tokens == b.tokens
    proposer = speculative.parse("lookup,gamma=4")
    ref, _ = speculative.generate(m(REF), PROMPTS, proposer, max_new_tokens=20, temperature=0.8, seed=2)
    got, _ = speculative.generate(m(ACCEL), PROMPTS, proposer, max_new_tokens=20, temperature=0.8, seed=2)
    _same(ref, got)


def test_bf16_dequantization_is_its_definition():
    """quant.matmul(x, w, bfloat16) == x (rounded to bf16) @ the bf16-dequantized weights, f32
    accumulation: int8 per channel and grouped, int4."""
    r = np.random.default_rng(0)
    w = jnp.asarray(r.normal(size=(64, 48)), jnp.float32)
    x = jnp.asarray(r.normal(size=(3, 64)), jnp.float32)
    bf = lambda a: a.astype(jnp.bfloat16)
    for bits, group in ((8, 0), (8, 32), (4, 32)):
        qw = quant.quantize(w, bits, group)
        if group:  # grouped: the weights are dequantized (to bf16), then one dot
            want = jnp.dot(bf(x), quant.dequantize(qw, jnp.bfloat16), preferred_element_type=jnp.float32)
        else:  # per output channel: the int8 values in the dot, the scale on its output
            want = jnp.dot(bf(x), bf(qw.q), preferred_element_type=jnp.float32) * qw.scale[0]
        got = quant.matmul(x, qw, jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
        # and within bf16 rounding of the f32 path
        np.testing.assert_allclose(np.asarray(got), np.asarray(quant.matmul(x, qw)), rtol=0, atol=0.1)


def test_quantized_model_bf16_dequant_close_to_f32(capped):
    """A whole int8 model: log-probs of the reference's greedy tokens, scored with bf16 dequantization,
    within bf16 rounding of the f32 dequantization's (score is teacher-forced: no token divergence)."""
    qm = dataclasses.replace(capped, params=quant.quantize_params(capped.params, "int8"))
    ref = _run(qm, REF)
    got = _run(qm, REF.replace(dequant="bfloat16"))
    agree = [a.tokens[:5] == b.tokens[:5] for a, b in zip(ref, got)]
    assert sum(agree) >= 3  # bf16 rounding may flip a near-tie late in a row, not the first tokens of most
    for a, b in zip(ref, got):
        n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
        np.testing.assert_allclose(b.logprobs[:n], a.logprobs[:n], atol=5e-2)


def test_load_keeps_layers_stacked_where_unroll_is_off(monkeypatch, tmp_path):
    """jaxgen.load unrolls float layers only where the paths say so (CPU by default)."""
    from jaxgen.checkpoint import hf_save

    hf_save.save(Model(TINY_QWEN, random_params(TINY_QWEN)), tmp_path / "m")
    assert isinstance(jaxgen.load(str(tmp_path / "m")).params.layers, tuple)
    monkeypatch.setenv(backend.ENV, "unroll=false")
    assert not isinstance(jaxgen.load(str(tmp_path / "m")).params.layers, tuple)


def _program(jit, model, prompts):
    """jit's compiled generate program for prompts (as generate.run calls it), its temporaries' bytes and
    its output."""
    _, args, p = prepare(model, prompts, max_new_tokens=4, stop_ids=[])
    compiled = jit.lower(model.params, **place(model, args), **statics(model, p)).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled(model.params, **place(model, args))


def test_bfloat16_embedding_table_is_not_copied():
    """jaxgen's programs on CPU (backend.jit: CPU_COMPILER_OPTIONS) look tokens up in a bfloat16 embedding
    table without a float32 copy of it: the compiled generate program's temporaries stay below the table's
    bytes, where plain jax.jit of the same function holds a float32 copy (>= twice the table: the negative
    control). float32 programs are unchanged by the options (identical tokens and log-probs); bfloat16
    ones stay within bfloat16 rounding of the float32 computation on the same weights."""
    cfg = dataclasses.replace(TINY_QWEN, name="tiny-wide", vocab_size=16384, n_layers=2)
    params = random_params(cfg)
    prompts = [[5, 900, 16000, 7], [3, 12000]]
    plain = jax.jit(engine.generate_tokens, static_argnames=engine._STATIC)
    out = {}
    for dt in (jnp.float32, jnp.bfloat16):
        model = Model(cfg, jax.tree.map(lambda a: a.astype(dt), params))
        (temp, got), (plain_temp, want) = _program(engine.generate_jit, model, prompts), _program(plain, model, prompts)
        table = model.params.embed.nbytes
        if dt == jnp.bfloat16:
            assert temp < table <= plain_temp / 2, (temp, plain_temp, table)
        else:
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_array_equal(got.logprobs, want.logprobs)
        out[dt] = got
    # the first token's log-prob depends on the prompt only (the later ones on the tokens each dtype chose)
    np.testing.assert_allclose(out[jnp.bfloat16].logprobs[:, 0], out[jnp.float32].logprobs[:, 0], atol=0.05)


def test_bfloat16_cache_written_in_place():
    """jaxgen's programs on CPU write a bfloat16 cache with a plain scatter: no whole cache stack converted to
    its uint16 bit pattern and back in the compiled program (27% of a batch-32 Gemma 3 270M decode step when
    it was). A plain jax.jit of the same function (float-normalization-bf16 on, which would scatter through
    float32) writes the bit pattern (cache.bit_scatter): the negative control."""
    model = Model(TINY_GEMMA, jax.tree.map(lambda a: a.astype(jnp.bfloat16), random_params(TINY_GEMMA)))
    _, args, p = prepare(model, [[5, 9, 2, 7], [3, 12]], max_new_tokens=4, stop_ids=[])
    plain = jax.jit(engine.generate_tokens, static_argnames=engine._STATIC)
    counts = []
    for jit in (engine.generate_jit, plain):
        text = jit.lower(model.params, **place(model, args), **statics(model, p)).compile().as_text()
        counts.append(len(re.findall(r"= u16\[[0-9,]+\]\S* bitcast-convert\(", text)))
    assert counts[0] == 0 < counts[1], counts


# ---- the device programs, lowered from this CPU machine ----
# What CI can check of the GPU and TPU programs short of compiling them: each program, traced as that backend
# traces it (its default Paths, and jax.default_backend() answering that backend: jaxgen reads it at trace
# time) and lowered for that platform. That runs Pallas's Triton lowering of the decode kernel on real shapes
# (interpret mode checks the kernel's arithmetic, not what Triton accepts) and fails on any operation with no
# lowering there.
PLATFORMS = {"cuda": "gpu", "tpu": "tpu"}
TRITON = "__gpu$xla.gpu.triton"  # the custom call of a Pallas Triton kernel


def _lowered(fun, jit_kw: dict, args: tuple, kwargs: dict, platform: str) -> set:
    """The custom-call targets of fun(*args, **kwargs) traced as on `platform` and lowered for it."""
    fake = PLATFORMS[platform]
    if "paths" in kwargs:
        kwargs = {**kwargs, "paths": backend.DEFAULTS[fake]}
    # a fresh function: jax's trace caches never hand this trace to a call that runs here
    jitted = jax.jit(lambda *a, **k: fun(*a, **k), **jit_kw)
    with mock.patch.object(jax, "default_backend", lambda: fake):
        traced = jitted.trace(*args, **kwargs)
    return set(re.findall(r"custom_call @([\w$.\-]+)", traced.lower(lowering_platforms=(platform,)).as_text()))


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_every_preset_lowers_for_the_accelerators(platform):
    """Every preset's generate program at its real shapes (abstract bfloat16 params: nothing is allocated), in
    the layout jaxgen.load gives there (stacked layers). On GPU the decode kernel is in it: every preset's
    head dim suits the kernel (kernels.decode_supported), so a GPU run that took "live" instead is a bug."""
    for name in jaxgen.preset_names():
        cfg = jaxgen.load_config(name)
        params = jax.eval_shape(lambda k: jaxgen.init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
        model = Model(cfg, params)
        _, args, p = prepare(model, [[1] * 40, [2] * 3], max_new_tokens=16, temperature=0.8)
        targets = _lowered(engine.generate_tokens, dict(static_argnames=engine._STATIC), (params,),
                           {**args, **statics(model, p)}, platform)
        assert (TRITON in targets) == (platform == "cuda"), (name, targets)


class Lowered(Exception):
    """Raised by the test's observer once it has lowered a program whose CPU run the test does not need."""


def test_host_api_programs_lower_for_the_accelerators(monkeypatch):
    """Every program the host API runs, in each decoding mode and option that changes the program (n
    samples, log-probs, penalties, stop strings, constraints, a shared prefix, LoRA, streaming, beam search,
    speculative decoding, a conversation's turns, int8 weights and cache, an MoE model at both of its
    accelerator computations), lowered for GPU and TPU where the host API calls it (backend.OBSERVERS). The
    GPU programs that decode one token per row run the kernel wherever it takes the layers (the tiny
    Gemma's head dim 16), and only those: none on TPU."""
    from jaxgen import lora, speculative
    from tests.test_constraints import SCHEMA, JsonTokenizer

    RUN = {"prefill_prefix", "prefill", "start", "finish"}  # what later programs need the outputs of
    lowered = {}  # (request, program, platform) -> the custom-call targets
    request = None

    def observe(fun, jit_kw, args, kwargs):
        for platform in PLATFORMS:
            lowered[request, fun.__name__, platform] = _lowered(fun, jit_kw, args, kwargs, platform)
        if fun.__name__ not in RUN:
            raise Lowered  # (generate, and the like: a CPU run would only cost its compile here)

    monkeypatch.setattr(backend, "OBSERVERS", [observe])
    m = Model(TINY_GEMMA, random_params(TINY_GEMMA), tokenizer=JsonTokenizer())
    q = Model(TINY_QWEN, quant.quantize_params(random_params(TINY_QWEN), "int8"), kv_quant="int8")
    moe_cfg = dataclasses.replace(TINY_QWEN, name="tiny-moe", n_experts=16, n_experts_per_tok=2, d_ff_expert=8)
    ps, kw = PROMPTS[:2], dict(max_new_tokens=6)

    def conversation():
        conv = jaxgen.Conversation(m, max_len=128)
        conv.generate(ps, **kw)
        conv.generate([[7, 8], [9]], **kw)

    requests = {
        "sampled": lambda: jaxgen.generate(m, ps, n=2, top_logprobs=2, temperature=0.8, repetition_penalty=1.2,
                                           stop=["ab"], **kw),
        "json_schema": lambda: jaxgen.generate(m, ps, json_schema=SCHEMA, **kw),
        "prefix": lambda: jaxgen.generate(m, ps, prefix=jaxgen.prefill_prefix(m, [3, 4, 5]), **kw),
        "lora": lambda: jaxgen.generate(m, ps, lora=lora.random_adapter(m.cfg, jax.random.key(1), rank=2), **kw),
        "stream": lambda: list(jaxgen.stream(m, ps, chunk_steps=2, **kw)),
        "beam": lambda: jaxgen.generate(m, ps, num_beams=3, **kw),
        "speculative": lambda: speculative.generate(m, ps, speculative.parse("lookup,gamma=4"), **kw),
        "conversation": conversation,
        "int8": lambda: jaxgen.generate(q, ps, **kw),
        # decode at 2 rows x 2 experts < 16: gathered; a prefill's tokens: grouped (ragged_dot)
        "moe": lambda: jaxgen.generate(Model(moe_cfg, random_params(moe_cfg)), ps, **kw),
    }
    for request, call in requests.items():
        with pytest.raises(Lowered):
            call()
    programs = {"sampled": {"generate_tokens"}, "json_schema": {"generate_tokens"},
                "prefix": {"prefill_prefix", "generate_tokens"}, "lora": {"generate_tokens"},
                "stream": {"prefill", "decode"}, "beam": {"beam_search"}, "speculative": {"speculative_tokens"},
                "conversation": {"start", "finish", "feed"}, "int8": {"generate_tokens"}, "moe": {"generate_tokens"}}
    assert set(lowered) == {(r, name, pl) for r, names in programs.items() for name in names for pl in PLATFORMS}
    decodes = {"generate_tokens", "decode", "beam_search", "finish"}  # (speculative steps verify several tokens)
    no_kernel = {"int8", "moe"}  # an int8 cache; the tiny Qwen's head dim 8
    for (r, name, platform), targets in lowered.items():
        want = platform == "cuda" and name in decodes and r not in no_kernel
        assert (TRITON in targets) == want, (r, name, platform, targets)
