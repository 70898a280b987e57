"""`jaxgen batch` on a tiny model: one line per id, per-row overrides, determinism across batch sizes,
resume after a torn line, and bad input reported per line / per id (kills, full disks and fuzzing:
test_batch_faults, test_fuzz)."""
import json
import os
import subprocess
import sys

import pytest

from jaxgen import cli
from jaxgen.checkpoint import registry

from .conftest import TEST_XLA_FLAGS
from .test_cli import ckpt  # noqa: F401  (the module-scoped tiny checkpoint fixture)

WORDS = ["the", "tea", "is", "hot", "and", "the", "cat", "sat", "on", "a", "mat", "today"]


@pytest.fixture(scope="module")
def model_dir(ckpt):
    return str(ckpt[2])  # test_cli's tiny model, converted to Orbax by `jaxgen convert`


def write_input(path, n, **extra):
    with open(path, "w") as f:
        for i in range(n):
            row = {"id": f"r{i}", "prompt": " ".join(WORDS[: 1 + (i * 5) % len(WORDS)]), **extra}
            if i == 3:
                row["max_new_tokens"] = 3
            f.write(json.dumps(row) + "\n")


def read_output(path):
    with open(path) as f:
        return {r["id"]: r for r in map(json.loads, f)}


def batch(model_dir, inp, out, *flags):
    return cli.main(["batch", "--input", str(inp), "--output", str(out), "--model", model_dir,
                     "--max-new-tokens", "6", "--ignore-stop", *flags])


def test_one_line_per_id_with_overrides(model_dir, tmp_path):
    """One line per id, each row's own overrides applied: its tokens are generate()'s for that row alone
    with those knobs and its (--seed, id) seed."""
    import jaxgen
    from jaxgen.batch import row_seed

    write_input(tmp_path / "in.jsonl", 10)
    lines = [json.loads(x) for x in open(tmp_path / "in.jsonl")]
    for i, r in enumerate(lines):  # sampled rows with per-row knobs among greedy ones
        if i % 3 == 1:
            r.update(temperature=0.9, top_k=5, seed=i)
        elif i % 3 == 2:
            r.update(temperature=1.1, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--batch-size", "4") == 0
    out = read_output(tmp_path / "out.jsonl")
    assert sorted(out) == sorted(f"r{i}" for i in range(10))
    assert len(open(tmp_path / "out.jsonl").readlines()) == 10
    # the reference: every row in one API call, with its own knobs and seed (a row's tokens do not depend
    # on its batch: tests/test_generate.py)
    knob = lambda k, off: [r.get(k, off) for r in lines]
    want = jaxgen.generate(registry.load(model_dir), [r["prompt"] for r in lines], max_new_tokens=knob("max_new_tokens", 6),
                           stop_ids=[], seed=[row_seed(r.get("seed", 0), r["id"]) for r in lines],
                           temperature=knob("temperature", 0.0), top_k=knob("top_k", 0), top_p=knob("top_p", 1.0),
                           min_p=knob("min_p", 0.0), repetition_penalty=knob("repetition_penalty", 1.0))
    for r, w in zip(lines, want):
        got = out[r["id"]]
        assert (got["tokens"], got["text"]) == (w.tokens, w.text), r
        assert len(got["tokens"]) == (3 if r["id"] == "r3" else 6) and got["finish_reason"] == "length"


def test_deterministic_across_batch_sizes_and_order(model_dir, tmp_path):
    write_input(tmp_path / "in.jsonl", 9)
    lines = open(tmp_path / "in.jsonl").readlines()
    (tmp_path / "rev.jsonl").write_text("".join(lines[::-1]))
    knobs = ["--temperature", "0.9", "--top-p", "0.95", "--seed", "4"]
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path / "a.jsonl", "--batch-size", "2", *knobs) == 0
    assert batch(model_dir, tmp_path / "rev.jsonl", tmp_path / "b.jsonl", "--batch-size", "8", *knobs) == 0
    a, b = read_output(tmp_path / "a.jsonl"), read_output(tmp_path / "b.jsonl")
    assert {k: v["tokens"] for k, v in a.items()} == {k: v["tokens"] for k, v in b.items()}


def test_resume_rewrites_a_torn_line(model_dir, tmp_path):
    write_input(tmp_path / "in.jsonl", 7)
    out = tmp_path / "out.jsonl"
    assert batch(model_dir, tmp_path / "in.jsonl", out, "--batch-size", "3") == 0
    full = read_output(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:17])  # 4 complete lines, then a torn one
    assert batch(model_dir, tmp_path / "in.jsonl", out, "--batch-size", "3") == 0
    again = out.read_text().splitlines()
    assert len(again) == 7 and all(line.endswith("}") for line in again)
    got = read_output(out)
    assert sorted(got) == sorted(full)
    for k, v in full.items():  # tokens exact; logprobs to float rounding (other rows share the batch)
        assert (got[k]["tokens"], got[k]["text"], got[k]["finish_reason"]) == (v["tokens"], v["text"], v["finish_reason"])
        assert got[k]["logprobs"] == pytest.approx(v["logprobs"], abs=1e-5)


def test_bad_input(model_dir, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "the tea"}\n{"id": 2, "prompt": \n{"id": 1, "prompt": "dup"}\n'
                   '{"id": 3}\n{"id": 4, "prompt": "' + "the " * 200 + '"}\n{"id": 5, "prompt": "hot"}\n')
    out = tmp_path / "out.jsonl"
    assert batch(model_dir, inp, out) == 2
    assert "in.jsonl:2: not valid JSON" in capsys.readouterr().err and not out.exists()
    assert batch(model_dir, inp, out, "--on-error", "skip") == 0
    rows = read_output(out)
    assert sorted(rows) == [1, 3, 4, 5]
    assert "exactly one of 'prompt' or 'messages'" in rows[3]["error"]
    assert "does not fit tiny-llama's context of 128" in rows[4]["error"]
    assert len(rows[1]["tokens"]) == 6 and len(rows[5]["tokens"]) == 6
    err = capsys.readouterr().err
    assert "in.jsonl:3: id 1: duplicate id (the first line with it runs)" in err


def test_dry_run_lists_programs(model_dir, tmp_path, capsys):
    write_input(tmp_path / "in.jsonl", 10)
    flags = ["--dry-run", "--batch-size", "4"]
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", *flags, "--no-refill") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["rows"] == 10 and plan["batches"] == 3 and plan["refill"] is None
    assert sum(p["batches"] for p in plan["programs"]) == 3 and not (tmp_path / "out.jsonl").exists()
    # refill is the default mode (no static batches); 4 slots round up to the 8 (fake) devices of `data`
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", *flags) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["batches"] == 0 and not (tmp_path / "out.jsonl").exists()
    # one running state per length class (byte-level prompts of <= 32 and of 33-64 tokens), each with at
    # least the 4 rows of --batch-size; the 16-token bucket's rows (if any), fewer than 4, join the 32 one
    tok = registry.load(model_dir).tokenizer
    lens = [len(tok.encode(" ".join(WORDS[: 1 + (i * 5) % len(WORDS)]))) for i in range(10)]
    short = sum(n <= 32 for n in lens)
    assert short >= 4 and sum(n <= 16 for n in lens) < 4
    want = [{"rows": short, "slots": 8, "cache_len": 32 + 16, "max_new": 16, "penalties": False},
            {"rows": 10 - short, "slots": 8, "cache_len": 64 + 16, "max_new": 16, "penalties": False}]
    assert plan["refill"] == want


def test_memory_cap_limits_refill_slots(model_dir, tmp_path, capsys):
    """--memory-gb caps the running state of a refill run (the default mode), not only static
    batches; the capped run writes the same tokens; a cap no row fits is a clear error."""
    from jaxgen.cache import cache_bytes

    write_input(tmp_path / "in.jsonl", 10)
    model = registry.load(model_dir)
    one = cache_bytes(model.cfg, 1, 64 + 16, model.params.embed.dtype)
    cap = str(8.5 * one / (1 << 30))  # room for 8 rows of cache (one data-axis group of 8), not 16 (10 rows)
    flags = ["--batch-size", "32", "--temperature", "0.7"]
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path / "o.jsonl", "--dry-run", *flags, "--memory-gb", cap) == 0
    assert json.loads(capsys.readouterr().out)["refill"][0]["slots"] == 8
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path / "capped.jsonl", *flags, "--memory-gb", cap) == 0
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path / "free.jsonl", *flags) == 0
    tokens = lambda f: {k: v["tokens"] for k, v in read_output(tmp_path / f).items()}
    assert tokens("capped.jsonl") == tokens("free.jsonl") and len(tokens("free.jsonl")) == 10
    capsys.readouterr()
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path / "x.jsonl", *flags, "--memory-gb", str(one / 2 ** 31)) == 2
    assert "--memory-gb" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("line, message", [
    ('{"id": 3, "prompt": "a", "temperature": -1}', "temperature must be a finite number >= 0 (0 = greedy), got -1"),
    ('{"id": 3, "prompt": "a", "top_p": 0}', "top_p must be a finite number in (0, 1] (1 = off), got 0"),
    ('{"id": 3, "prompt": "a", "max_new_tokens": 0}', "max_new_tokens must be an integer in [1, 32768], got 0"),
    ('{"id": 3, "prompt": "a", "max_new_tokens": 2.5}', "max_new_tokens must be an integer"),
    ('{"id": 3, "prompt": "a", "top_k": "5"}', "top_k must be an integer"),
    ('{"id": 3, "prompt": "a", "temperature": true}', "temperature must be a finite number")])
def test_bad_override_value_stops_before_anything_runs(model_dir, tmp_path, capsys, line, message):
    """A bad per-row value is found while reading, with its line number, before any batch is written
    (it used to abort the run partway); with --on-error skip that row gets an error line."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "the tea"}\n{"id": 2, "prompt": "hot"}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    assert batch(model_dir, inp, out, "--batch-size", "1") == 2
    err = capsys.readouterr().err
    assert "in.jsonl:3: id 3: " + message in err and not out.exists()
    assert batch(model_dir, inp, out, "--on-error", "skip") == 0
    rows = read_output(out)
    assert message in rows[3]["error"] and len(rows[1]["tokens"]) == len(rows[2]["tokens"]) == 6


def test_refill_keeps_every_stop_id(model_dir):
    """More stop ids than the old hard-coded 4 slots: refill stops each row at any of them, as
    generate does (it used to drop the 5th and later)."""
    import jaxgen
    from jaxgen import batch_run as B

    model = registry.load(model_dir)
    tok = model.tokenizer
    rows = [{"id": i, "ids": tok.encode(" ".join(WORDS[: 2 + i])), "max_new": 12, "seed": i} for i in range(5)]
    free = jaxgen.generate(model, [r["ids"] for r in rows], max_new_tokens=12, stop_ids=[], temperature=0.9,
                           seed=[r["seed"] for r in rows])
    filler = [t for t in range(model.cfg.vocab_size) if all(t not in c.tokens for c in free)][:6]
    stops = filler + [free[0].tokens[3]]  # the 7th stop id is the one row 0 meets
    defaults = {k: None for k in B.SAMPLING} | dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0,
                                                     repetition_penalty=1.0, presence_penalty=0.0,
                                                     frequency_penalty=0.0, stop_ids=stops)
    p = B.refill_plan(model, rows, 2, None, defaults)
    assert p.stop_slots == 8
    lines = []
    B.run_refill(model, rows, defaults, p, 2, 0, lines.extend)
    want = jaxgen.generate(model, [r["ids"] for r in rows], max_new_tokens=12, stop_ids=stops, temperature=0.9,
                           seed=[r["seed"] for r in rows])
    got = {x["id"]: x for x in lines}
    assert got[0]["finish_reason"] == "stop" and got[0]["tokens"][-1] == stops[-1]
    for r, w in zip(rows, want):
        assert got[r["id"]]["tokens"] == w.tokens and got[r["id"]]["finish_reason"] == w.finish_reason


def test_single_device_batch_equals_sharded(model_dir, tmp_path):
    """The usual case, one device (the suite forces 8, so in-process batch always builds a data=8
    mesh): plain and refill runs in a one-device subprocess write the same tokens as the sharded run."""
    inp = tmp_path / "in.jsonl"
    write_input(inp, 9)
    knobs = ["--temperature", "0.9", "--top-k", "8", "--seed", "3", "--batch-size", "4", "--repetition-penalty", "1.3"]
    assert batch(model_dir, inp, tmp_path / "sharded.jsonl", *knobs) == 0
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {TEST_XLA_FLAGS}", JAX_PLATFORMS="cpu")
    code = "import sys, jax; from jaxgen import cli; assert jax.device_count() == 1; sys.exit(cli.main(sys.argv[1:]))"
    for mode in ("--refill", "--no-refill"):
        out = tmp_path / f"one{mode}.jsonl"
        cmd = [sys.executable, "-c", code, "batch", "--input", str(inp), "--output", str(out), "--model", model_dir,
               "--max-new-tokens", "6", "--ignore-stop", *knobs, mode]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        got, want = read_output(out), read_output(tmp_path / "sharded.jsonl")
        assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in want.items()}, mode


def test_refill_equals_static_batches(model_dir, tmp_path, capsys):
    """Mixed output lengths and two long prompts: continuous batching (rows joining a running batch,
    one running state per length class) gives each id the same tokens as static batches, and the
    same as each row alone."""
    inp = tmp_path / "in.jsonl"
    n = 13
    with open(inp, "w") as f:
        for i in range(n):
            prompt = " ".join(WORDS[: 1 + i % 4]) if i < 11 else " ".join(WORDS + WORDS[:i - 3])  # 2 long ones
            f.write(json.dumps({"id": i, "prompt": prompt, "max_new_tokens": 1 + (i * 7) % 12}) + "\n")
    knobs = ["--temperature", "0.8", "--seed", "2", "--batch-size", "3", "--max-new-tokens", "12"]
    args = lambda out, *extra: ["batch", "--input", str(inp), "--output", str(tmp_path / out), "--model", model_dir,
                                "--ignore-stop", *knobs, *extra]
    assert cli.main(args("plan.jsonl", "--refill", "--dry-run")) == 0
    states = json.loads(capsys.readouterr().out)["refill"]
    assert [s["rows"] for s in states] == [11, 2]  # the long rows do not size the short rows' slots
    assert states[0]["cache_len"] < states[1]["cache_len"] == 128
    assert cli.main(args("refill.jsonl", "--refill", "--chunk-steps", "2")) == 0
    assert cli.main(args("static.jsonl", "--no-refill")) == 0
    a, b = read_output(tmp_path / "refill.jsonl"), read_output(tmp_path / "static.jsonl")
    assert sorted(a) == list(range(n))
    for i in range(n):
        assert len(a[i]["tokens"]) == 1 + (i * 7) % 12
        assert a[i]["tokens"] == b[i]["tokens"] and a[i]["text"] == b[i]["text"]
        assert a[i]["logprobs"] == pytest.approx(b[i]["logprobs"], abs=1e-5)


def test_speculative_batch_equals_plain(model_dir, tmp_path):
    """--speculative (prompt lookup) writes the same greedy tokens as a plain run, with its stats."""
    inp = tmp_path / "in.jsonl"
    write_input(inp, 10)
    assert batch(model_dir, inp, tmp_path / "plain.jsonl", "--no-refill") == 0
    assert batch(model_dir, inp, tmp_path / "spec.jsonl", "--speculative", "lookup,ngram=2,gamma=4") == 0
    plain, spec = read_output(tmp_path / "plain.jsonl"), read_output(tmp_path / "spec.jsonl")
    assert set(plain) == set(spec) and len(spec) == 10
    for k in plain:
        assert spec[k]["tokens"] == plain[k]["tokens"], k
        assert 0 <= spec[k]["timing"]["acceptance_rate"] <= 1


def test_rows_that_fit_one_by_one_run_together(model_dir, tmp_path):
    """A long prompt with a small budget and short prompts with large ones (longest prompt + largest
    budget > the 128-token context, each row within it) run in static batches, in the refill state,
    with n > 1 and with --speculative (which needs gamma + 1 more per row); each row == the API alone.
    Static batches and n > 1 refused the whole file with exit 2; --speculative stopped the run at their batch."""
    import jaxgen
    from jaxgen.batch import row_seed

    model = registry.load(model_dir)
    long = " ".join(WORDS * 2)
    assert 75 <= len(model.tokenizer.encode(long)) <= 90
    rows = [{"id": "long", "prompt": long, "max_new_tokens": 6},
            {"id": "short", "prompt": "the cat", "max_new_tokens": 60},
            {"id": "n", "prompt": "a mat", "max_new_tokens": 60, "n": 2}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {"static": ["--no-refill"], "refill": ["--refill"], "spec": ["--speculative", "lookup,ngram=2,gamma=4"]}
    for name, flags in runs.items():
        rs = rows[:2] if name == "spec" else rows  # (--speculative takes no n > 1)
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        assert cli.main(["batch", "--input", str(tmp_path / f"{name}.jsonl"), "--output", str(tmp_path / f"{name}.out"),
                         "--model", model_dir, "--ignore-stop", "--temperature", "0" if name == "spec" else "0.9",
                         *flags]) == 0, name
        out = read_output(tmp_path / f"{name}.out")
        for r in rs:
            want = jaxgen.generate(model, [r["prompt"]], n=r.get("n", 1), seed=[row_seed(0, r["id"])], stop_ids=[],
                                   max_new_tokens=r["max_new_tokens"], temperature=0.0 if name == "spec" else 0.9)
            got = out[r["id"]]["samples"] if r.get("n", 1) > 1 else [out[r["id"]]]
            assert [g["tokens"] for g in got] == [w.tokens for w in want], (name, r["id"])
            assert all(len(g["tokens"]) == r["max_new_tokens"] for g in got), (name, r["id"])
    rows[0]["max_new_tokens"] = 128 - len(model.tokenizer.encode(long)) - 4  # fits plainly, not with gamma + 1
    (tmp_path / "over.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert batch(model_dir, tmp_path / "over.jsonl", tmp_path / "over.out", "--speculative", "lookup,gamma=4") == 0
    assert "+ gamma + 1 (5, --speculative) does not fit" in read_output(tmp_path / "over.out")["long"]["error"]


def test_more_distinct_stop_strings_than_one_call_takes(model_dir, tmp_path):
    """36 rows with a stop string each (a call takes 32 distinct: the bits of a row mask) run in refill
    states and static batches of at most 32 strings each; every row == the API alone. Both modes ended
    the run with an error (one refill run, or one static batch, holding all 36 rows' strings)."""
    import jaxgen
    from jaxgen.batch import row_seed

    model = registry.load(model_dir)
    rows = [{"id": i, "prompt": " ".join(WORDS[: 1 + i % 5]), "stop": [f"q{i}"], "temperature": 0.9} for i in range(36)]
    for r in rows[::4]:  # and a string that the row's unstopped text holds
        free = jaxgen.generate(model, [r["prompt"]], seed=[row_seed(0, r["id"])], temperature=0.9, max_new_tokens=6,
                               stop_ids=[])[0].text
        r["stop"].append(next(c for c in free[2:] if c != "\ufffd" and c.strip()))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for mode in ("--refill", "--no-refill"):
        out = tmp_path / f"out{mode}.jsonl"
        assert batch(model_dir, tmp_path / "in.jsonl", out, "--batch-size", "64", mode) == 0, mode
        got = read_output(out)
        assert sorted(got) == list(range(36)), mode
        for r in rows:
            want = jaxgen.generate(model, [r["prompt"]], stop=r["stop"], seed=[row_seed(0, r["id"])],
                                   temperature=0.9, max_new_tokens=6, stop_ids=[])[0]
            assert (got[r["id"]]["tokens"], got[r["id"]]["stop_reason"]) == (want.tokens, want.stop_reason), (mode, r)
        assert sum(g["stop_reason"] is not None for g in got.values()) >= 5, mode  # the strings are live


def test_constraints_too_big_for_one_call_split_into_calls(model_dir, tmp_path, monkeypatch):
    """Rows whose constraints' tables do not fit one call together (jaxgen.constraints.MAX_CELLS, here
    100 cells: each of these regexes' tables fits alone, two of them together do not) run in several
    refill states / static batches, each row == the API alone; a row whose own table is too big gets
    an error line naming the budget and the others run. Both modes ended the run with an error."""
    import jaxgen
    from jaxgen import constraints as con
    from jaxgen.batch import row_seed

    monkeypatch.setattr(con, "MAX_CELLS", 100)
    model = registry.load(model_dir)
    regexes = ["[a-z]{1,8}", "(yes|no|maybe)", "[0-9]{2,6}", None]
    rows = [{"id": i, "prompt": " ".join(WORDS[: 1 + i % 5]), "temperature": 0.9,
             **({"regex": regexes[i % 4]} if regexes[i % 4] else {})} for i in range(12)]
    rows.append({"id": 12, "prompt": "the cat", "regex": "[a-z ]{10,40}"})  # 42 states x 4 classes alone
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for mode in ("--refill", "--no-refill"):
        out = tmp_path / f"out{mode}.jsonl"
        assert cli.main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", model_dir,
                         "--max-new-tokens", "6", "--batch-size", "64", mode]) == 0, mode
        got = read_output(out)
        assert sorted(got) == list(range(13)), mode
        assert "over the budget of 100" in got[12]["error"], mode
        for r in rows[:12]:
            want = jaxgen.generate(model, [r["prompt"]], regex=r.get("regex"), seed=[row_seed(0, r["id"])],
                                   temperature=0.9, max_new_tokens=6)[0]
            g = got[r["id"]]
            assert (g["tokens"], g["finish_reason"]) == (want.tokens, want.finish_reason), (mode, r)


def test_n_stop_and_prefix_fields(model_dir, tmp_path):
    """Rows with "n", "stop" and "prefix" fields (and --stop / --prefix defaults) give exactly the
    API's completions for the same seeds; n > 1 rows give one line with n samples. n == 1 rows run
    in the refill state (one stop table, the prefix prefilled once), n > 1 rows in static batches."""
    import jaxgen
    from jaxgen.batch import row_seed

    model = registry.load(model_dir)
    tok = model.tokenizer

    def stop_in(rid, prompt, prefix=None):  # a string the row's unstopped text holds
        ids = tok.encode(prompt, add_bos=False if prefix else None)
        t = jaxgen.generate(model, [ids], prefix=tok.encode(prefix) if prefix else None, seed=[row_seed(0, rid)],
                            max_new_tokens=8, stop_ids=[], temperature=0.9)[0].text
        return next(c for c in t[2:] if c != "\ufffd" and c.strip())

    pre = "the tea is hot and"
    rows = [{"id": "a", "prompt": "the cat", "n": 3, "temperature": 0.9},
            {"id": "b", "prompt": "sat on", "prefix": pre, "stop": ["zz", stop_in("b", "sat on", pre)],
             "temperature": 0.9},
            {"id": "c", "prompt": "a mat", "stop": stop_in("c", "a mat"), "temperature": 0.9},
            {"id": "d", "prompt": "today", "prefix": pre, "n": 2, "temperature": 0.9}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--stop", "zz",
                 "--max-new-tokens", "8") == 0
    out = read_output(tmp_path / "out.jsonl")
    for r in rows:
        pre = r.get("prefix")
        ids = tok.encode(r["prompt"], add_bos=False if pre else None)
        stop = r.get("stop", ["zz"])
        want = jaxgen.generate(model, [ids], prefix=tok.encode(pre) if pre else None, n=r.get("n", 1),
                               seed=[row_seed(0, r["id"])], stop=[stop] if isinstance(stop, str) else stop,
                               temperature=r.get("temperature", 0.0), max_new_tokens=8, stop_ids=[])
        got = out[r["id"]]["samples"] if r.get("n", 1) > 1 else [out[r["id"]]]
        assert [(g["tokens"], g["text"], g["stop_reason"]) for g in got] == [(w.tokens, w.text, w.stop_reason)
                                                                         for w in want], r["id"]
    assert all(out[k]["finish_reason"] == "stop" and out[k]["stop_reason"] != "zz" for k in "bc")


def test_bad_row_fields(model_dir, tmp_path, capsys):
    for row, msg in (({"n": 0}, "n must be an integer in [1, 1024]"), ({"stop": ""}, "stop must be a non-empty"),
                     ({"stop": ["a", 3]}, "stop must be"), ({"prefix": 5}, "prefix must be a non-empty string")):
        (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "the", **row}) + "\n")
        rc = cli.main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                       "--model", model_dir])
        err = capsys.readouterr().err
        assert rc == 2 and f"in.jsonl:1: id 1: {msg}" in err and err.count("\n") == 1, (row, err)
