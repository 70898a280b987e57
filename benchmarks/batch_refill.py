"""`jaxgen batch` throughput on Gemma 3 270M, and the gain of refilling (continuous batching) over
static batches on a workload with mixed output lengths.  python -m benchmarks.batch_refill [--n 256]

Prints one JSON line per run (wall time and tokens/s from the run's own summary of tokens written);
the mixed workload's refill and static runs are compared id by id ("same_tokens_as_static"), and the
script fails if they differ."""
import argparse
import json
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


def run(inp, batch, extra, max_new):
    out = pathlib.Path(tempfile.mkdtemp()) / "out.jsonl"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxgen.cli", "batch", "--input", str(inp), "--output", str(out),
                    "--batch-size", str(batch), "--max-new-tokens", str(max_new), "--ignore-stop", *extra],
                   check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    rows = {r["id"]: r["tokens"] for r in map(json.loads, out.read_text().splitlines())}
    toks = sum(map(len, rows.values()))
    return {"wall_s": round(wall, 2), "tokens": toks, "tok_s": round(toks / wall, 2)}, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--mixed-n", type=int, default=64)
    a = ap.parse_args()
    d = pathlib.Path(tempfile.mkdtemp())
    workload(d / "uniform.jsonl", a.n, False)
    workload(d / "mixed.jsonl", a.mixed_n, True)
    for b in map(int, a.batches.split(",")):
        print(json.dumps({"run": "uniform", "n": a.n, "batch": b, "new_tokens": a.new_tokens,
                          **run(d / "uniform.jsonl", b, ["--no-refill"], a.new_tokens)[0]}), flush=True)
    static = None
    for mode in ("--no-refill", "--refill"):
        figures, rows = run(d / "mixed.jsonl", 8, [mode], 64)
        same = {} if static is None else {"same_tokens_as_static": rows == static}
        print(json.dumps({"run": "mixed 4-64 tokens", "n": a.mixed_n, "batch": 8, "mode": mode, **figures, **same}),
              flush=True)
        if static is not None and rows != static:
            bad = sorted(k for k in static if rows.get(k) != static[k])
            raise SystemExit(f"refill and static batches wrote different tokens for ids {bad[:10]}")
        static = rows


if __name__ == "__main__":
    main()
