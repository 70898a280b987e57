"""`jaxgen batch` under faults and bad input: one writer per output, one clear line per bad row, a full
disk, kills at several moments (the GGUF -> Orbax conversion included), and rows whose logits turn NaN."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from jaxgen import batch as B
from jaxgen import batch_run as BR
from jaxgen.checkpoint import registry
from jaxgen.model import Model

from .test_batch import batch, model_dir, read_output, write_input  # noqa: F401  (fixtures)
from .test_cli import ckpt  # noqa: F401


def test_one_writer_per_output(model_dir, tmp_path, capsys):
    write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    held = B.lock_output(str(out))  # another run holding the output
    try:
        assert batch(model_dir, tmp_path / "in.jsonl", out) == 2
        err = capsys.readouterr().err
        assert f"out.jsonl is being written by another jaxgen batch (pid {os.getpid()})" in err
        assert err.count("\n") == 1 and not out.exists()
    finally:
        os.close(held)
    (tmp_path / "out.jsonl.lock").write_text("999999\n")  # a stale lock file: its process is gone
    assert batch(model_dir, tmp_path / "in.jsonl", out) == 0 and len(read_output(out)) == 3
    assert batch(model_dir, tmp_path / "in.jsonl", tmp_path) == 2
    assert "is a directory" in capsys.readouterr().err


BAD_ROWS = [  # (line, what the message says)
    ('{"id": 3, "messages": [{"role": "user"}]}', "messages[0] must be an object with exactly 'role' and 'content'"),
    ('{"id": 3, "messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role must be system, user"),
    ('{"id": 3, "messages": "hi"}', "messages must be a non-empty list"),
    ('{"id": 3, "prompt": "a", "temperature": "hot"}', "temperature must be a finite number >= 0 (0 = greedy), got 'hot'"),
    ('{"id": 3, "prompt": "a", "temperature": NaN}', "temperature must be a finite number"),
    ('{"id": 3, "prompt": "a", "max_new_tokens": -3}', "max_new_tokens must be an integer in [1, 32768], got -3"),
    ('{"id": 3, "prompt": 7}', "prompt must be a non-empty string"),
    ('{"id": 3, "prompt": ""}', "prompt must be a non-empty string"),
]


@pytest.mark.parametrize("line, message", BAD_ROWS)
def test_bad_row_is_one_line_with_path_line_and_id(tmp_path, line, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "the tea"}\n{"id": 2, "prompt": "hot"}\n' + line + "\n")
    rows, errors = B.read_requests(str(inp), "skip")  # the reader alone (the runs below share a program)
    assert [r["id"] for r in rows] == [1, 2] and errors == [{"id": 3, "error": errors[0]["error"]}]
    assert message in errors[0]["error"]
    with pytest.raises(B.InputError, match=re.escape(f"in.jsonl:3: id 3: {message}")):
        B.read_requests(str(inp), "fail")


def test_bad_rows_through_the_command(model_dir, tmp_path, capsys):
    """Under --on-error fail the first bad row stops the run before anything is written (one line,
    exit 2); under skip every bad row is reported and gets its error line, the rest run. A line that
    is not UTF-8 is one bad line."""
    inp = tmp_path / "in.jsonl"
    with open(inp, "wb") as f:
        f.write(b'{"id": 1, "prompt": "the tea"}\n')
        f.write(b'{"id": 2, "prompt": "caf\xff"}\n')
        for i, (line, _) in enumerate(BAD_ROWS):
            f.write(line.replace('"id": 3', f'"id": {10 + i}').encode() + b"\n")
        f.write(b'{"id": 5, "prompt": "hot"}\n')
    out = tmp_path / "out.jsonl"
    assert batch(model_dir, inp, out) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:2: not valid UTF-8 (byte 0xff at column 25)" in err and err.count("\n") == 1
    assert not out.exists()
    assert batch(model_dir, inp, out, "--on-error", "skip") == 0
    err = capsys.readouterr().err
    rows = read_output(out)
    assert sorted(rows) == [1, 5] + [10 + i for i in range(len(BAD_ROWS))]
    for i, (_, message) in enumerate(BAD_ROWS):
        assert message in rows[10 + i]["error"] and f"in.jsonl:{3 + i}: id {10 + i}: " in err
    assert "Traceback" not in err and len(rows[1]["tokens"]) == len(rows[5]["tokens"]) == 6


def test_full_disk_then_resume(model_dir, tmp_path, capsys, monkeypatch):
    """A write that fails (ENOSPC) halfway through a batch's lines: one clear line, exit 1, only whole
    lines in the file; the next run resumes it to exactly the uninterrupted output."""
    write_input(tmp_path / "in.jsonl", 9)
    out = tmp_path / "out.jsonl"
    calls = []

    def full(fd, data):
        calls.append(len(data))
        if len(calls) == 3:  # part of the data reaches the disk, then it is full
            os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    monkeypatch.setattr(B, "_write", full)
    assert batch(model_dir, tmp_path / "in.jsonl", out, "--batch-size", "2", "--no-refill") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "rerun the same command to resume" in err
    text = out.read_text()
    assert text.endswith("\n") and all(json.loads(x)["id"] for x in text.splitlines())
    monkeypatch.undo()
    assert batch(model_dir, tmp_path / "in.jsonl", out, "--batch-size", "2", "--no-refill") == 0
    ref = tmp_path / "ref.jsonl"
    assert batch(model_dir, tmp_path / "in.jsonl", ref, "--batch-size", "2", "--no-refill") == 0
    got = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(got) == sorted(f"r{i}" for i in range(9))
    assert {k: v["tokens"] for k, v in read_output(out).items()} == {k: v["tokens"] for k, v in read_output(ref).items()}


def _lines(path):
    return path.read_text().count("\n") if path.exists() else 0


def test_sigkill_at_several_moments(model_dir, tmp_path):
    """Killed while loading, after a few lines and after most of them (each run resuming the last):
    the final file has exactly one complete line per id, with the tokens of an uninterrupted run."""
    write_input(tmp_path / "in.jsonl", 16)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "jaxgen.cli", "batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
           "--model", model_dir, "--max-new-tokens", "6", "--ignore-stop", "--batch-size", "1", "--no-refill"]
    for kill_after in (None, 3, 10):  # None: during start-up, before any line
        p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        if kill_after is None:
            time.sleep(1.0)
        while kill_after is not None and time.time() < deadline and _lines(out) < kill_after:
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert _lines(out) < 16
    assert subprocess.run(cmd, stderr=subprocess.DEVNULL).returncode == 0
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(16))
    ref = tmp_path / "ref.jsonl"
    assert batch(model_dir, tmp_path / "in.jsonl", ref, "--batch-size", "1", "--no-refill") == 0
    assert {k: v["tokens"] for k, v in read_output(out).items()} == {k: v["tokens"] for k, v in read_output(ref).items()}


DRIVER = """
import sys, time
from jaxgen import cli
from jaxgen.checkpoint import orbax, registry
gguf, toml, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
registry.MODELS["tiny-test"] = registry.Entry(toml, "test", "", "package-file")
registry.gguf_path = lambda name: gguf
save = orbax.save
def slow_save(*a, **k):
    save(*a, **k)
    if slow:
        print("saved", flush=True)
        time.sleep(600)  # killed here: the conversion is written but not yet in place
orbax.save = slow_save
sys.exit(cli.main(sys.argv[4:]))
"""


def test_kill_during_the_first_conversion(ckpt, tmp_path):
    """A run killed during the first GGUF -> Orbax conversion of a registry model leaves no cached
    conversion under its final name; the next run converts again (removing the dead run's partial
    directory) and writes every id."""
    gguf, toml, _ = ckpt
    write_input(tmp_path / "in.jsonl", 4)
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, JAXGEN_CACHE=str(tmp_path / "cache"))
    args = ["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", "tiny-test",
            "--max-new-tokens", "4", "--ignore-stop"]
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    p = subprocess.Popen([sys.executable, str(driver), str(gguf), str(toml), "slow", *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "saved"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    converted = tmp_path / "cache"
    assert any(x.name.endswith(".partial") for x in converted.rglob("*")) and not out.exists()
    final = converted / "orbax" / f"tiny-test.v{registry.CONVERT_VERSION}"
    assert not final.exists()  # nothing under the final name: the next run does not trust a half conversion
    r = subprocess.run([sys.executable, str(driver), str(gguf), str(toml), "fast", *args], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(read_output(out)) == [f"r{i}" for i in range(4)]
    assert not any(x.name.endswith(".partial") for x in converted.rglob("*")) and final.is_dir()


def test_nan_logits_end_the_row_with_error(model_dir):
    """Weights that turn some rows' logits NaN (token 7's embedding) end those rows with finish_reason
    "error" and a message instead of token 0s; the other rows of the batch are what they are alone."""
    import dataclasses

    m = registry.load(model_dir)
    # untied: the NaN goes into token 7's input embedding only (a tied table would put it in every
    # row's logits)
    cfg = dataclasses.replace(m.cfg, tie_embeddings=False)
    params = m.params.replace(unembed=m.params.embed if m.cfg.tie_embeddings else m.params.unembed)
    model = Model(cfg, params, m.tokenizer)
    bad = 7
    broken = Model(cfg, params.replace(embed=params.embed.at[bad].set(jnp.nan)), m.tokenizer)  # [V, D]
    tok = model.tokenizer
    good_ids = [t for t in tok.encode("the cat sat") if t != bad]
    prompts = [good_ids, good_ids[:2] + [bad] + good_ids[2:]]
    out = jaxgen.generate(broken, prompts, max_new_tokens=6, stop_ids=[], temperature=0.8, seed=3,
                          banned_ids=[bad])
    assert out[1].finish_reason == "error" and out[1].tokens == [] and "NaN" in out[1].fields()["error"]
    alone = jaxgen.generate(model, [good_ids], max_new_tokens=6, stop_ids=[], temperature=0.8, seed=3, banned_ids=[bad])
    assert out[0].finish_reason == "length" and out[0].tokens == alone[0].tokens
    rows = [{"id": i, "ids": p, "max_new": 6, "seed": 5, "line": i} for i, p in enumerate(prompts)]
    defaults = {k: None for k in BR.SAMPLING} | dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                                                     repetition_penalty=1.0, presence_penalty=0.0,
                                                     frequency_penalty=0.0, stop_ids=[])
    lines = BR.run_batch(broken, rows, defaults, 0)
    assert lines[1]["finish_reason"] == "error" and "error" in lines[1] and lines[1]["tokens"] == []
    assert lines[0]["finish_reason"] == "length" and len(lines[0]["tokens"]) == 6
    assert np.all(np.isfinite(lines[0]["logprobs"]))
