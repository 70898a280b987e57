"""`jaxgen batch` on a tiny model: one line per id, per-row overrides, determinism across batch sizes,
resume after a torn line and after SIGKILL, and bad input reported per line / per id."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxgen import cli
from jaxgen.checkpoint import registry

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
    write_input(tmp_path / "in.jsonl", 10)
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--batch-size", "4") == 0
    out = read_output(tmp_path / "out.jsonl")
    assert sorted(out) == sorted(f"r{i}" for i in range(10))
    assert len(open(tmp_path / "out.jsonl").readlines()) == 10
    tok = registry.load(model_dir).tokenizer
    for rid, r in out.items():
        assert len(r["tokens"]) == (3 if rid == "r3" else 6) and r["finish_reason"] == "length"
        assert r["text"] == tok.decode(r["tokens"]) and len(r["logprobs"]) == len(r["tokens"])


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


def test_sigkill_mid_run_then_resume(model_dir, tmp_path):
    write_input(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "jaxgen.cli", "batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
           "--model", model_dir, "--max-new-tokens", "6", "--ignore-stop", "--batch-size", "1"]
    p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    partial = out.read_text().count("\n")
    assert 3 <= partial < 40, partial  # killed mid-way
    assert subprocess.run(cmd, stderr=subprocess.DEVNULL).returncode == 0
    lines = out.read_text().splitlines()
    ids = [json.loads(x)["id"] for x in lines]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40))  # exactly one complete line per id
    ref = tmp_path / "ref.jsonl"
    assert batch(model_dir, tmp_path / "in.jsonl", ref, "--batch-size", "1") == 0
    assert {k: v["tokens"] for k, v in read_output(out).items()} == {k: v["tokens"] for k, v in read_output(ref).items()}


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
    assert "in.jsonl:3: duplicate id 1" in err


def test_dry_run_lists_programs(model_dir, tmp_path, capsys):
    write_input(tmp_path / "in.jsonl", 10)
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--dry-run", "--batch-size", "4") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["rows"] == 10 and plan["batches"] == 3
    assert sum(p["batches"] for p in plan["programs"]) == 3 and not (tmp_path / "out.jsonl").exists()
    # refill is the default mode; 4 slots round up to the 8 (fake) devices of the data axis
    assert plan["refill"] == {"slots": 8, "cache_len": 64 + 16, "max_new": 16}  # byte-level prompts <= 64


def test_refill_equals_static_batches(model_dir, tmp_path):
    """Mixed output lengths: continuous batching (rows joining a running batch) gives each id the
    same tokens as static batches, and the same as each row alone."""
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(11):
            f.write(json.dumps({"id": i, "prompt": " ".join(WORDS[: 1 + i % 7]), "max_new_tokens": 1 + (i * 7) % 12}) + "\n")
    knobs = ["--temperature", "0.8", "--seed", "2", "--batch-size", "3", "--max-new-tokens", "12"]
    args = lambda out, *extra: ["batch", "--input", str(inp), "--output", str(tmp_path / out), "--model", model_dir,
                                "--ignore-stop", *knobs, *extra]
    assert cli.main(args("refill.jsonl", "--refill", "--chunk-steps", "2")) == 0
    assert cli.main(args("static.jsonl", "--no-refill")) == 0
    a, b = read_output(tmp_path / "refill.jsonl"), read_output(tmp_path / "static.jsonl")
    assert sorted(a) == list(range(11))
    for i in range(11):
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
