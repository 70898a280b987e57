"""`jaxgen batch` throughput on Gemma 3 270M, and the gain of refilling (continuous batching) over
static batches on a workload with mixed output lengths.  python -m benchmarks.batch_refill [--n 256]

Prints one JSON line per run (wall time of the whole process, and tokens/s from the tokens the output
holds). Each run has its own empty persistent compilation cache, so every one compiles its programs
alike; the mixed workload runs twice per mode, the second time loading the first's compiled programs.
The mixed runs are compared id by id with the first static one ("same_tokens_as_static"), and the
script fails if they differ. Writes benchmarks/results/<machine>-<date>-batch.json and the README's
bench-batch table."""
import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

TOPICS = ["the sea", "a small village", "the history of Paris", "how bread is made", "the moon", "trains",
          "a cat named Leo", "winter in the mountains", "the first computer", "a market at dawn"]


def workload(path, n, mixed):
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            row = {"id": i, "prompt": f"Write a few sentences about {TOPICS[i % len(TOPICS)]}. Story {i}:"}
            if mixed:
                row["max_new_tokens"] = rng.choice([4, 8, 16, 32, 64])
            f.write(json.dumps(row) + "\n")


def run(inp, batch, extra, max_new, xla_cache):
    """One `jaxgen batch` process, its persistent compilation cache in `xla_cache` (an empty directory:
    it compiles every program, as a first run on a fresh machine; one a run of the same command filled:
    it loads them)."""
    out = pathlib.Path(tempfile.mkdtemp()) / "out.jsonl"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(xla_cache))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxgen.cli", "batch", "--input", str(inp), "--output", str(out),
                    "--batch-size", str(batch), "--max-new-tokens", str(max_new), "--ignore-stop", *extra],
                   check=True, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t
    rows = {r["id"]: r["tokens"] for r in map(json.loads, out.read_text().splitlines())}
    toks = sum(map(len, rows.values()))
    return {"wall_s": round(wall, 2), "tokens": toks, "tok_s": round(toks / wall, 2)}, rows


def table(runs: list[dict]) -> str:
    rows = ["| workload | batch | mode | programs | rows | tokens | wall s | tokens/s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        mode = r.get("mode", "--no-refill").lstrip("-")
        rows.append(f"| {r['run']} | {r['batch']} | {mode} | {r['programs']} | {r['n']} | {r['tokens']:,} | "
                    f"{r['wall_s']:.1f} | {r['tok_s']:.1f} |")
    mixed = {(r["mode"], r["programs"]): r["wall_s"] for r in runs if r["run"].startswith("mixed")}
    gain = lambda p: mixed[("--no-refill", p)] / mixed[("--refill", p)]
    return "\n".join(rows) + (
        f"\n\nWall time is the whole process (start, load, compile or load the compiled programs, run). Refill "
        f"against static batches on the mixed workload: {gain('compiled'):.2f}x less wall time when each run "
        f"compiles, {gain('cached'):.2f}x with the programs in the persistent compilation cache; the same tokens "
        f"id by id.")


def main():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from run import publish

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--mixed-n", type=int, default=64)
    a = ap.parse_args()
    d = pathlib.Path(tempfile.mkdtemp())
    workload(d / "uniform.jsonl", a.n, False)
    workload(d / "mixed.jsonl", a.mixed_n, True)
    runs = []
    fresh = lambda: tempfile.mkdtemp(prefix="xla-")  # an empty compilation cache: every run compiles alike
    for b in map(int, a.batches.split(",")):
        runs.append({"run": f"uniform {a.new_tokens} tokens", "n": a.n, "batch": b, "new_tokens": a.new_tokens,
                     "programs": "compiled", **run(d / "uniform.jsonl", b, ["--no-refill"], a.new_tokens, fresh())[0]})
        print(json.dumps(runs[-1]), flush=True)
    static = None
    for mode in ("--no-refill", "--refill"):
        cache = fresh()
        for programs in ("compiled", "cached"):  # the second run of the command loads what the first compiled
            figures, rows = run(d / "mixed.jsonl", 8, [mode], 64, cache)
            same = {} if static is None else {"same_tokens_as_static": rows == static}
            runs.append({"run": "mixed 4-64 tokens", "n": a.mixed_n, "batch": 8, "mode": mode, "programs": programs,
                         **figures, **same})
            print(json.dumps(runs[-1]), flush=True)
            if static is not None and rows != static:
                bad = sorted(k for k in static if rows.get(k) != static[k])
                raise SystemExit(f"{mode} ({programs}) and the first static run wrote different tokens for ids {bad[:10]}")
            static = static or rows
    text = table(runs)
    print(text)
    publish("batch", {"runs": runs}, text, "python -m benchmarks.batch_refill")


if __name__ == "__main__":
    main()
