"""Speculative decoding on tiny random models: greedy output equals plain greedy token for token (draft
model and prompt lookup, stops mid-draft, ragged rows), sampled output is distributed exactly as plain
sampling (chi-square over many seeds, with top-k / top-p and penalties), one compile per bucket."""
import numpy as np
import pytest
from scipy import stats as st

import jax
import jax.numpy as jnp

from jaxgen import speculative as S
from jaxgen.cache import init_cache
from jaxgen.generate import generate
from jaxgen.model import Model
from jaxgen.model import forward

from .conftest import TINY_GEMMA, TINY_QWEN, CompileCounter, random_params


def _prompts():
    rng = np.random.default_rng(0)
    ps = [list(map(int, rng.integers(0, 64, n))) for n in (3, 9, 14, 5, 20, 1)]
    ps[1] = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]  # repeats: prompt lookup finds continuations
    return ps


@pytest.fixture(scope="module", params=[TINY_GEMMA, TINY_QWEN], ids=["gemma", "qwen"])
def pair(request):
    cfg = request.param
    return Model(cfg, random_params(cfg)), Model(cfg, random_params(cfg, seed=5))


@pytest.mark.parametrize("kind", ["self", "other", "lookup"])
def test_greedy_equals_plain_greedy(pair, kind):
    target, other = pair
    prop = {"self": S.Proposer(gamma=4, draft=target), "other": S.Proposer(gamma=3, draft=other),
            "lookup": S.Proposer(gamma=5, ngram=2)}[kind]
    prompts = _prompts()
    for stop in ([], [7, 11]):  # with stop ids, rows end inside a drafted block
        ref = generate(target, prompts, max_new_tokens=[30, 25, 30, 7, 30, 12], stop_ids=stop)
        out, stats = S.generate(target, prompts, prop, max_new_tokens=[30, 25, 30, 7, 30, 12], stop_ids=stop)
        for r, o in zip(ref, out):
            assert o.tokens == r.tokens and o.finish_reason == r.finish_reason
            np.testing.assert_allclose(o.logprobs, r.logprobs, atol=2e-4)
    if kind == "self":  # the target drafting for itself: every draft accepted
        assert stats.acceptance_rate > 0.9 and stats.tokens_per_pass > 3  # (a row's last pass is cut short)
    assert stats.passes < stats.new_tokens or kind == "other"


_forward = jax.jit(forward, static_argnames="cfg")


def _reference_probs(logits, seq, n_prompt, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                     presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None):
    """The sampling distribution in plain numpy, written from sampling.py's docstring (an independent
    reference: repetition penalty over prompt + output, presence / frequency over the output's counts,
    logit bias, temperature, top-k, then top-p with ties kept)."""
    x = np.asarray(logits, np.float64).copy()
    seen = np.zeros(x.shape, bool)
    seen[list(seq)] = True
    x = np.where(seen, np.where(x > 0, x / repetition_penalty, x * repetition_penalty), x)
    counts = np.bincount(np.asarray(seq[n_prompt:], int), minlength=x.shape[0])
    x = x - presence_penalty * (counts > 0) - frequency_penalty * counts
    for t, b in (logit_bias or {}).items():
        x[t] += b
    x = x / temperature
    if top_k:
        x = np.where(x >= np.sort(x)[::-1][top_k - 1], x, -np.inf)
    if top_p < 1.0:
        p = np.exp(x - x.max())
        p /= p.sum()
        above = np.array([p[p > v].sum() for v in p])  # mass strictly above each token
        x = np.where(above < top_p, x, -np.inf)
    p = np.exp(x - x.max())
    return p / p.sum()


def _exact_joint(model, prompt, sp_kw, n):
    """Exact distribution of the first n new tokens (plain sampling) by enumeration over the support."""
    cfg = model.cfg

    def dist(seq):
        t = jnp.asarray([seq], jnp.int32)
        logits = _forward(model.params, t, jnp.arange(len(seq))[None], init_cache(cfg, 1, 80), cfg)[0][0, -1]
        return _reference_probs(logits, seq, len(prompt), **sp_kw)

    joint = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, pr in joint.items():
            d = dist(list(prompt) + list(seq))
            for tkn in np.nonzero(d > 1e-9)[0]:
                nxt[seq + (int(tkn),)] = pr * float(d[tkn])
        joint = nxt
    return joint


# A short prompt with repeats: prompt lookup (ngram 1) proposes continuations, and most drafted tokens
# are new (so a drafted token's repetition penalty is visible). 4 new tokens with gamma 2: the prefill's
# token, then one pass that can emit both drafts and the bonus token.
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]
N_NEW, N_SAMPLES = 4, 2048
CASES = {"top_k": dict(temperature=1.0, top_k=3),
         # favoured ids keep the nucleus (and the joint's support) small enough for the chi-square
         "top_p+penalty": dict(temperature=1.0, top_p=0.8, repetition_penalty=1.5,
                               logit_bias={20: 3.0, 21: 3.0, 22: 3.0, 23: 3.0}),
         # three favoured ids that every penalty pushes apart: a drafted token's penalty decides the next
         "bias+penalties": dict(temperature=1.0, top_k=4, repetition_penalty=1.5, presence_penalty=1.5,
                                frequency_penalty=1.0, logit_bias={10: 3.0, 11: 3.0, 12: 3.0})}
# where drafts are accepted often enough that passes emit both drafts and the bonus token
BONUS = {("other", "bias+penalties"), ("lookup", "top_k")}


def _chi2(kind, sp_kw):
    """(p-value of the chi-square test of speculative samples against the exact joint of N_NEW tokens,
    SpecStats summed over the calls)."""
    cfg = TINY_GEMMA
    target, draft = Model(cfg, random_params(cfg)), Model(cfg, random_params(cfg, seed=5))
    prop = S.Proposer(gamma=2, draft=draft) if kind == "other" else S.Proposer(gamma=2, ngram=1)
    exact = _exact_joint(target, PROMPT, sp_kw, N_NEW)
    half = N_SAMPLES // 2  # two calls of the largest batch bucket, one seed per row
    seen, total = {}, None
    for first in (0, half):
        out, stats = S.generate(target, [PROMPT] * half, prop, max_new_tokens=N_NEW, stop_ids=[],
                                seed=list(range(first, first + half)), **sp_kw)
        total = stats if total is None else S.SpecStats(
            **{f: getattr(total, f) + getattr(stats, f) for f in ("passes", "drafted", "accepted", "new_tokens",
                                                                   "prefill_tokens")}, gamma=2)
        for o in out:
            seen[tuple(o.tokens)] = seen.get(tuple(o.tokens), 0) + 1
    if not set(seen) <= set(exact):
        return 0.0, total
    # chi-square over the joint of N_NEW tokens (cells with expected count < 5 pooled)
    keys = sorted(exact, key=lambda k: -exact[k])
    exp = np.array([exact[k] * N_SAMPLES for k in keys])
    obs = np.array([seen.get(k, 0) for k in keys])
    big = exp >= 5  # keys sorted by probability: the big cells come first
    exp_c, obs_c = list(exp[big]), list(obs[big])
    if exp[~big].sum() >= 5:
        exp_c.append(exp[~big].sum()), obs_c.append(obs[~big].sum())
    else:  # too little left for a cell of its own: fold it into the smallest big cell
        exp_c[-1] += exp[~big].sum()
        obs_c[-1] += obs[~big].sum()
    exp_c, obs_c = np.array(exp_c), np.array(obs_c)
    assert len(exp_c) >= 4
    return st.chisquare(obs_c, exp_c * obs_c.sum() / exp_c.sum()).pvalue, total


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["other", "lookup"])
def test_sampled_tokens_follow_the_target_distribution(case, kind):
    p, stats = _chi2(kind, CASES[case])
    assert p > 1e-3, p
    assert stats.accepted > 50  # drafts were accepted (the accept path is what is tested), not only corrections
    assert stats.tokens_per_pass <= 3 and 0 < stats.acceptance_rate <= 1
    if (kind, case) in BONUS:  # many passes emitted both drafts and the bonus (3 tokens after the prefill's)
        assert stats.new_tokens - stats.prefill_tokens > 1.2 * stats.passes, stats


@pytest.fixture
def mutated(monkeypatch):
    """Swap a piece of speculative.py for a deliberately wrong one; compiled programs are dropped
    before and after, so the mutation is traced and then forgotten."""
    def apply(name, fn):
        monkeypatch.undo()  # one mutation at a time
        jax.clear_caches()
        monkeypatch.setattr(S, name, fn)
    yield apply
    monkeypatch.undo()
    jax.clear_caches()


def test_negative_controls_fail_the_distribution_test(mutated):
    """The distribution test can fail: skipping the drafted tokens' penalty update, or drawing the
    bonus token from the last draft's distribution instead of the one after it, gives p < 1e-3."""
    right = S._correction_logits

    def bonus_from_wrong_position(p, lse_p, q, lse_q, drafts, n_acc, gamma):
        prev = p[:, gamma - 1] - lse_p[:, gamma - 1:gamma]
        return jnp.where((n_acc == gamma)[:, None], prev, right(p, lse_p, q, lse_q, drafts, n_acc, gamma))

    mutated("_with_drafts", lambda seen, counts, drafts, upto, active: (seen, counts) if seen.shape[1] else (None, None))
    assert _chi2("other", CASES["bias+penalties"])[0] < 1e-3
    mutated("_correction_logits", bonus_from_wrong_position)
    assert _chi2("lookup", CASES["top_k"])[0] < 1e-3


def test_one_compile_per_bucket_and_knobs_are_traced():
    cfg = TINY_GEMMA
    target = Model(cfg, random_params(cfg))
    prop = S.Proposer(gamma=4, ngram=2)
    counter = CompileCounter()
    S.generate(target, _prompts(), prop, max_new_tokens=20, temperature=0.7, top_k=5, seed=1)
    n = len(counter.names)
    S.generate(target, _prompts()[::-1], prop, max_new_tokens=17, temperature=0.0, top_p=0.5, seed=2,
               banned_ids=[3])
    assert len(counter.names) == n, counter.names[n:]
    # penalties carry the token history: one more program, in which their values are traced
    S.generate(target, _prompts(), prop, max_new_tokens=17, repetition_penalty=1.2)
    n = len(counter.names)
    S.generate(target, _prompts(), prop, max_new_tokens=20, presence_penalty=0.5, frequency_penalty=0.2,
               temperature=0.5)
    assert len(counter.names) == n, counter.names[n:]


def test_bad_speculative_specs():
    with pytest.raises(ValueError, match="gamma"):
        S.Proposer(gamma=0)
    with pytest.raises(ValueError, match="name a proposer"):
        S.parse("gamma=4")
    with pytest.raises(ValueError, match="bad --speculative"):
        S.parse("lookup,foo=1")
    assert S.parse("lookup,ngram=2,gamma=6") == S.Proposer(gamma=6, ngram=2)
    assert S.parse("draft=x,gamma=3").draft == "x"
    assert S.with_draft(S.parse("draft=x,gamma=3"), lambda name: name + "!").draft == "x!"
    with pytest.raises(ValueError, match="mesh or top_logprobs"):
        S.parse("lookup", top_logprobs=2)
    with pytest.raises(ValueError, match="load it first"):
        S.generate(Model(TINY_QWEN, random_params(TINY_QWEN)), [[1, 2]], S.parse("draft=x"))
    small = Model(TINY_QWEN.replace(vocab_size=32), random_params(TINY_QWEN.replace(vocab_size=32)))
    with pytest.raises(ValueError, match="vocabulary"):
        S.generate(Model(TINY_QWEN, random_params(TINY_QWEN)), [[1, 2]], S.Proposer(draft=small))


def test_context_bounds_each_row():
    """Each row needs its prompt + max_new_tokens + gamma + 1 slots: a 400-token prompt with 10 new
    tokens and an 8-token one with 100 run together in the 512-token context (the bucketed cache, 512
    slots + gamma + 1, refused them), equal to plain greedy; a row past the context is refused, naming
    its need."""
    model = Model(TINY_GEMMA, random_params(TINY_GEMMA))
    prompts, prop = [[1 + i % 7 for i in range(400)], [2, 3, 4, 2, 3, 4, 2, 3]], S.Proposer(gamma=4, ngram=2)
    out, _ = S.generate(model, prompts, prop, max_new_tokens=[10, 100], stop_ids=[])
    plain = generate(model, prompts, max_new_tokens=[10, 100], stop_ids=[])
    assert [o.tokens for o in out] == [p.tokens for p in plain] and [len(o.tokens) for o in out] == [10, 100]
    with pytest.raises(ValueError, match="gamma \\+ 1 = 513 tokens exceeds the context of 512"):
        S.generate(model, prompts, prop, max_new_tokens=[108, 100], stop_ids=[])


def test_quantized_target_and_int8_cache():
    """Speculation over int8 weights and an int8 KV cache (rolled back by length like the float one)
    gives the same greedy tokens as plain decoding of that quantized model."""
    import dataclasses

    from jaxgen import quant

    cfg = TINY_GEMMA
    m = Model(cfg, quant.quantize_params(random_params(cfg), "int8"), kv_quant="int8")
    draft = dataclasses.replace(m, params=quant.quantize_params(random_params(cfg, seed=5), "int4"))
    ref = generate(m, _prompts(), max_new_tokens=24, stop_ids=[])
    for prop in (S.Proposer(gamma=3, ngram=2), S.Proposer(gamma=3, draft=draft), S.Proposer(gamma=4, draft=m)):
        out, _ = S.generate(m, _prompts(), prop, max_new_tokens=24, stop_ids=[])
        assert [o.tokens for o in out] == [r.tokens for r in ref]

