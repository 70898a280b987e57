"""Stop strings: the automaton against a plain byte search, and the contract through generate:
the stopped output equals the unstopped output cut at the first occurrence of a row's stop strings
(tokens a prefix ending at the completing token, text cut before the string), per row, with n
samples, on a mesh and under speculative decoding; on random models with a byte tokenizer and on
the real Gemma (SentencePiece) and SmolLM2 (byte BPE) vocabularies."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import sharding as shd
from jaxgen import speculative
from jaxgen import stops as sst
from jaxgen.generate import generate, stop_rows
from jaxgen.model import Model
from tests.conftest import TINY_GEMMA, random_params


class PieceTokenizer:
    """Token i reads as PIECES[i % len]: multi-character pieces, a piece holding "\\n\\n" inside a
    longer run, and the two halves of a two-byte character."""
    PIECES = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz"] + [
        b"\n", b" ", b"\n\n", b"\n\n\n", b"</", b"answer", b">", b"ab", b"ba", b"\xc3", b"\xa9", b"<"]

    def __init__(self, V):
        self.tb = [self.PIECES[i % len(self.PIECES)] for i in range(V)]
        self.stop_ids, self.vocab_size, self.bos_id = (), V, None

    def token_bytes(self):
        return self.tb

    def decode(self, ids):
        return b"".join(self.tb[int(i)] for i in ids).decode("utf-8", errors="replace")


def first_hits(tb, ids, strings):
    """Reference: for each token, whether the byte text up to it holds an occurrence of one of
    `strings` that ends inside that token."""
    text, out = b"", []
    for t in ids:
        before = len(text)
        text += tb[t]
        out.append(any(text.find(s.encode(), max(0, before - len(s.encode()) + 1)) >= 0 for s in strings))
    return out


def automaton_hits(table, ids):
    states, hits = sst.advance(jax.tree.map(jnp.asarray, table), jnp.zeros((1,), jnp.int32),
                               jnp.asarray([ids], jnp.int32))
    return [bool(h) for h in np.asarray(hits[0])]


def test_automaton_equals_byte_search():
    tok = PieceTokenizer(64)
    rng = np.random.default_rng(0)
    cases = [["\n\n"], ["</answer>"], ["ab", "b"], ["abc", "bc", "c"], ["é"], ["aaa"], ["\n\n", "</answer>", "a b"]]
    for strings in cases:
        table = sst.build([strings], tok.tb, 64)
        for _ in range(20):
            ids = list(rng.integers(0, 64, 30))
            assert automaton_hits(table, ids) == first_hits(tok.tb, ids, strings), (strings, ids)


def test_row_masks_pick_each_rows_strings():
    tok = PieceTokenizer(64)
    table = sst.build([["ab"], ["</answer>"], []], tok.tb, 64)
    ids = jnp.asarray([[0, 1, 30, 31, 32]] * 3, jnp.int32)  # "a" "b" "</" "answer" ">"
    _, hits = sst.advance(jax.tree.map(jnp.asarray, table), jnp.zeros((3,), jnp.int32), ids)
    assert np.asarray(hits).tolist() == [[False, True, False, False, False], [False, False, False, False, True],
                                         [False] * 5]


def test_tables_are_bucketed_and_cached():
    tok = PieceTokenizer(64)
    a = sst.build([["\n\n", "</answer>"]], tok.tb, 64)
    b = sst.build([[]], tok.tb, 64)
    assert a.next_state.shape == b.next_state.shape == (sst.STATE_BUCKETS[0], sst.CLASS_BUCKETS[0])
    assert sst.build([["\n\n", "</answer>"]] * 2, tok.tb, 64).token_class is a.token_class  # built once


def test_bad_stop_strings(gemma_model):
    model = Model(gemma_model.cfg, gemma_model.params, tokenizer=PieceTokenizer(64))
    with pytest.raises(ValueError, match="non-empty string"):
        generate(model, [[1, 2]], stop=["ab", ""])
    with pytest.raises(ValueError, match="at most 32"):
        generate(model, [[1, 2]], stop=[f"s{i}" for i in range(33)])
    with pytest.raises(ValueError, match="2 lists but there are 1 prompts"):
        generate(model, [[1, 2]], stop=[["a"], ["b"]])
    with pytest.raises(ValueError, match="need a model with a tokenizer"):
        generate(gemma_model, [[1, 2]], stop=["a"])


def expected(free, strings, tok):
    """The unstopped completion cut at the first token after which the decoded text (the
    tokenizer's own decode) holds one of `strings`."""
    toks = free.tokens
    k = next((k for k in range(1, len(toks) + 1) if any(s in tok.decode(toks[:k]) for s in strings)), None)
    if k is None:
        return toks, free.text, None, free.finish_reason
    text, reason = sst.cut(tok.decode(toks[:k]), strings)
    return toks[:k], text, reason, "stop"


def check_contract(model, prompts, stops, n=1, **kw):
    tok = model.tokenizer
    free = generate(model, prompts, n=n, **kw)
    got = generate(model, prompts, n=n, stop=stops, **kw)
    rows = stop_rows(stops, len(prompts), n)
    stopped = 0
    for f, g, s in zip(free, got, rows):
        tokens, text, reason, finish = expected(f, s, tok)
        assert g.tokens == tokens and g.text == text and g.finish_reason == finish, (s, f.text, g.text)
        assert g.logprobs == pytest.approx(f.logprobs[:len(tokens)], abs=1e-5)
        if reason is not None:
            assert g.stop_reason == reason
            stopped += 1
    return stopped


PROMPTS = [[5, 9, 2, 33, 7, 1, 8, 8, 21, 40, 3], [17, 4], [60, 2, 2, 9, 11, 12, 13], [1, 2, 3]]
STOPS = [["ab", "\n\n", "q"], ["e"], ["zz", "a"], ["</answer>", ">"]]
KW = dict(max_new_tokens=40, stop_ids=[], temperature=1.0, seed=3)


@functools.lru_cache
def piece_model(mesh=None):
    cfg = TINY_GEMMA
    params = random_params(cfg)
    m = None
    if mesh:
        m = shd.make_mesh(mesh)
        params = shd.shard_params(params, cfg, m)
    return Model(cfg, params, tokenizer=PieceTokenizer(cfg.vocab_size), mesh=m)


@pytest.mark.parametrize("mesh", [None, "data=2,model=4"])
def test_stopped_equals_unstopped_cut(mesh):
    model = piece_model(mesh)
    assert check_contract(model, PROMPTS, STOPS, **KW) >= 3
    # one list for every row, and n samples per prompt
    assert check_contract(model, PROMPTS[:2], ["a", "\n\n"], n=3, **KW) >= 4


def test_include_stop_keeps_the_string():
    model = piece_model()
    got = generate(model, PROMPTS, stop=STOPS, include_stop=True, **KW)
    cut = generate(model, PROMPTS, stop=STOPS, **KW)
    for g, c in zip(got, cut):
        if c.stop_reason is not None:
            assert g.text.startswith(c.text + c.stop_reason) and g.tokens == c.tokens


def test_stop_ids_still_work_beside_strings():
    model = piece_model()
    free = generate(model, PROMPTS, **KW)
    stop_id = free[0].tokens[5]
    got = generate(model, PROMPTS, stop=["zz"], **{**KW, "stop_ids": [stop_id]})
    assert got[0].tokens == free[0].tokens[:free[0].tokens.index(stop_id) + 1]
    assert got[0].stop_reason == stop_id and got[0].finish_reason == "stop"


def test_speculative_stops_like_plain():
    """Greedy speculative decoding appends blocks of tokens; a block is cut at the token that
    completes a stop string (stops taken from the middle of each row's unstopped text)."""
    model = piece_model()
    kw = {**KW, "temperature": 0.0}
    free = generate(model, PROMPTS, **kw)
    stops = [[f.text[len(f.text) // 2:len(f.text) // 2 + 2]] for f in free]
    spec, stats = speculative.generate(model, PROMPTS, speculative.Proposer(gamma=4, ngram=1), stop=stops, **kw)
    for f, g, s in zip(free, spec, stops):
        tokens, text, reason, finish = expected(f, s, model.tokenizer)
        assert (g.tokens, g.text, g.stop_reason, g.finish_reason) == (tokens, text, reason, "stop")
    assert stats.accepted > 0


# ---- the real tokenizers: a random model over their vocabularies, biased toward stop-string pieces ----
@functools.lru_cache
def real_tokenizer(name):
    from jaxgen import tokenizer
    from jaxgen.checkpoint import gguf, registry

    return tokenizer.from_gguf_fields(gguf.tokenizer_fields(gguf.open_gguf(registry.gguf_path(name))))


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_real_tokenizer_bytes_and_stops(name):
    tok = real_tokenizer(name)
    tb = tok.token_bytes()
    rng = np.random.default_rng(1)
    for _ in range(200):  # token bytes concatenate to what decode gives
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, rng.integers(1, 10))]
        assert b"".join(tb[i] for i in ids).decode("utf-8", errors="replace") == tok.decode(ids)
    V = tok.vocab_size
    cfg = TINY_GEMMA.replace(name=f"tiny-{name}-vocab", vocab_size=V, n_layers=3, layer_pattern="LLG")
    model = Model(cfg, random_params(cfg), tokenizer=tok)
    pieces = ["\n", "\n\n", "\n\n\n", "</", "answer", ">", " answer", "<", "/", " the", ".", "é"]
    favour = sorted({i for p in pieces for i in tok.encode(p, add_bos=False)})
    bias = {i: 9.0 for i in favour}
    prompts = [tok.encode("Question: what is 2 + 2?\n", add_bos=False), tok.encode("Say hi.", add_bos=False)]
    kw = dict(max_new_tokens=48, stop_ids=[], temperature=1.0, seed=5, logit_bias=bias)
    stops = [["\n\n", "</answer>"], [".", "é", " the"]]
    assert check_contract(model, prompts, stops, n=2, **kw) >= 2
