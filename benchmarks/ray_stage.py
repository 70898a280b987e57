"""The Ray Data stage against `jaxgen batch` on one file.  python -m benchmarks.ray_stage

Gemma 3 270M float32, one JSONL file of `--rows` prompts (greedy, `--new-tokens` new tokens each, no
stop ids so every row does the same work). `jaxgen batch` in a fresh process (wall time from start
to exit, load and compile included), then examples/ray_batch.py with 1 and 2 actors on a local Ray
cluster (wall time of the dataset run: actor start-up, load, compile and generation; the cluster's
own start is not counted). Per-actor start-up: the Generate constructor (jaxgen import, model load)
timed inside the actor. Checks that every system wrote the same tokens for every id.
Writes benchmarks/results/<machine>-<date>-ray.json and the README's bench-ray table.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
SENTENCES = ["The river runs past the old mill", "A short note about the weather", "Three reasons to learn JAX",
             "The history of the city begins", "Write a list of fruits", "Once upon a time in a forest"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args(argv)
    d = ROOT / ".benchmarks" / "ray"
    d.mkdir(parents=True, exist_ok=True)
    inp = d / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"{SENTENCES[i % 6]} ({i}):"}) + "\n" for i in range(a.rows)))
    opts = dict(model="gemma3-270m", dtype="float32", max_new_tokens=a.new_tokens, batch_size=a.batch_size,
                ignore_stop=True)
    res = {"rows": a.rows, "new_tokens": a.new_tokens, "batch_size": a.batch_size}
    out = d / "batch.jsonl"
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxgen.cli", "batch", "--input", str(inp), "--output", str(out), "--model",
                    "gemma3-270m", "--dtype", "float32", "--max-new-tokens", str(a.new_tokens), "--batch-size",
                    str(a.batch_size), "--ignore-stop"], check=True, env=dict(os.environ, JAXGEN_COMPILE_CACHE="0"),
                   cwd=ROOT, stderr=subprocess.DEVNULL)
    res["jaxgen_batch"] = {"wall_s": time.perf_counter() - t}
    want = {x["id"]: x["tokens"] for x in map(json.loads, open(out))}

    import ray

    from ray_batch import run

    env = {"JAXGEN_COMPILE_CACHE": "0", "PYTHONPATH": str(ROOT)}  # every actor compiles: the cold cost
    ray.init(num_cpus=os.cpu_count() + 2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    @ray.remote
    def startup():
        t = time.perf_counter()
        import jaxgen.ray

        jaxgen.ray.Generate(**opts)
        return time.perf_counter() - t
    res["actor_startup_s"] = ray.get(startup.remote())
    for actors in (1, 2):
        o = d / f"ray-{actors}.jsonl"
        stats = run(str(inp), str(o), actors=actors, block_rows=a.rows // (2 * actors), **opts)
        got = {x["id"]: x["tokens"] for x in map(json.loads, open(o))}
        res[f"ray_{actors}_actors"] = {**stats, "same_tokens": sum(got.get(k) == v for k, v in want.items())}
        print(actors, stats, file=sys.stderr, flush=True)
    ray.shutdown()
    rows = ["| system (Gemma 3 270M f32, %d rows x %d new tokens) | wall s | rows/s | vs jaxgen batch | same tokens |"
            % (a.rows, a.new_tokens), "|---|---|---|---|---|"]
    base = res["jaxgen_batch"]["wall_s"]
    rows.append(f"| jaxgen batch (one process) | {base:.1f} | {a.rows / base:.2f} | 1.00x | {a.rows} / {a.rows} |")
    for actors in (1, 2):
        r = res[f"ray_{actors}_actors"]
        rows.append(f"| Ray Data stage, {actors} actor(s) | {r['wall_s']:.1f} | {a.rows / r['wall_s']:.2f} | "
                    f"{base / r['wall_s']:.2f}x | {r['same_tokens']} / {a.rows} |")
    text = "\n".join(rows) + f"\n\nPer-actor start-up (import jaxgen, load the model): {res['actor_startup_s']:.1f} s."
    print(text)
    from run import publish

    publish("ray", res, text, "python -m benchmarks.ray_stage")
    return 0


if __name__ == "__main__":
    sys.exit(main())
