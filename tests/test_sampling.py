"""Each sampler's empirical distribution over many seeds matches an independent numpy reference of the
documented semantics (sort-based, as HF transformers does it), and equals HF transformers' own logits
processors (fixtures)."""
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxgen import sampling as smp

V = 24
N = 40_000  # draws per distribution test


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0, seen=None, counts=None, bias=None):
    l = np.asarray(logits, np.float64).copy()
    if seen is not None:
        pen = np.where(l > 0, l / repetition_penalty, l * repetition_penalty)
        l = np.where(seen, pen, l)
        l = l - presence_penalty * (counts > 0) - frequency_penalty * counts
    if bias is not None:
        for i, b in bias.items():
            l[i] += b
    l = l / temperature
    if top_k:
        kth = np.sort(l)[::-1][top_k - 1]
        l = np.where(l < kth, -np.inf, l)
    if top_p < 1:
        p = np.exp(l - l.max()); p /= p.sum()
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        drop = order[before >= top_p]
        l[drop] = -np.inf
    if min_p:
        p = np.exp(l - l.max()); p /= p.sum()
        l = np.where(p < min_p * p.max(), -np.inf, l)
    p = np.exp(l - l.max())
    return p / p.sum()


def draw(logits, n=N, seen=None, counts=None, candidates=smp.DEFAULT_CANDIDATES, **knobs):
    knobs.setdefault("temperature", 1.0)
    sp = smp.make_sampling_params(n, vocab_size=V, candidates=candidates, **knobs)
    keys = smp.row_keys(jnp.arange(n, dtype=jnp.uint32), 7)
    lg = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, V))
    if seen is not None:
        seen, counts = (jnp.broadcast_to(jnp.asarray(a), (n, V)) for a in (seen, counts))
    f = jax.jit(smp.sample, static_argnames="candidates")
    return np.asarray(f(lg, keys, sp, seen, counts, candidates=candidates))


def assert_matches(samples, probs):
    obs = np.bincount(samples, minlength=V)
    assert obs[probs == 0].sum() == 0, f"drew tokens of probability 0: {np.nonzero(obs * (probs == 0))}"
    support = probs > 0
    if support.sum() == 1:
        return
    exp = probs[support] * len(samples)
    chi2 = ((obs[support] - exp) ** 2 / exp).sum()
    p_value = stats.chi2.sf(chi2, support.sum() - 1)
    assert p_value > 1e-3, f"chi2={chi2:.1f} p={p_value:.2g}\nobs={obs}\nexp={np.round(probs * len(samples))}"


LOGITS = np.random.default_rng(0).normal(size=V).astype(np.float32) * 1.5

CASES = {
    "temperature-1": dict(),
    "temperature-0.7": dict(temperature=0.7),
    "temperature-2": dict(temperature=2.0),
    "top_k-5": dict(top_k=5),
    "top_p-0.8": dict(top_p=0.8),
    "top_p-0.3-temp-1.5": dict(top_p=0.3, temperature=1.5),
    "min_p-0.1": dict(min_p=0.1),
    "top_k-top_p-min_p": dict(top_k=10, top_p=0.9, min_p=0.05, temperature=1.3),
    "bias-and-ban": dict(logit_bias={3: 2.0, 5: -1.0}, banned_ids=[int(np.argmax(LOGITS))]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_distribution_matches_reference(case):
    knobs = dict(CASES[case])
    bias = dict(knobs.get("logit_bias", {}))
    for i in knobs.get("banned_ids", []):
        bias[i] = -np.inf
    ref_knobs = {k: v for k, v in knobs.items() if k not in ("logit_bias", "banned_ids")}
    probs = reference_probs(LOGITS, bias=bias or None, **ref_knobs)
    assert_matches(draw(LOGITS, **knobs), probs)


def test_default_is_greedy():
    assert np.all(draw(LOGITS, n=100, temperature=0.0) == np.argmax(LOGITS))
    assert np.all(np.asarray(smp.make_sampling_params(2).temperature) == 0.0)


def test_penalties_distribution():
    rng = np.random.default_rng(1)
    seen = rng.random(V) < 0.4
    counts = np.where(seen & (rng.random(V) < 0.5), rng.integers(1, 4, V), 0).astype(np.int32)
    knobs = dict(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.3)
    probs = reference_probs(LOGITS, seen=seen, counts=counts, **knobs)
    assert_matches(draw(LOGITS, seen=seen, counts=counts, **knobs), probs)
    # and the penalties really moved the distribution
    assert np.abs(probs - reference_probs(LOGITS)).max() > 0.02


def test_nucleus_larger_than_candidate_set_uses_exact_fallback():
    """A flat distribution whose nucleus needs more tokens than the 4 candidates: the bisection path."""
    flat = np.linspace(0.0, 1.0, V).astype(np.float32)
    for top_p in (0.5, 0.9, 0.97):
        probs = reference_probs(flat, top_p=top_p)
        assert (probs > 0).sum() > 4
        sp = smp.make_sampling_params(1, temperature=1.0, top_p=top_p, candidates=4)
        thr = smp.keep_threshold(jnp.asarray(flat)[None], sp, candidates=4)
        np.testing.assert_array_equal(flat >= np.asarray(thr)[0], probs > 0)
    assert_matches(draw(flat, top_p=0.9, candidates=4), reference_probs(flat, top_p=0.9))


def test_mixed_rows_in_one_batch():
    """Per-row knobs: greedy, top-k and top-p rows side by side in one call."""
    n = 3 * 8000
    temp = np.repeat([0.0, 1.0, 1.0], n // 3)
    top_k = np.repeat([0, 3, 0], n // 3)
    top_p = np.repeat([1.0, 1.0, 0.6], n // 3)
    s = draw(LOGITS, n=n, temperature=temp, top_k=top_k, top_p=top_p)
    a, b, c = np.split(s, 3)
    assert np.all(a == np.argmax(LOGITS))
    assert_matches(b, reference_probs(LOGITS, top_k=3))
    assert_matches(c, reference_probs(LOGITS, top_p=0.6))


def test_top1_and_tiny_temperature_equal_greedy():
    logits = jax.random.normal(jax.random.key(3), (500, V)) * 3
    keys = smp.row_keys(jnp.arange(500, dtype=jnp.uint32), 0)
    greedy = np.argmax(np.asarray(logits), axis=-1)
    for knobs in (dict(top_k=1, temperature=1.0), dict(temperature=1e-4), dict(temperature=0.0, top_p=0.5, top_k=7)):
        sp = smp.make_sampling_params(500, **knobs)
        np.testing.assert_array_equal(smp.sample(logits, keys, sp), greedy, err_msg=str(knobs))


def test_row_sample_independent_of_batch():
    logits = jax.random.normal(jax.random.key(4), (6, V))
    seeds = jnp.array([11, 22, 33, 44, 55, 66], jnp.uint32)
    sp = smp.make_sampling_params(6, temperature=1.0, top_p=0.9)
    full = np.asarray(smp.sample(logits, smp.row_keys(seeds, 5), sp))
    perm = np.array([4, 0, 5, 2])
    sub = smp.make_sampling_params(4, temperature=1.0, top_p=0.9)
    part = np.asarray(smp.sample(logits[perm], smp.row_keys(seeds[perm], 5), sub))
    np.testing.assert_array_equal(part, full[perm])


@pytest.mark.parametrize("knobs,msg", [
    (dict(temperature=-0.5), re.escape("temperature must be a finite number >= 0 (0 = greedy), got -0.5")),
    (dict(top_p=0.0), re.escape("top_p must be a finite number in (0, 1] (1 = off), got 0.0")),
    (dict(top_p=1.5), re.escape("top_p must be a finite number in (0, 1] (1 = off), got 1.5")),
    (dict(top_k=-1), re.escape("top_k must be an integer in [0, 256] (0 = off), got -1")),
    (dict(top_k=300), re.escape("top_k must be an integer in [0, 256] (0 = off), got 300")),
    (dict(top_k=2.5), re.escape("top_k must be an integer in [0, 256] (0 = off), got 2.5")),
    (dict(min_p=2.0), re.escape("min_p must be a finite number in [0, 1] (0 = off), got 2.0")),
    (dict(repetition_penalty=0.0), re.escape("repetition_penalty must be a finite number > 0 (1 = off), got 0.0")),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(presence_penalty=float("inf")), "presence_penalty must be a finite number"),
    (dict(temperature=[1.0, 2.0]), "one value per prompt"),
    (dict(temperature=[1.0, -2.0, 1.0]), "temperature must be a finite number >= 0 .*got -2.0"),
    (dict(banned_ids=[V + 3]), re.escape(f"banned_ids must be a list of token ids in [0, {V}), got [{V + 3}]")),
    (dict(logit_bias={1: float("nan")}), "logit_bias must be a {token id: finite number or -inf} mapping"),
])
def test_bad_knobs(knobs, msg):
    with pytest.raises(ValueError, match=msg):
        smp.make_sampling_params(3, vocab_size=V, **knobs)


def test_two_level_categorical_across_blocks():
    """The inverse-CDF draw picks a block, then an id in it: with a vocabulary of several blocks and the
    mass spread over ids in different blocks (first, middle, last partial block), the empirical
    distribution matches exactly and nothing of probability 0 is drawn."""
    vocab, block = 1300, 512  # 3 blocks, the last one partial
    ids = np.array([0, 511, 512, 700, 1023, 1024, 1299])
    logits = np.full(vocab, -np.inf, np.float32)
    logits[ids] = np.random.default_rng(1).normal(size=len(ids))
    n = 30_000
    keys = smp.row_keys(jnp.arange(n, dtype=jnp.uint32), 3)
    got = np.asarray(jax.jit(smp.categorical, static_argnames="block")(
        keys, jnp.broadcast_to(jnp.asarray(logits), (n, vocab)), block=block))
    p = np.exp(logits[ids] - logits[ids].max())
    p /= p.sum()
    assert np.isin(got, ids).all()
    obs = np.array([(got == i).sum() for i in ids])
    chi2 = ((obs - p * n) ** 2 / (p * n)).sum()
    assert stats.chi2.sf(chi2, len(ids) - 1) > 1e-3, (obs, np.round(p * n))


BIG_V = 65536  # large enough for the two-level argmax / candidate search (>= 4 * 256 blocks of 64)


def test_two_level_argmax_and_candidates_are_exact():
    """With many ties: argmax is jnp.argmax's first maximum; the candidates are lax.top_k over the whole
    row, values and ids (ties to the lower id, not to the block with the larger maximum)."""
    x = jnp.asarray(np.random.default_rng(3).integers(-50, 50, size=(6, BIG_V)).astype(np.float32))
    x = x.at[2, 70_00].set(60.0).at[2, 65_000].set(60.0)  # a tie for the maximum across blocks
    np.testing.assert_array_equal(jax.jit(smp.argmax)(x), jnp.argmax(x, axis=-1))
    got = jax.jit(smp.top_candidates, static_argnums=1)(x, 256)
    for g, w in zip(got, jax.lax.top_k(x, 256)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("C", [1, 3, 8, 16])
def test_two_level_candidates_equal_lax_top_k_at_tied_boundaries(C):
    """Blocks of 4 ids, values from a handful and a few large ones that rank their blocks first wherever
    they sit: the C-th value is tied across blocks of every rank, inside and outside the chosen ones.
    The two-level search keeps the same ids in the same order as lax.top_k (what a mesh's per-shard
    search and merge relies on); -inf rows and a row of one value included."""
    rng = np.random.default_rng(C)
    x = rng.integers(0, 4, size=(256, 64 * 4)).astype(np.float32)
    x[::7] = rng.integers(0, 2, size=x[::7].shape)
    for row in x[::2]:  # a few large values rank their blocks first, wherever they are
        row[rng.choice(row.size, C // 2 + 1, replace=False)] = rng.integers(5, 7, C // 2 + 1)
    x[1], x[2, 100:] = -np.inf, -np.inf
    x[3] = 2.0
    got = jax.jit(smp.top_candidates, static_argnums=(1, 2))(jnp.asarray(x), C, 4)
    for g, w in zip(got, jax.lax.top_k(x, C)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("case", ["top_k-5", "top_p-0.8", "top_k-top_p-min_p", "temperature-0.7"])
def test_large_vocabulary_distribution_matches_reference(case):
    """The draw among the candidates (kept set inside them) and over the vocabulary (no filter) at a
    vocabulary where both two-level searches run: the same distribution as the reference."""
    knobs = dict(CASES[case], temperature=CASES[case].get("temperature", 1.0))
    where = np.random.default_rng(4).choice(BIG_V, V, replace=False)  # the 24 live ids, scattered
    logits = np.full(BIG_V, -40.0, np.float32)
    logits[where] = LOGITS
    probs = reference_probs(LOGITS, **knobs)
    sp = smp.make_sampling_params(1000, vocab_size=BIG_V, **knobs)
    f = jax.jit(smp.sample)
    lg = jnp.broadcast_to(jnp.asarray(logits), (1000, BIG_V))
    back = np.full(BIG_V, -1)
    back[where] = np.arange(V)
    samples = np.concatenate([back[np.asarray(f(lg, smp.row_keys(jnp.arange(1000, dtype=jnp.uint32) + 1000 * c, 7), sp))]
                              for c in range(20)])
    assert (samples >= 0).all(), "drew an id outside the live ones"
    assert_matches(samples, probs)


HF = json.loads((pathlib.Path(__file__).parent / "fixtures" / "sampling-hf.json").read_text())


def test_distributions_equal_hf_logits_processors():
    """The distribution a row draws from equals the one HF transformers' generate(do_sample=True) draws
    from (RepetitionPenalty, Temperature, TopK, TopP and MinP processors; tools/make_sampling_fixtures.py):
    the same kept ids and probabilities within float32 rounding (2e-5 relative), over 240 random cases (ties, -inf logits, 5 to 1,000
    ids, so the nucleus fallback past the candidate set too)."""
    fn = jax.jit(smp.distribution_logits)
    for c in HF["cases"]:
        V = len(c["logits"])
        x = jnp.array([[-np.inf if v is None else v for v in c["logits"]]], jnp.float32)
        sp = smp.make_sampling_params(1, temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"],
                                      min_p=c["min_p"], repetition_penalty=c["repetition_penalty"], vocab_size=V)
        seen = np.zeros((1, V), bool)
        seen[0, c["seen"]] = True
        d = fn(x, jax.tree.map(jnp.asarray, sp), jnp.asarray(seen), jnp.zeros((1, V), jnp.int32))[0]
        want = np.zeros(V)
        ids, p = zip(*c["probs"])
        want[list(ids)] = p
        knobs = {k: c[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
        assert sorted(np.nonzero(np.isfinite(np.asarray(d)))[0].tolist()) == sorted(ids), (V, knobs)
        np.testing.assert_allclose(np.asarray(jax.nn.softmax(d)), want, rtol=2e-5, atol=1e-6, err_msg=str(knobs))
