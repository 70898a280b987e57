import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.cache import init_cache
from jaxgen.engine import generate_jit
from jaxgen.generate import generate, plan, precompile, run, stream
from jaxgen.model import Model
from jaxgen.model import forward
from tests.conftest import TINY_GEMMA, TINY_QWEN, random_params

_forward = jax.jit(lambda p, t, cfg: forward(p, t, jnp.arange(t.shape[1])[None], init_cache(cfg, 1, t.shape[1]), cfg)[0],
                   static_argnames="cfg")


def _full(params, tokens, cfg, width=32):
    """Logits of a full forward pass from an empty cache. Right-padding to a fixed width changes no
    logit of the real positions (causal attention) and keeps this to one compilation."""
    n = tokens.shape[1]
    return _forward(params, jnp.pad(tokens, ((0, 0), (0, width - n))), cfg)[:, :n]


def reference_greedy(model, prompt, n):
    """Plain Python loop that recomputes the full forward pass over the whole sequence every step."""
    seq = list(prompt)
    for _ in range(n):
        logits = _full(model.params, jnp.asarray([seq], jnp.int32), model.cfg)
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


PROMPTS = [[5, 9, 2, 33, 7, 1, 8, 8, 21, 40, 3], [17, 4], [60, 2, 2, 9, 11, 12, 13]]


def test_greedy_equals_reference_loop(tiny_model):
    out = generate(tiny_model, PROMPTS, max_new_tokens=14)
    for prompt, c in zip(PROMPTS, out):
        assert c.tokens == reference_greedy(tiny_model, prompt, 14)
        assert c.finish_reason == "length" and len(c.logprobs) == 14


def test_logprobs_and_top_logprobs(gemma_model):
    out = generate(gemma_model, PROMPTS[:2], max_new_tokens=6, top_logprobs=3)
    for prompt, c in zip(PROMPTS, out):
        seq = prompt + c.tokens
        logits = _full(gemma_model.params, jnp.asarray([seq]), gemma_model.cfg)[0]
        logp = jax.nn.log_softmax(logits, -1)
        for j, tok in enumerate(c.tokens):
            want = logp[len(prompt) - 1 + j]
            assert c.logprobs[j] == pytest.approx(float(want[tok]), abs=1e-4)
            ids = [i for i, _ in c.top_logprobs[j]]
            assert ids == list(np.argsort(-np.asarray(want))[:3])
            assert ids[0] == tok  # greedy picks the top-1


def test_one_compilation_per_bucket(compile_counter):
    # a fresh config name, so no earlier test has compiled this program
    cfg = TINY_QWEN.replace(name="tiny-qwen-compile-count")
    model = Model(cfg, random_params(cfg))
    name = "jit(generate_tokens)"
    before, size = compile_counter.count(name), generate_jit._cache_size()
    generate(model, [[1, 2, 3], [4]], max_new_tokens=5)  # bucket: batch 2, prompt 16, new 16
    assert compile_counter.count(name) == before + 1
    requests = [  # every knob, and up to a slot bucket's 8 stop ids and biased / banned ids per row
        dict(prompts=[[1] * 9, [2, 3]], max_new_tokens=16, temperature=0.7, top_k=4, seed=1),
        dict(prompts=[[4] * 15, [1]], max_new_tokens=[11, 2], temperature=1.3, top_p=0.5, min_p=0.1, seed=[7, 8]),
        dict(prompts=[[9] * 16, [3, 3]], max_new_tokens=12, temperature=[0.0, 2.0], banned_ids=[3]),
        dict(prompts=[[9, 8], [3]], max_new_tokens=4, logit_bias={5: 1.0, 6: -2.0}, banned_ids=[7]),
        dict(prompts=[[9, 8], [3]], max_new_tokens=4, logit_bias=[{i: 0.5 for i in range(8)}, {}],
             stop_ids=[1, 2, 3, 4, 5, 6, 7, 8]),
    ]
    for r in requests:
        generate(model, **r)
    assert compile_counter.count(name) == before + 1, "a knob or a prompt within the bucket retraced"
    # a penalty needs the [B, V] token history: one more program, whose penalty values are traced too
    for r in (dict(repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.4, stop_ids=[1, 2, 3]),
              dict(repetition_penalty=[1.0, 2.0], temperature=0.5, seed=99), dict(frequency_penalty=0.1)):
        generate(model, [[5, 6], [7] * 16], max_new_tokens=3, **r)
    assert compile_counter.count(name) == before + 2, "a penalty value retraced the penalty program"
    assert generate_jit._cache_size() == size + 2
    before += 1
    # a new bucket compiles once more, and precompile makes the next call in it free
    precompile(model, batch=4, prompt_len=40, max_new_tokens=20)
    assert compile_counter.count(name) == before + 2
    generate(model, [[1] * 33, [2] * 40, [3]], max_new_tokens=20, temperature=0.5)
    assert compile_counter.count(name) == before + 2


def test_knobs_as_numpy_and_jax_values_equal_python_values(gemma_model):
    """A caller inside a JAX program holds knobs as arrays: 0-d arrays and NumPy scalars are numbers,
    1-d arrays one value per prompt, the same tokens as the Python values (they were refused: "temperature
    must be a finite number >= 0, got Array(0.8)")."""
    want = generate(gemma_model, PROMPTS[:2], max_new_tokens=[4, 6], temperature=[0.8, 1.0], top_k=5, seed=[7, 8],
                    stop_ids=[3], banned_ids=[4, 5], logit_bias={6: 2.0})
    got = generate(gemma_model, PROMPTS[:2], max_new_tokens=jnp.array([4, 6]), temperature=np.array([0.8, 1.0]),
                   top_k=jnp.array(5), seed=jnp.asarray([7, 8], jnp.uint32), stop_ids=np.array([3]),
                   banned_ids=jnp.array([4, 5]), logit_bias={np.int64(6): jnp.array(2.0)})
    assert [c.tokens for c in got] == [c.tokens for c in want]
    for x, y in zip(stream(gemma_model, PROMPTS[:2], max_new_tokens=np.int32(4), temperature=jnp.array(0.8)),
                    stream(gemma_model, PROMPTS[:2], max_new_tokens=4, temperature=0.8)):
        np.testing.assert_array_equal(x.tokens, y.tokens)


def test_row_tokens_independent_of_batch(gemma_model):
    prompts = PROMPTS + [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    seeds = [101, 202, 303, 404]
    knobs = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=20, seed=seeds)
    full = generate(gemma_model, prompts, **knobs)
    alone = generate(gemma_model, [prompts[1]], **{**knobs, "seed": [seeds[1]]})
    assert alone[0].tokens == full[1].tokens
    order = [3, 1, 0, 2]
    shuffled = generate(gemma_model, [prompts[i] for i in order], **{**knobs, "seed": [seeds[i] for i in order]})
    for j, i in enumerate(order):
        assert shuffled[j].tokens == full[i].tokens
    assert len({tuple(c.tokens) for c in full}) > 1


def test_stops_per_row(gemma_model):
    free = generate(gemma_model, PROMPTS, max_new_tokens=12)
    # each row stops on a token it emits at a different step
    stops, expect = [], []
    for c, at in zip(free, (1, 4, 7)):
        tok = c.tokens[at]
        stops.append([tok])
        expect.append(c.tokens[:c.tokens.index(tok) + 1])
    out = generate(gemma_model, PROMPTS, max_new_tokens=12, stop_ids=stops)
    for c, e in zip(out, expect):
        assert c.tokens == e and c.finish_reason == "stop"
    # the low-level output also says the loop ran only as long as the longest row
    from jaxgen.generate import prepare
    _, args, p = prepare(gemma_model, PROMPTS, max_new_tokens=12, stop_ids=stops)
    low = run(gemma_model, args, p)
    assert int(low.steps) == max(len(e) for e in expect)


def test_stop_id_inside_prompt_does_not_stop(gemma_model):
    prompt = PROMPTS[0]
    free = generate(gemma_model, [prompt], max_new_tokens=8)[0]
    stop = next(t for t in prompt if t not in free.tokens)
    out = generate(gemma_model, [prompt], max_new_tokens=8, stop_ids=[stop])[0]
    assert out.tokens == free.tokens and out.finish_reason == "length"


def test_max_new_tokens_per_row(gemma_model):
    out = generate(gemma_model, PROMPTS, max_new_tokens=[3, 1, 9])
    assert [len(c.tokens) for c in out] == [3, 1, 9]
    assert all(c.finish_reason == "length" for c in out)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[1, 2, 3]), "not a single prompt"),
    (dict(prompts=[[1, 99999]]), "outside"),
    (dict(prompts=[[1] * 600]), "exceeds"),
    (dict(prompts=[[1] * 500], max_new_tokens=100), "context of 512"),
    (dict(prompts=[[1]], max_new_tokens=0), r"max_new_tokens must be an integer in \[1, 32768\], got 0"),
    (dict(prompts=[[1]], max_new_tokens=-3), r"max_new_tokens must be an integer in \[1, 32768\], got -3"),
    (dict(prompts=[[1]], max_new_tokens=2.5), r"max_new_tokens must be an integer in \[1, 32768\], got 2.5"),
    (dict(prompts=[[1]], max_new_tokens=40000), r"max_new_tokens must be an integer in \[1, 32768\], got 40000"),
    (dict(prompts=[[1]], temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(prompts=[[1]], top_p=0.0), r"top_p must be a finite number in \(0, 1\]"),
    (dict(prompts=[[1]], top_p=1.01), r"top_p must be a finite number in \(0, 1\]"),
    (dict(prompts=[[1]], top_k=-2), r"top_k must be an integer in \[0, 256\]"),
    (dict(prompts=[[1]], stop_ids=[64]), r"stop_ids must be a list of token ids in \[0, 64\), got \[64\]"),
    (dict(prompts=[[1]], stop_ids=5), "stop_ids must be a list of token ids"),
    (dict(prompts=[[1]], top_logprobs=-1), r"top_logprobs must be an integer in \[0, 64\], got -1"),
    (dict(prompts=[[1]], seed=-1), r"seed must be an integer in \[0, 4294967295\], got -1"),
    (dict(prompts=[[1]], seed=[1.5]), r"seed must be an integer"),
    (dict(prompts=[[1]], whitespace=" ?"), "whitespace applies to json_schema constraints only"),
    (dict(prompts=[[1]], length_penalty=2.0), r"length_penalty only applies to beam search \(num_beams > 1\)"),
    (dict(prompts=[[1]], return_beams=True), r"return_beams only applies to beam search"),
    (dict(prompts=[[1]], include_stop="yes"), "include_stop must be true or false"),
    (dict(prompts=["hello"]), "need a model with a tokenizer"),
    (dict(prompts=None), "prompts must be a list of prompts .*, got None"),
    (dict(prompts=[[1]], banned_ids=5), r"banned_ids must be a list of token ids in \[0, 64\), got 5"),
    (dict(prompts=[[1]], num_beams=np.array(0.7)), r"num_beams must be an integer in \[1, 32\] .*, got 0.7"),
    (dict(prompts=[[1]], temperature=jnp.array([0.5, 0.7])), r"temperature must be a scalar or have one value per"),
])
def test_bad_input_is_a_clear_error_before_compiling(gemma_model, compile_counter, kwargs, msg):
    before = compile_counter.count()
    with pytest.raises(ValueError, match=msg):
        generate(gemma_model, **kwargs)
    assert compile_counter.count() == before


@pytest.mark.parametrize("kwargs, msg", [
    (dict(top_logprobs=-1), r"top_logprobs must be an integer in \[0, 64\], got -1"),
    (dict(num_beams=2), r"stream\(\) does not run beam search \(num_beams\)"),
    (dict(length_penalty=0.5), r"stream\(\) does not run beam search \(length_penalty\)"),
    (dict(chunk_steps=0), "chunk_steps must be an integer >= 1, got 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
])
def test_stream_refuses_bad_input_before_compiling(gemma_model, compile_counter, kwargs, msg):
    """stream() checks what generate() checks (it used to pass top_logprobs=-1 to XLA, and num_beams
    to `prepare`, which failed with an internal TypeError)."""
    before = compile_counter.count()
    with pytest.raises(ValueError, match=msg):
        next(stream(gemma_model, PROMPTS, **kwargs))
    assert compile_counter.count() == before


def test_plan_buckets():
    p = plan(TINY_GEMMA, batch=3, prompt_len=17, max_new=20)
    assert (p.batch, p.prompt_len, p.max_new, p.cache_len) == (4, 32, 32, 64)
    with pytest.raises(ValueError, match="context"):
        plan(TINY_GEMMA, 1, 500, 100)
    assert plan(TINY_GEMMA, 2, 500, 100, longest_row=510).cache_len == 512  # the rows fit one by one


def test_context_bounds_each_row_not_the_longest_prompt_plus_the_largest_budget(gemma_model):
    """A 400-token prompt with 10 new tokens and a 3-token prompt with 200 fit the 512-token context
    one by one, so they share a call (it refused them: 400 + 200 > 512), each row == itself alone;
    a row that does not fit is still refused, naming it."""
    prompts, budgets = [[1 + i % 60 for i in range(400)], [2, 3, 4]], [10, 200]
    out = generate(gemma_model, prompts, max_new_tokens=budgets, stop_ids=[], temperature=0.8, seed=[3, 4])
    for p, m, s, o in zip(prompts, budgets, [3, 4], out):
        alone = generate(gemma_model, [p], max_new_tokens=m, stop_ids=[], temperature=0.8, seed=[s])[0]
        assert len(o.tokens) == m and o.tokens == alone.tokens
    with pytest.raises(ValueError, match="prompt 0: 400 tokens \\+ max_new_tokens 113 exceeds"):
        generate(gemma_model, prompts, max_new_tokens=[113, 200], stop_ids=[])


def test_inside_user_jit(gemma_model):
    """The low-level function composes with a user's own jit (no host callbacks, no Python state)."""
    from jaxgen.engine import generate_tokens
    from jaxgen.generate import prepare
    _, args, p = prepare(gemma_model, PROMPTS, max_new_tokens=5)

    @jax.jit
    def user_step(params, args):
        out = generate_tokens(params, **args, cfg=gemma_model.cfg, max_new=p.max_new, cache_len=p.cache_len)
        return out.tokens, jnp.sum(out.logprobs)

    toks, _ = user_step(gemma_model.params, args)
    ref = generate(gemma_model, PROMPTS, max_new_tokens=5)
    for i, c in enumerate(ref):
        assert list(np.asarray(toks[i, :5])) == c.tokens


def reference_penalized_greedy(model, prompt, n, repetition_penalty=1.0, presence_penalty=0.0,
                               frequency_penalty=0.0, logit_bias=None, banned_ids=()):
    """Greedy decoding with sampling.py's stages 1-3 written out in numpy over a full forward pass per
    step: the repetition penalty over prompt + output so far, presence / frequency over the output's
    counts, then bias and bans. Returns (tokens, raw-model logprobs)."""
    seq, toks, lps = list(prompt), [], []
    for _ in range(n):
        raw = np.asarray(_full(model.params, jnp.asarray([seq], jnp.int32), model.cfg)[0, -1], np.float64)
        x = raw.copy()
        for t in set(seq):
            x[t] = x[t] / repetition_penalty if x[t] > 0 else x[t] * repetition_penalty
        for t in set(toks):
            x[t] -= presence_penalty + frequency_penalty * toks.count(t)
        for t, b in (logit_bias or {}).items():
            x[t] += b
        x[list(banned_ids)] = -np.inf
        tok = int(np.argmax(x))
        lps.append(raw[tok] - np.log(np.sum(np.exp(raw - raw.max()))) - raw.max())
        toks.append(tok)
        seq.append(tok)
    return toks, lps


PENALTY_CASES = [dict(repetition_penalty=3.0), dict(presence_penalty=2.0), dict(frequency_penalty=1.5),
                 dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.7),
                 dict(logit_bias={3: 2.5, 17: 1.0}, banned_ids=[5, 9]),
                 dict(presence_penalty=1.0, logit_bias={3: 2.0}, banned_ids=[4])]


@pytest.mark.parametrize("mesh", [None, "data=2,model=4"])
def test_penalties_and_bias_through_generate_equal_numpy_reference(tiny_model, mesh):
    """Every penalty, bias and ban through the compiled loop, 14 steps: the token history (seen and
    counts) must be updated by each emitted token, single device and sharded. Each case's rows also
    differ from plain greedy decoding, so a transform that did nothing would fail."""
    from jaxgen import sharding as shd

    model = tiny_model
    if mesh:
        m = shd.make_mesh(mesh)
        model = Model(tiny_model.cfg, shd.shard_params(tiny_model.params, tiny_model.cfg, m), mesh=m)
    plain = [c.tokens for c in generate(tiny_model, PROMPTS, max_new_tokens=14, stop_ids=[])]
    for case in PENALTY_CASES:
        out = generate(model, PROMPTS, max_new_tokens=14, stop_ids=[], **case)
        got = [c.tokens for c in out]
        assert got != plain, case
        for prompt, c in zip(PROMPTS, out):
            want, lps = reference_penalized_greedy(tiny_model, prompt, 14, **case)
            assert c.tokens == want, case
            np.testing.assert_allclose(c.logprobs, lps, atol=1e-4)


def test_per_row_penalties_mix_with_plain_rows(gemma_model):
    """One batch, one row penalized and one not: each equals its own reference (the penalty program
    carries the history for every row; a row with penalties off is unaffected by it)."""
    case = dict(repetition_penalty=[2.5, 1.0, 1.0], frequency_penalty=[0.0, 0.0, 1.2])
    out = generate(gemma_model, PROMPTS, max_new_tokens=12, stop_ids=[], **case)
    for i, (prompt, c) in enumerate(zip(PROMPTS, out)):
        row = {k: v[i] for k, v in case.items()}
        assert c.tokens == reference_penalized_greedy(gemma_model, prompt, 12, **row)[0], i


def test_state_carries_penalty_history_only_when_used(gemma_model):
    """A request with no penalty builds a decode state without the [B, V] seen / counts arrays."""
    from jaxgen.engine import prefill_jit
    from jaxgen.generate import prepare

    for knobs, width in ((dict(temperature=0.5, logit_bias={1: 1.0}), 0), (dict(presence_penalty=0.1), 64)):
        _, args, p = prepare(gemma_model, PROMPTS, max_new_tokens=4, **knobs)
        shape = jax.eval_shape(lambda a: prefill_jit(gemma_model.params, **a, cfg=gemma_model.cfg, max_new=p.max_new,
                                                     cache_len=p.cache_len, penalties=p.penalties), args)
        chex.assert_shape([shape.seen, shape.counts], (p.batch, width))


N_KNOBS = [dict(temperature=0.9, top_k=20, seed=5),
           dict(temperature=1.1, top_p=0.9, repetition_penalty=1.4, frequency_penalty=0.3, seed=2,
                max_new_tokens=[14, 6, 9], stop_ids=[[7], [], [3, 4]], logit_bias=[{1: 2.0}, {}, {5: -1.0}])]


@pytest.mark.parametrize("mesh", [None, "data=2,model=4"])
@pytest.mark.parametrize("knobs", N_KNOBS, ids=["top_k", "penalties+per_prompt"])
def test_n_samples_equal_repeated_prompts(tiny_model, knobs, mesh):
    """generate(prompts, n=k) == generate(each prompt repeated k times), prompt-major, token for
    token with logprobs and finish reasons (each prompt prefilled once, its cache and penalty
    history copied to its k rows); per-prompt knobs apply to all of that prompt's samples."""
    from jaxgen import sharding as shd

    model = tiny_model
    if mesh:
        m = shd.make_mesh(mesh)
        model = Model(tiny_model.cfg, shd.shard_params(tiny_model.params, tiny_model.cfg, m), mesh=m)
    k = 4
    rep = {name: [v for v in val for _ in range(k)] if isinstance(val, list) else val for name, val in knobs.items()}
    want = generate(tiny_model, [p for p in PROMPTS for _ in range(k)], **{"max_new_tokens": 14, **rep})
    got = generate(model, PROMPTS, n=k, **{"max_new_tokens": 14, **knobs})
    assert len(got) == len(want) == k * len(PROMPTS)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.tokens, g.finish_reason, g.sample) == (w.tokens, w.finish_reason, i % k), i
        assert g.prompt == PROMPTS[i // k]
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
    assert len({tuple(g.tokens) for g in got[:k]}) > 1  # the samples of one prompt differ


def test_n_samples_prefill_each_prompt_once(gemma_model):
    """The prefill program takes the P prompts (its forward pass runs over them), and returns a decode
    state of P * n rows."""
    from jaxgen.engine import prefill_jit
    from jaxgen.generate import prepare

    _, args, p = prepare(gemma_model, PROMPTS, n=8, max_new_tokens=4, temperature=1.0)
    assert args["prompts"].shape[0] == p.batch == 4 and args["seeds"].shape == (32,) and p.rows == 32
    state = jax.eval_shape(lambda a: prefill_jit(gemma_model.params, **a, cfg=gemma_model.cfg, max_new=p.max_new,
                                                 cache_len=p.cache_len, penalties=p.penalties, n=p.n), args)
    assert state.tokens.shape[0] == state.cache.lengths.shape[0] == 32


@pytest.mark.parametrize("n, msg", [(0, r"n must be an integer in \[1, 1024\], got 0"),
                                    (True, "must be an integer"), (400, "exceeds the largest batch bucket")])
def test_bad_n(gemma_model, n, msg):
    with pytest.raises(ValueError, match=msg):
        generate(gemma_model, PROMPTS, n=n)
