"""What a user waits for before tokens: loading a registry model (the first load converts its GGUF to an
Orbax checkpoint, later loads restore that), compiling (the `jaxgen` command's persistent compilation
cache), and the training example end to end.  python -m benchmarks.startup [--no-readme]

Each measurement runs in a fresh process with an empty $JAXGEN_CACHE of its own (so nothing cached by
earlier runs counts):
  load_s            `jaxgen.load("gemma3-270m")` with an empty cache (GGUF -> Orbax), then again (restore);
  compile_s         `jaxgen generate "The capital of France is" --json --max-new-tokens 32`, its
                    timing.compile_s, run twice: the second run loads its programs from the disk cache;
  example           `python examples/train_and_sample.py --sup-steps 60 --rl-steps 60`: wall time and
                    its printed loss / reward figures.
Writes benchmarks/results/<machine>-<date>-startup.json and the README block (startup markers).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.run import ROOT, cpu, machine, update_readme, where

LOAD = ("import json, sys, time; t = time.perf_counter(); import jaxgen; m = jaxgen.load('gemma3-270m'); "
        "print(json.dumps({'load_s': time.perf_counter() - t}))")


def child(argv: list[str], cache: str) -> tuple[float, str]:
    env = dict(os.environ, JAXGEN_CACHE=cache, XLA_FLAGS="")
    t = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t, p.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-readme", action="store_true")
    a = ap.parse_args(argv)
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        res["load_first_s"] = json.loads(child([sys.executable, "-c", LOAD], cache)[1].splitlines()[-1])["load_s"]
        res["load_cached_s"] = json.loads(child([sys.executable, "-c", LOAD], cache)[1].splitlines()[-1])["load_s"]
        # as the `jaxgen` program runs it (cli.main() without argv turns the persistent compilation cache on)
        cmd = [sys.executable, "-c", "import sys; from jaxgen import cli; sys.exit(cli.main())", "generate",
               "The capital of France is", "--json", "--max-new-tokens", "32"]
        for key in ("compile_first_s", "compile_cached_s"):
            res[key] = json.loads(child(cmd, cache)[1].splitlines()[-1])["timing"]["compile_s"]
    with tempfile.TemporaryDirectory() as out:
        wall, text = child([sys.executable, "examples/train_and_sample.py", "--sup-steps", "60", "--rl-steps", "60",
                            "--out", out], out)
    res["example_s"] = wall
    res["example"] = json.loads(text.strip().splitlines()[-1])  # the example's own summary line
    print(json.dumps(res, indent=1), file=sys.stderr)
    stem = f"{machine()}-{datetime.date.today()}-startup"
    path = ROOT / "benchmarks" / "results" / f"{stem}.json"
    path.write_text(json.dumps({"date": str(datetime.date.today()), "cpu": cpu(), "model": "gemma3-270m", **res},
                               indent=1) + "\n")
    block = (f"Measured {datetime.date.today()} on {where()}, "
             f"`python -m benchmarks.startup`; results: `benchmarks/results/{stem}.json`.\n\n"
             "| what (Gemma 3 270M float32, each in a fresh process with an empty cache) | first | again |\n|---|---|---|\n"
             f"| `import jaxgen; jaxgen.load(...)` (first: GGUF -> Orbax conversion; again: restore) | {res['load_first_s']:.1f} s | "
             f"{res['load_cached_s']:.1f} s |\n"
             f"| `jaxgen generate ... --max-new-tokens 32`, compile_s (again: persistent compilation cache) | "
             f"{res['compile_first_s']:.1f} s | {res['compile_cached_s']:.1f} s |\n"
             f"| `examples/train_and_sample.py --sup-steps 60 --rl-steps 60`, wall | {res['example_s']:.0f} s | |\n\n"
             f"The example's summary: supervised loss {res['example']['sup_loss_first_last'][0]:.3g} -> "
             f"{res['example']['sup_loss_first_last'][1]:.3g}, mean reward per 25 RL steps "
             f"{res['example']['reward_by_25_steps']}, rows ended by the stop string in the last 25 steps "
             f"{res['example']['stopped_last_25_steps']:.0%}.")
    if not a.no_readme:
        update_readme(block, "startup")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
