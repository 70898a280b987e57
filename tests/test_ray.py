"""`jaxgen batch` as a Ray Data stage (jaxgen.ray), on a local Ray cluster this module starts (2 actor
processes). Contracts: the stage's output for 32 rows == `jaxgen batch`'s on the same file, row
for row (rows of every kind: overrides, n samples, stop strings, beams; constraints run the same code);
an actor killed mid-run is restarted by Ray and its block retried, every id still exactly once with
the same tokens; bad rows get an error field and never fail the job.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")

import jaxgen.ray as jray  # noqa: E402
from tests.conftest import TEST_XLA_FLAGS  # noqa: E402
from tests.test_cli import ckpt  # noqa: E402,F401  (module-scoped fixture: a tiny checkpoint)

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORDS = "the cat sat on a warm mat while the old dog slept by the door".split()


def rows(n=64, ids=str):
    out = []
    for i in range(n):
        r = {"id": ids(i) if ids is int else f"r{i}", "prompt": " ".join(WORDS[i % 7: i % 7 + 2 + i % 5])}
        kind = i % 8
        if kind == 1:
            r.update(temperature=0.9, top_k=5, max_new_tokens=6)
        elif kind == 2:
            r.update(n=2, temperature=1.0)
        elif kind == 3:
            r.update(stop=["a", "t "], temperature=0.7)
        elif kind == 4:
            r.update(num_beams=3, length_penalty=0.5)
        elif kind == 6:
            r.update(seed=3, temperature=1.0, top_p=0.8)
        out.append(r)
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # actors: one CPU device each (not the 8 fake devices of this process), and this repository importable
    env = {"XLA_FLAGS": TEST_XLA_FLAGS, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "JAXGEN_CACHE": str(tmp_path_factory.mktemp("actors-cache"))}  # compiled programs shared by the actors
    # 2 actors of 1 CPU each, and logical CPUs left for the read tasks (else the actors hold every CPU and
    # the reads that feed them never schedule)
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield env
    ray.shutdown()


def batch_lines(ck, inp, out, env):
    """`jaxgen batch` as a command, in the actors' environment (one device, their compile cache, which
    it fills with the programs they then load instead of compiling)."""
    p = subprocess.run([sys.executable, "-m", "jaxgen.cli", "batch", "--input", str(inp), "--output", str(out),
                        "--model", ck, "--max-new-tokens", "10", "--temperature", "0.8", "--batch-size", "4",
                        "--on-error", "skip"], env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return {json.dumps(x["id"]): x for x in map(json.loads, open(out))}


def same(got, want):
    """Equal lines but for timing; floats (logprobs, scores) to 1e-5: a row's tokens do not depend on
    its batch, the last bits of its floats do (other shapes, other XLA:CPU blocking)."""
    assert got.keys() - {"timing"} == want.keys() - {"timing"}, (got, want)
    for k in got.keys() - {"timing"}:
        if k in ("samples", "beams"):
            assert len(got[k]) == len(want[k])
            for a, b in zip(got[k], want[k]):
                same(a, b)
        elif k in ("logprobs", "score"):
            assert got[k] == pytest.approx(want[k], abs=1e-5), k
        else:
            assert got[k] == want[k], (k, got, want)


OPTIONS = dict(max_new_tokens=10, temperature=0.8, batch_size=4)


def test_stage_equals_jaxgen_batch(cluster, ckpt, tmp_path):
    ck = str(ckpt[2])
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows(32)))  # 4 rows of each of the 8 kinds
    want = batch_lines(ck, inp, tmp_path / "out.jsonl", cluster)

    sys.path.insert(0, str(ROOT / "examples"))
    from ray_batch import run  # the README's runnable example: JSONL in, N actors, JSONL out

    stats = run(str(inp), str(tmp_path / "ray.jsonl"), actors=2, block_rows=16, model=ck, **OPTIONS)
    got = [json.loads(x) for x in open(tmp_path / "ray.jsonl")]
    assert stats["rows"] == len(got) == 32
    assert sorted(json.dumps(x["id"]) for x in got) == sorted(want)  # every id exactly once
    for line in got:
        same(line, want[json.dumps(line["id"])])
    assert any("score" in x for x in got) and any("samples" in x for x in got)


def test_stage_on_an_moe_checkpoint(cluster, tmp_path):
    """A mixture-of-experts HF directory (tiny Qwen3-MoE with a character tokenizer) through the stage ==
    `jaxgen batch` on it, row for row."""
    from tests.test_moe import with_tokenizer

    ck = str(with_tokenizer("qwen3_moe", tmp_path / "moe"))
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows(16)))
    want = batch_lines(ck, inp, tmp_path / "out.jsonl", cluster)
    sys.path.insert(0, str(ROOT / "examples"))
    from ray_batch import run

    # one actor, two blocks (the multi-actor stage is test_stage_equals_jaxgen_batch's; CI time)
    stats = run(str(inp), str(tmp_path / "ray.jsonl"), actors=1, block_rows=8, model=ck, **OPTIONS)
    got = [json.loads(x) for x in open(tmp_path / "ray.jsonl")]
    assert stats["rows"] == len(got) == 16 and sorted(json.dumps(x["id"]) for x in got) == sorted(want)
    for line in got:
        same(line, want[json.dumps(line["id"])])


class KillOnce(jray.Generate):
    """Kills its own process (SIGKILL) in the middle of its first block, once per marker file."""

    def __init__(self, marker, **options):
        super().__init__(**options)
        self.marker = marker

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_killed_actor_is_retried_and_bad_rows_are_fields(cluster, ckpt, tmp_path):
    ck = str(ckpt[2])
    good = rows(16, ids=int)  # Arrow needs one type per column: here int ids, above strings
    bad = [{"id": 100, "prompt": "x", "temperature": -1.0}, {"id": 101, "prompt": ""},
           {"id": 102, "prompt": "y", "num_beams": 2, "n": 2}, {"id": 103, "messages": [{"role": "user"}]},
           {"id": 105, "messages": [{"role": "user", "content": "hi"}]},  # this base model has no chat template
           {"id": 104, "prompt": "z", "max_new_tokens": 1000}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    want = batch_lines(ck, inp, tmp_path / "out.jsonl", cluster)
    ds = ray.data.read_json(str(inp)).map_batches(
        KillOnce, fn_constructor_args=(str(tmp_path / "killed"),), fn_constructor_kwargs=dict(model=ck, **OPTIONS),
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=8, batch_format="pandas")  # (restarts: Ray's default)
    got = [jray.to_line(r) for r in ds.take_all()]
    assert (tmp_path / "killed").exists()  # the actor did die once
    assert sorted(json.dumps(x["id"]) for x in got) == sorted(want)
    for line in got:
        if "error" not in line:  # (error wording may differ: Arrow fills a missing struct field with null)
            same(line, want[json.dumps(line["id"])])
    errors = {x["id"]: x["error"] for x in got if "error" in x}
    assert errors.keys() == {x["id"] for x in want.values() if "error" in x}
    assert set(errors) == {100, 101, 102, 103, 104, 105}
    assert "temperature" in errors[100] and "does not fit" in errors[104]
