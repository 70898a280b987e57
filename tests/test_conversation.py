"""Multi-turn conversations on a kept KV cache (jaxgen.conversation). The contract: each turn ==
a fresh `generate` over each row's whole history so far, same knobs and seeds (greedy and sampled
tokens identical, log-probs within 2e-4), across turns with ragged segments, rows that sit a turn
out, sliding windows the history outgrows, n samples, int8 KV, a 2x4 mesh, stop strings and
constraints; the in-jit episode == the host API's."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import conversation as cv
from jaxgen import sampling as smp
from jaxgen import sharding as shd
from jaxgen.generate import generate
from jaxgen.model import Model, score
from tests.conftest import TINY_GEMMA, TINY_QWEN, random_params
from tests.test_stops import PieceTokenizer

TOL = 2e-4


@functools.lru_cache
def model(name="gemma", mesh=None, kv_quant=None, window=None):
    cfg = {"gemma": TINY_GEMMA, "qwen": TINY_QWEN}[name]
    if window:  # a Gemma-3-sized window, outgrown by the history
        cfg = cfg.replace(name=f"tiny-gemma-w{window}", sliding_window=window, max_seq_len=2048)
    params = random_params(cfg)
    m = None
    if mesh:
        m = shd.make_mesh(mesh)
        params = shd.shard_params(params, cfg, m)
    return Model(cfg, params, tokenizer=PieceTokenizer(cfg.vocab_size), mesh=m, kv_quant=kv_quant)


def ids(rng, k, V=64):
    return [int(t) for t in rng.integers(1, V, size=k)]


def rows_of(name, value, rows, R):
    """A knob given per row (a list of R values; stop_ids' are lists), for the subset `rows`; a
    knob for every row stays."""
    per_row = isinstance(value, list) and len(value) == R and (name != "stop_ids" or isinstance(value[0], list))
    return [value[i] for i in rows] if per_row else value


def check_turn(m, conv, out, turn, tol=TOL, **kw):
    """Turn `turn`'s completions `out` == a fresh generate over the histories before each reply."""
    rows = [i for i, c in enumerate(out) if c is not None]
    prompts = [conv.history(i).tokens[:len(conv.history(i).tokens) - len(out[i].tokens)] for i in rows]
    seeds = [(turn * 1_000_003 + i) % 2 ** 31 for i in rows]
    ref = generate(m, prompts, seed=seeds, **{k: rows_of(k, v, rows, len(out)) for k, v in kw.items()})
    for i, r in zip(rows, ref):
        c = out[i]
        assert c.tokens == r.tokens, (turn, i)
        assert c.finish_reason == r.finish_reason and c.stop_reason == r.stop_reason, (turn, i)
        np.testing.assert_allclose(c.logprobs, r.logprobs, atol=tol, err_msg=f"turn {turn} row {i}")
    return rows


def run_episode(m, prompts, segments, conv_kw=None, tol=TOL, check=True, **kw):
    """A conversation: the prompts, then each list of segments; every turn checked against a fresh
    generate (unless check=False). Returns the conversation and its outputs per turn."""
    conv = cv.Conversation(m, max_len=256, **(conv_kw or {}))
    outs = [conv.generate(prompts, **kw)]
    n = (conv_kw or {}).get("n", 1)
    if not check:
        outs += [conv.generate(segs, **kw) for segs in segments]
        return conv, outs
    check_turn(m, conv, outs[0], 0, tol, **{k: ([x for x in v for _ in range(n)] if isinstance(v, list) else v)
                                       for k, v in kw.items()})
    for t, segs in enumerate(segments, start=1):
        outs.append(conv.generate(segs, **kw) if n == 1 else conv.generate(segs, **{k: v for k, v in kw.items()
                                                                                     if not isinstance(v, list)}))
        check_turn(m, conv, outs[-1], t, tol, **(kw if n == 1 else {k: v for k, v in kw.items() if not isinstance(v, list)}))
    return conv, outs


MIXED = dict(temperature=[0.0, 0.8, 1.0], top_k=[0, 0, 10], top_p=[1.0, 0.9, 1.0], max_new_tokens=[6, 9, 12],
             stop_ids=[[7], [7], [7]])


_EPISODES = {}


@pytest.mark.parametrize("name", ["gemma", "qwen"])
def test_turns_equal_fresh_generate(name):
    """Four turns, ragged prompts and segments, greedy and sampled rows, a stop id, a row sitting a
    turn out; the tiny Gemma's 5-token window is outgrown at once."""
    rng = np.random.default_rng(1)
    m = model(name)
    segments = [[ids(rng, 5), ids(rng, 2), ids(rng, 9)], [ids(rng, 3), None, ids(rng, 1)],
                [ids(rng, 7), ids(rng, 4), ids(rng, 2)]]
    prompts = [ids(rng, 7), ids(rng, 12), ids(rng, 3)]
    conv, outs = _EPISODES[name] = run_episode(m, prompts, segments, **MIXED)
    assert outs[2][1] is None  # sat out
    # the history: prompt, then replies and segments, the replies marked
    h = conv.history(2)
    assert h.tokens == prompts[2] + [t for o, s in zip(outs, [None] + segments) for t in (s[2] if s else []) + o[2].tokens]
    assert sum(h.generated) == sum(len(o[2].tokens) for o in outs)
    assert [t for t, g in zip(h.tokens, h.generated) if g] == [t for o in outs for t in o[2].tokens]


def test_history_is_what_score_takes():
    """histories() in jaxgen.score's layout: its teacher-forced log-probs at the generated tokens
    equal the log-probs generation reported; environment tokens are masked out."""
    if "gemma" not in _EPISODES:
        test_turns_equal_fresh_generate("gemma")
    conv, outs = _EPISODES["gemma"]
    m = model()
    h = conv.histories()
    lp = np.asarray(score(m.params, jnp.asarray(h["tokens"]), jnp.asarray(h["lengths"]), m.cfg))  # [R, L - 1]
    gen = h["generated"][:, 1:]
    np.testing.assert_allclose(lp[gen], h["logprobs"][:, 1:][gen], atol=TOL)
    assert gen.sum() == sum(len(c.tokens) for o in outs for c in o if c) and not h["generated"][:, 0].any()


def test_history_outgrows_a_512_window():
    """Gemma 3's 512-token window: the ring buffer wraps inside the kept cache over the turns."""
    rng = np.random.default_rng(3)
    m = model(window=512)
    conv = cv.Conversation(m, max_len=1024)
    kw = dict(max_new_tokens=16, stop_ids=[])
    out = conv.generate([ids(rng, 480), ids(rng, 300)], **kw)
    check_turn(m, conv, out, 0, **kw)
    for t, k in enumerate((120, 200), start=1):
        out = conv.generate([ids(rng, k), ids(rng, k // 2)], **kw)
        check_turn(m, conv, out, t, **kw)
    assert len(conv.history(0).tokens) > 800 > 512


def test_n_samples_continue_their_own_branches():
    rng = np.random.default_rng(4)
    m = model()
    conv, outs = run_episode(m, [ids(rng, 6), ids(rng, 3)], [[ids(rng, k) for k in (2, 5, 1, 3)]] * 2,
                             conv_kw=dict(n=2), temperature=1.0, max_new_tokens=10, stop_ids=[])
    assert conv.rows == 4 and [c.sample for c in outs[0]] == [0, 1, 0, 1]
    assert outs[0][0].tokens != outs[0][1].tokens  # the samples differ, and each continues its own


def test_int8_kv_cache():
    """int8 KV: identical tokens; log-probs within 2e-3, not 2e-4: a reply's keys were computed one
    token at a time here and in one prefill pass there, and a float rounding difference between the
    two can move a stored value by one int8 step (measured: 7.4e-4; in float32, 2e-6)."""
    rng = np.random.default_rng(5)
    run_episode(model(kv_quant="int8"), [ids(rng, 9), ids(rng, 2)], [[ids(rng, 4), ids(rng, 11)]] * 2,
                tol=2e-3, max_new_tokens=8, stop_ids=[])


def test_mesh_equals_one_device():
    """On a data=2, model=4 mesh: each turn == a fresh generate on the mesh, and the same tokens
    as the conversation on one device."""
    rng = np.random.default_rng(6)
    prompts = [ids(rng, 5), ids(rng, 8), ids(rng, 2)]
    segs = [[ids(rng, 3), None, ids(rng, 6)], [ids(rng, 2), ids(rng, 2), ids(rng, 2)]]
    kw = dict(temperature=0.9, max_new_tokens=7, stop_ids=[])
    _, on_mesh = run_episode(model(mesh="data=2,model=4"), prompts, segs, **kw)
    _, alone = run_episode(model(), prompts, segs, check=False, **kw)
    for a, b in zip(on_mesh, alone):
        assert [c and c.tokens for c in a] == [c and c.tokens for c in b]


def test_stop_strings_and_constraints_per_turn():
    """Rows end their turn on a stop string (its text cut, as generate cuts it) and a turn can be
    constrained; the next turn continues after every token the reply generated."""
    rng = np.random.default_rng(7)
    m = model()
    stop = ["</answer>", "ab"]
    conv, outs = run_episode(m, [ids(rng, 5), ids(rng, 7)], [[ids(rng, 2), ids(rng, 3)]], temperature=1.0,
                             max_new_tokens=24, stop=stop, stop_ids=[])
    assert any(c.stop_reason in stop for o in outs for c in o), "no row ended on a stop string"
    out = conv.generate([ids(rng, 3), ids(rng, 4)], regex="a[b-d]{2,5}e", max_new_tokens=16, stop_ids=[0])
    check_turn(m, conv, out, 2, regex="a[b-d]{2,5}e", max_new_tokens=16, stop_ids=[0])
    for c in out:
        assert c.text[0] == "a" and set(c.text[1:-1]) <= set("bcd") and c.text[-1] == "e", c.text


def test_penalties_over_the_whole_history():
    """penalties=True: repetition / presence / frequency penalties see every token of the history, as
    a fresh generate over it does."""
    rng = np.random.default_rng(8)
    kw = dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3, max_new_tokens=10, stop_ids=[])
    run_episode(model(), [ids(rng, 5), ids(rng, 9)], [[ids(rng, 3), ids(rng, 2)]], conv_kw=dict(penalties=True), **kw)


def env_reply(tokens, num_new):
    """A JAX environment: replies to each row with its reply's last two tokens reversed and a
    marker token, 3 tokens (numpy or JAX arrays)."""
    xp = jnp if isinstance(tokens, jax.Array) else np
    rows = xp.arange(tokens.shape[0])
    last = lambda k: tokens[rows, xp.maximum(num_new - k, 0)]
    return xp.stack([last(1), last(2), xp.full_like(last(1), 63)], axis=1).astype(xp.int32)


def test_in_jit_episode_equals_host_api(compile_counter):
    """Three turns with a JAX environment inside one jax.jit (no host round trip) == the same
    episode through the host API; one compilation for the whole episode."""
    rng = np.random.default_rng(9)
    m = model()
    prompts = [ids(rng, 6), ids(rng, 10)]
    kw = dict(temperature=0.8, max_new_tokens=8, stop_ids=[])
    conv = cv.Conversation(m, max_len=128)
    host = [conv.generate(prompts, **kw)]
    for _ in range(2):
        prev = host[-1]
        toks = np.array([c.tokens for c in prev])
        host.append(conv.generate([list(map(int, r)) for r in env_reply(toks, np.array([len(c.tokens) for c in prev]))],
                                  **kw))
    B, M = 2, 16
    sp = smp.make_sampling_params(B, temperature=0.8)
    mnt, stop_ids = jnp.full((B,), 8, jnp.int32), jnp.full((B, 8), -1, jnp.int32)
    seeds = lambda t: jnp.asarray([(t * 1_000_003 + i) % 2 ** 31 for i in range(B)], jnp.uint32)
    tok = np.zeros((B, 16), np.int32)
    for i, p in enumerate(prompts):
        tok[i, :len(p)] = p
    name = "episode"

    @jax.jit
    def episode(params, tok, lengths):
        state, ep = cv.begin(params, tok, lengths, sp, mnt, stop_ids, seeds(0), cfg=m.cfg, max_new=M, cache_len=128)
        outs = [state.tokens]
        for t in (1, 2):
            seg = env_reply(state.tokens, state.num_new)
            state, ep = cv.extend(params, ep, seg, jnp.full((B,), 3, jnp.int32), sp, mnt, stop_ids, seeds(t),
                                  cfg=m.cfg, max_new=M)
            outs.append(state.tokens)
        return outs

    episode.__name__ = name
    before = compile_counter.count()
    got = episode(m.params, tok, np.array([len(p) for p in prompts], np.int32))
    assert compile_counter.count() == before + 1
    for t in range(3):
        assert [list(map(int, r[:8])) for r in np.asarray(got[t])] == [c.tokens for c in host[t]], t


def test_turns_reuse_one_program(compile_counter):
    """Later turns within the same buckets compile nothing: knob values, segment lengths within a
    bucket and rows sitting out are data."""
    rng = np.random.default_rng(10)
    cfg = TINY_QWEN.replace(name="tiny-qwen-conversation-count")
    m = Model(cfg, random_params(cfg))
    conv = cv.Conversation(m, max_len=128)
    conv.generate([ids(rng, 5), ids(rng, 3)], max_new_tokens=8)
    conv.generate([ids(rng, 4), ids(rng, 2)], max_new_tokens=8)
    before = compile_counter.count()
    conv.generate([ids(rng, 9), None], max_new_tokens=6, temperature=0.5, seed=3)
    conv.generate([ids(rng, 1), ids(rng, 14)], max_new_tokens=[3, 8], top_k=5)
    assert compile_counter.count() == before


def test_max_len_ends_a_row_with_a_message():
    """A row whose history would pass max_len ends with finish_reason "length" and a message,
    appends nothing, and refuses further segments; the other rows go on. A reply cut at max_len
    says so. Histories never exceed max_len."""
    rng = np.random.default_rng(11)
    m = model()
    conv = cv.Conversation(m, max_len=40)
    conv.generate([ids(rng, 10), ids(rng, 4)], max_new_tokens=8, stop_ids=[])  # 18, 12
    out = conv.generate([ids(rng, 25), ids(rng, 3)], max_new_tokens=8, stop_ids=[])
    assert out[0].finish_reason == "length" and out[0].tokens == [] and "max_len=40" in out[0].message
    assert len(conv.history(0).tokens) == 18 and out[1].message is None
    with pytest.raises(ValueError, match="row 0 has ended"):
        conv.generate([ids(rng, 1), ids(rng, 1)])
    out = conv.generate([None, ids(rng, 10)], max_new_tokens=16, stop_ids=[])  # 23 + 10 = 33: 7 left
    assert len(out[1].tokens) == 7 and out[1].finish_reason == "length" and "max_len=40" in out[1].message
    assert len(conv.history(1).tokens) == 40
    with pytest.raises(ValueError, match="every row|has ended"):
        conv.generate([None, ids(rng, 1)])


@pytest.mark.parametrize("call, match", [
    (lambda c: c.generate([[1, 2]]), "got 1 segments for the conversation's 2 rows"),
    (lambda c: c.generate([]), "no segments given"),
    (lambda c: c.generate([None, None]), "every segment is None"),
    (lambda c: c.generate([[], [3]]), "segment 0 is empty"),
    (lambda c: c.generate([[1, 64], [3]]), r"segment 0 has token ids outside \[0, 64\)"),
    (lambda c: c.generate([[1], [3]], n=2), "n is fixed for the whole conversation"),
    (lambda c: c.generate([[1], [3]], num_beams=2), "does not run beam search"),
    (lambda c: c.generate([[1], [3]], prefix=[1, 2]), "prefix= applies to the first turn only"),
    (lambda c: c.generate([[1], [3]], repetition_penalty=1.2), "penalties=True"),
    (lambda c: c.generate([[1], [3]], temprature=1.0), "unknown option 'temprature'"),
    (lambda c: c.generate([[1], [3]], temperature=-1.0), "temperature must be"),
    (lambda c: c.generate("abc"), "one entry per row"),
])
def test_bad_turns_are_one_line(call, match):
    m = model()
    conv = cv.Conversation(m, max_len=64)
    conv.generate([[1, 2, 3], [4, 5]], max_new_tokens=4)
    with pytest.raises(ValueError, match=match) as e:
        call(conv)
    assert "\n" not in str(e.value)
    out = conv.generate([[1], [2]], max_new_tokens=4)  # a refused turn changed nothing
    assert all(c.finish_reason == "length" for c in out) and conv.turn == 2


@pytest.mark.parametrize("kw, match", [
    (dict(max_len=4096), "max_len 4096 exceeds tiny-gemma's context of 512 tokens"),
    (dict(max_len=1), "max_len must be an integer >= 2"),
    (dict(max_len=64, tools=[{}]), "tools= is rendered by the chat template"),
    (dict(max_len=64, n=0), "n must be"),
])
def test_bad_conversations_are_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        cv.Conversation(model(), **kw)
    assert "\n" not in str(e.value)


def test_first_prompt_must_leave_room():
    with pytest.raises(ValueError, match="prompt 1: 20 tokens leave no room for a reply within max_len=20"):
        cv.Conversation(model(), max_len=20).generate([[1, 2], list(range(1, 21))])
