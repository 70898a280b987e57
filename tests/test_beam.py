"""Beam search (jaxgen.beam) in the compiled loop.

Contracts: every prompt's beams (all of them, with their scores) == a brute-force numpy search that
scores every (beam, token) continuation of the k best prefixes at each step from a fresh full forward
pass, under HF's rules (length penalty, early stopping False / True / "never", stop ids, stop strings,
constraints); a prompt's beams do not depend on the other prompts, their widths or the static beam
maximum; beam widths up to one bucket share one compiled program; a 2x4 mesh and int8 weights ==
their one-device / brute-force references; bad knobs are one clear ValueError.
"""
import json

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

import jaxgen
from jaxgen import constraints as con
from jaxgen.beam import beam_jit
from jaxgen.cache import init_cache, padded_positions
from jaxgen.model import Model, forward
from jaxgen.tokenizer import writable_bytes
from tests.conftest import CONFIGS, TINY_GEMMA, random_params
from tests.test_constraints import SCHEMA, JsonTokenizer

T_REF = 48  # the reference's padded sequence length (one compiled forward)


def _next_logprobs(model):
    @jax.jit
    def fwd(params, tokens, lengths):
        B, T = tokens.shape
        logits, _ = forward(params, tokens, padded_positions(lengths, T), init_cache(model.cfg, B, T), model.cfg)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return jax.nn.log_softmax(last.astype(jnp.float32), axis=-1)

    def next_logprobs(seqs):  # log-probabilities of the token after each sequence, [len(seqs), V]
        tok = np.zeros((4, T_REF), np.int32)
        for i, s in enumerate(seqs):
            tok[i, :len(s)] = s
        lengths = np.array([len(s) for s in seqs] + [1] * (4 - len(seqs)), np.int32)
        return np.asarray(fwd(model.params, tok, lengths))[:len(seqs)].astype(np.float64)
    return next_logprobs


def reference(model, prompt, k, max_new, stop_ids=(), length_penalty=1.0, early_stopping=False, stop=(),
              regex=None):
    """HF's beam search by brute force: [(score, tokens, finish)] best first. Every continuation of
    every running beam is scored (no candidate pruning), from a fresh forward pass of the whole
    sequence; constraints through their tables, stop strings on the decoded text."""
    next_logprobs = _next_logprobs(model)
    V = model.cfg.vocab_size
    table = None
    if regex is not None:
        table, start = con.build([regex], writable_bytes(model.tokenizer), V, sorted(stop_ids))
    running = [(0.0, [], int(start[0]) if table is not None else 0)]  # (score, tokens, automaton state)
    finished = []
    for t in range(max_new):
        lps = next_logprobs([prompt + toks for _, toks, _ in running])
        cands = []
        for i, (score, toks, q) in enumerate(running):
            for v in range(V):
                lp = lps[i, v]
                nq = q
                if table is not None:
                    if v in stop_ids:
                        if not table.accepting[q]:
                            continue
                    else:
                        nq = int(table.next_state[q, table.token_class[v]])
                        if nq < 0:
                            continue
                cands.append((score + lp, i, v, nq))
        cands.sort(key=lambda c: -c[0])

        def finish(toks, v, nq):
            if v in stop_ids:
                return "stop"
            if stop and any(s in model.tokenizer.decode(toks + [v]) for s in stop):
                return "stop_string"
            if table is not None and table.closed[nq]:
                return "closed"
            return "length" if t + 1 >= max_new else None
        for score, i, v, nq in cands[:k]:
            code = finish(running[i][1], v, nq)
            if code:
                finished.append((score / (t + 1) ** length_penalty, running[i][1] + [v], code))
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        running = [(score, running[i][1] + [v], nq) for score, i, v, nq in cands
                   if not finish(running[i][1], v, nq)][:k]
        if not running or (len(finished) >= k and early_stopping is True):
            break
        best_len = max_new if early_stopping == "never" and length_penalty > 0 else t + 1
        if len(finished) >= k and running[0][0] / best_len ** length_penalty <= finished[-1][0]:
            break
    return finished


def check(model, got, want):
    assert [c.tokens for c in got] == [w[1] for w in want]
    np.testing.assert_allclose([c.score for c in got], [w[0] for w in want], rtol=1e-4, atol=1e-4)
    names = {"stop_string": "stop", "closed": "stop"}
    assert [c.finish_reason for c in got] == [names.get(w[2], w[2]) for w in want]
    assert [c.sample for c in got] == list(range(len(got)))  # ranks, best first


_MODELS = {}


def tiny(name):
    if name not in _MODELS:
        _MODELS[name] = Model(CONFIGS[name], random_params(CONFIGS[name]))
    return _MODELS[name]


@pytest.mark.parametrize("name, length_penalty, early_stopping", [
    ("gemma", 1.0, False), ("gemma", 0.0, True), ("gemma", 2.0, "never"), ("gemma", -0.5, False),
    ("qwen", 1.0, "never"), ("qwen", 0.5, True)])  # every mode on one tiny model, two on the other
def test_beams_equal_brute_force(name, length_penalty, early_stopping):
    tiny_model = tiny(name)
    prompts = [[5, 9, 2, 7], [11, 3], [1, 2, 3, 4, 5, 6]]
    widths, max_new = [4, 3, 2], [10, 12, 9]
    # stop ids that do win: the 4th token of each prompt's best beam without them (and another id)
    free = jaxgen.generate(tiny_model, prompts, num_beams=widths, max_new_tokens=max_new, stop_ids=[[17]] * 3)
    stops = [[c.tokens[3], 17] for c in free]
    out = jaxgen.generate(tiny_model, prompts, num_beams=widths, max_new_tokens=max_new, stop_ids=stops,
                          length_penalty=length_penalty, early_stopping=early_stopping, return_beams=True)
    assert [c.prompt for c in out] == [p for p, w in zip(prompts, widths) for _ in range(w)]
    for i, (p, k) in enumerate(zip(prompts, widths)):
        want = reference(tiny_model, p, k, max_new[i], stops[i], length_penalty, early_stopping)
        got = [c for c in out if c.prompt is p]
        check(tiny_model, got, want)
        for c in got:
            if c.finish_reason == "stop":
                assert c.stop_reason == c.tokens[-1] in stops[i]
            np.testing.assert_allclose(sum(c.logprobs) / len(c.tokens) ** length_penalty, c.score, rtol=1e-4, atol=1e-4)
    if length_penalty <= 1:  # stopping is checked, not only the budget (a length penalty of 2 favours long beams)
        assert "stop" in [c.finish_reason for c in out]
    best = jaxgen.generate(tiny_model, prompts, num_beams=widths, max_new_tokens=max_new, stop_ids=stops,
                           length_penalty=length_penalty, early_stopping=early_stopping)
    assert [c.tokens for c in best] == [next(c for c in out if c.prompt is p).tokens for p in prompts]


def test_prompts_are_independent_and_widths_share_a_program(gemma_model, compile_counter):
    prompts = [[5, 9, 2, 7], [11, 3]]
    kw = dict(max_new_tokens=10, stop_ids=[17], return_beams=True)
    alone = [jaxgen.generate(gemma_model, [p], num_beams=w, **kw) for p, w in zip(prompts, (3, 2))]
    jaxgen.generate(gemma_model, prompts, num_beams=[3, 2], **kw)
    before, size = compile_counter.count("beam_search"), beam_jit._cache_size()
    for widths in ([3, 2], [4, 3], [2, 4], [3, 3]):
        got = jaxgen.generate(gemma_model, prompts, num_beams=widths, length_penalty=[0.5, 1.5],
                              early_stopping=[True, "never"], **kw)
        assert [c.sample for c in got] == [j for w in widths for j in range(w)]
    assert compile_counter.count("beam_search") == before and beam_jit._cache_size() == size
    together = jaxgen.generate(gemma_model, prompts, num_beams=[3, 2], **kw)  # K = 4: widths below the maximum
    assert [c.tokens for c in together] == [c.tokens for c in alone[0] + alone[1]]  # alone: K = 4 and K = 2
    assert [c.score for c in together] == pytest.approx([c.score for c in alone[0] + alone[1]], abs=1e-5)


def test_mesh_and_int8_weights(gemma_model):
    from jaxgen import sharding as shd
    from jaxgen.quant import quantize_params

    prompts = [[5, 9, 2, 7], [11, 3], [1, 2, 3], [8]]
    kw = dict(num_beams=[4, 2, 3, 4], max_new_tokens=9, stop_ids=[17, 40], return_beams=True)
    ref = jaxgen.generate(gemma_model, prompts, **kw)
    mesh = shd.make_mesh("data=2,model=4")  # 2 prompts x 4 beams per data shard
    sharded = Model(gemma_model.cfg, shd.shard_params(gemma_model.params, gemma_model.cfg, mesh), mesh=mesh)
    got = jaxgen.generate(sharded, prompts, **kw)
    assert [c.tokens for c in got] == [c.tokens for c in ref]
    assert [c.score for c in got] == pytest.approx([c.score for c in ref], abs=1e-4)
    q = Model(gemma_model.cfg, quantize_params(gemma_model.params, "int8"))
    check(q, jaxgen.generate(q, [prompts[0]], num_beams=3, max_new_tokens=9, stop_ids=[17, 40], return_beams=True),
          reference(q, prompts[0], 3, 9, [17, 40]))


@pytest.fixture(scope="module")
def json_model():
    return Model(TINY_GEMMA, random_params(TINY_GEMMA), tokenizer=JsonTokenizer())


def test_stop_strings_and_constraints_end_beams(json_model):
    p = [5, 9, 2]
    # length_penalty 0: raw sums, so the short beams a stop string ends can win
    out = jaxgen.generate(json_model, [p], num_beams=4, max_new_tokens=12, stop=["7", "99"], length_penalty=0.0,
                          return_beams=True)
    check(json_model, out, reference(json_model, p, 4, 12, [0], 0.0, stop=["7", "99"]))
    assert any(c.stop_reason in ("7", "99") for c in out)
    for regex in (r"[0-9]{2,4}(ab|c)", r"(true|false|12)"):
        out = jaxgen.generate(json_model, [p], num_beams=3, max_new_tokens=8, regex=regex, return_beams=True)
        check(json_model, out, reference(json_model, p, 3, 8, [0], regex=regex))
    for c in jaxgen.generate(json_model, [p, [7]], num_beams=4, max_new_tokens=30, json_schema=SCHEMA,
                             return_beams=True):
        assert c.finish_reason == "length" or jsonschema.validate(json.loads(c.text), SCHEMA) is None


@pytest.mark.parametrize("kw, message", [
    (dict(num_beams=0), "num_beams must be an integer in [1, 32] (1 = no beam search), got 0"),
    (dict(num_beams="4"), "num_beams must be an integer in [1, 32] (1 = no beam search), got '4'"),
    (dict(num_beams=[2, 3]), "num_beams has 2 values but there are 1 prompts"),
    (dict(num_beams=64), "num_beams must be an integer in [1, 32] (1 = no beam search), got 64"),
    (dict(num_beams=2, temperature=0.7), "temperature=0.7 cannot be used with num_beams > 1"),
    (dict(num_beams=2, n=2), "n=2 cannot be used with num_beams > 1"),
    (dict(num_beams=2, repetition_penalty=1.2), "repetition_penalty=1.2 cannot be used"),
    (dict(num_beams=2, top_logprobs=3), "top_logprobs=3 cannot be used"),
    # beam search used to ignore these silently
    (dict(num_beams=2, top_k=5), "top_k=5 cannot be used with num_beams > 1"),
    (dict(num_beams=2, top_p=0.9), "top_p=0.9 cannot be used with num_beams > 1"),
    (dict(num_beams=2, min_p=0.1), "min_p=0.1 cannot be used with num_beams > 1"),
    (dict(num_beams=2, seed=7), "seed=7 cannot be used with num_beams > 1"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be true, false or 'never', got 'sometimes'"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number, got nan"),
    (dict(num_beams=2, length_penalty=[1.0, 2.0]), "length_penalty needs one value or one per prompt (1 prompts)"),
    (dict(length_penalty=0.5), "length_penalty only applies to beam search (num_beams > 1)"),
])
def test_bad_beam_knobs(gemma_model, kw, message):
    with pytest.raises(ValueError, match=None) as e:
        jaxgen.generate(gemma_model, [[1, 2, 3]], max_new_tokens=4, **kw)
    assert message in str(e.value)


# ---- command line and batch (test_cli's tiny llama checkpoint, byte-level vocabulary) -----------
from tests.test_cli import ckpt  # noqa: E402,F401  (module-scoped fixture)


def test_cli_and_batch_equal_the_api(ckpt, tmp_path, capsys):
    """`jaxgen generate --num-beams` and batch rows with beam fields (mixed with sampled rows in one
    file) == generate(num_beams=...) row by row; conflicting knobs are one clear error."""
    from jaxgen import cli
    from jaxgen.batch import row_seed
    from jaxgen.checkpoint import registry

    ck = str(ckpt[2])
    m = registry.load(ck)
    kw = dict(max_new_tokens=12, stop=["e "])
    ref = jaxgen.generate(m, ["the cat", "a dog"], num_beams=3, length_penalty=0.5, early_stopping="never",
                          return_beams=True, **kw)
    assert cli.main(["generate", "the cat", "a dog", "--model", ck, "--json", "--max-new-tokens", "12", "--stop", "e ",
                     "--num-beams", "3", "--length-penalty", "0.5", "--early-stopping", "never", "--return-beams"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["beam"], r["tokens"], r["text"]) for r in rows] == [
        (c.prompt, c.sample, c.tokens, c.text) for c in ref]
    assert [r["score"] for r in rows] == pytest.approx([c.score for c in ref], abs=1e-6)
    for bad, message in ((["--temperature", "0.8"], "does not take --temperature"),
                         (["--top-k", "5"], "does not take --top-k"), (["--seed", "3"], "does not take --seed"),
                         (["--n", "2"], "does not take --n"),
                         (["--num-beams", "64"], "--num-beams must be an integer in [1, 32] (1 = no beam search), got 64")):
        assert cli.main(["generate", "x", "--model", ck, "--num-beams", "2"] + bad) == 2
        assert message in capsys.readouterr().err

    lines = [{"id": 0, "prompt": "the cat", "num_beams": 3, "length_penalty": 0.5, "early_stopping": "never",
              "return_beams": True}, {"id": 1, "prompt": "a dog", "num_beams": 2, "early_stopping": True},
             {"id": 2, "prompt": "hot", "temperature": 1.0}, {"id": 3, "prompt": "tea", "num_beams": 4},
             {"id": 4, "prompt": "x", "num_beams": 2, "temperature": 0.5}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert cli.main(["batch", "--input", str(inp), "--output", str(out), "--model", ck, "--max-new-tokens", "12",
                     "--stop", "e ", "--batch-size", "8", "--on-error", "skip"]) == 0
    got = {r["id"]: r for r in map(json.loads, open(out))}
    assert [b["tokens"] for b in got[0]["beams"]] == [c.tokens for c in ref[:3]]
    for i, width, extra in ((1, 2, dict(early_stopping=True)), (3, 4, {})):
        want = jaxgen.generate(m, [lines[i]["prompt"]], num_beams=width, **extra, **kw)[0]
        assert (got[i]["tokens"], got[i]["score"]) == (want.tokens, pytest.approx(want.score, abs=1e-6))
    sampled = jaxgen.generate(m, ["hot"], temperature=1.0, seed=[row_seed(0, 2)], **kw)[0]
    assert got[2]["tokens"] == sampled.tokens and "score" not in got[2]
    assert "does not take temperature" in got[4]["error"]
