"""Long-prompt prefill on Gemma 3 270M float32, side by side.  python -m benchmarks.long_prompts

For each prompt length (random token ids after BOS, batch 1) and system, a fresh process loads the
model, runs one prefill that yields the first new token (the warm-up: compilation included), then a
second, timed one; it reports prefill tokens/s of the second, the first call's time and the
process's peak resident memory (VmHWM: load, compile and both calls). jaxgen: `generate(...,
max_new_tokens=1)` (chunked prefill, `Model.prefill_chunk`; `--chunk` sets it). HF transformers:
`generate(max_new_tokens=1)` with sdpa attention on the same GGUF, float32. A run past `--timeout`
seconds or out of memory is reported as such. Writes benchmarks/results/<machine>-<date>-long.json
and the README's bench-long table; `--before REV` also measures jaxgen at another git revision (a
worktree) for the before/after rows.
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def prompt(length: int) -> list[int]:
    import numpy as np

    return [2] + np.random.RandomState(length).randint(1000, 200_000, length - 1).tolist()


def worker_jaxgen(length: int, chunk: int) -> dict:
    import dataclasses

    import jaxgen
    from common import peak_rss_mb

    model = jaxgen.load("gemma3-270m", "float32")
    if chunk and hasattr(model, "prefill_chunk"):
        model = dataclasses.replace(model, prefill_chunk=chunk)
    rss_loaded = peak_rss_mb()
    ids = prompt(length)
    t = time.perf_counter()
    jaxgen.generate(model, [ids], max_new_tokens=1, stop_ids=[])
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = jaxgen.generate(model, [ids], max_new_tokens=1, stop_ids=[])
    el = time.perf_counter() - t
    return {"first_call_s": first, "prefill_s": el, "prefill_tps": length / el, "token": out[0].tokens[0],
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
            "chunk": getattr(model, "prefill_chunk", None)}


def _hf(length: int, gguf_path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from common import peak_rss_mb

    torch.set_num_threads(os.cpu_count() or 2)
    p = pathlib.Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    rss_loaded = peak_rss_mb()
    x = torch.tensor([prompt(length)])

    def run():
        with torch.inference_mode():
            return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                                  pad_token_id=0)

    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = run()
    el = time.perf_counter() - t
    return {"first_call_s": first, "prefill_s": el, "prefill_tps": length / el, "token": int(out[0, -1]),
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}


def run_one(system: str, length: int, a, python: str, cwd: pathlib.Path, gguf_path: str) -> dict:
    spec = json.dumps({"system": system, "length": length, "chunk": a.chunk, "gguf": gguf_path})
    env = dict(os.environ, PYTHONPATH=str(cwd), TF_CPP_MIN_LOG_LEVEL="3")
    t = time.perf_counter()
    try:
        p = subprocess.run([python, str(pathlib.Path(__file__).resolve()), "--worker", spec], capture_output=True,
                           text=True, env=env, cwd=cwd, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {a.timeout} s"}
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-1:] or [f"exit {p.returncode}"]
        killed = p.returncode in (-9, 137)
        return {"error": "killed (out of memory)" if killed else tail[0][:200],
                "wall_s": round(time.perf_counter() - t, 1)}
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(res: dict, lengths: list[int]) -> str:
    systems = list(res)
    head = "| prompt tokens | " + " | ".join(f"{s} prefill tok/s | {s} peak RSS GB" for s in systems) + " |"
    rows = [head, "|" + "---|" * (1 + 2 * len(systems))]
    for L in lengths:
        cells = []
        for s in systems:
            r = res[s].get(str(L), {})
            if "error" in r:
                cells += [r["error"], "-"]
            elif r:
                cells += [f"{r['prefill_tps']:.0f}", f"{r['peak_rss_mb'] / 1024:.2f}"]
            else:
                cells += ["-", "-"]
        rows.append(f"| {L:,} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,1024,2048,8192,12288,16384,32000")
    ap.add_argument("--systems", default="jaxgen,hf")
    ap.add_argument("--chunk", type=int, default=0, help="jaxgen prefill chunk (0: the default)")
    ap.add_argument("--before", help="also run jaxgen at this git revision (its own worktree)")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--tag", default="long")
    ap.add_argument("--worker")
    a = ap.parse_args(argv)
    if a.worker:
        s = json.loads(a.worker)
        out = _hf(s["length"], s["gguf"]) if s["system"] == "hf" else worker_jaxgen(s["length"], s["chunk"])
        print(json.dumps(out), flush=True)
        return 0
    from jaxgen.checkpoint import registry
    from run import python_for, update_readme

    gguf_path = str(registry.gguf_path("gemma3-270m"))
    lengths = [int(x) for x in a.lengths.split(",")]
    runs = [(s, python_for(s), ROOT) for s in a.systems.split(",")]
    if a.before:
        tree = ROOT / ".benchmarks" / f"before-{a.before}"
        if not tree.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), a.before], check=True, cwd=ROOT)
        runs.insert(0, (f"jaxgen@{a.before}", python_for("jaxgen"), tree))
    res = {}
    for name, py, cwd in runs:
        if py is None:
            print(f"{name}: no virtualenv (benchmarks/setup_peers.sh)", file=sys.stderr)
            continue
        res[name] = {}
        for L in lengths:
            system = "hf" if name == "hf" else "jaxgen"
            r = run_one(system, L, a, py, cwd, gguf_path)
            res[name][str(L)] = r
            print(name, L, json.dumps(r), file=sys.stderr, flush=True)
            if "error" in r:  # longer prompts fail the same way: do not spend the time
                break
    text = table(res, lengths)
    print(text)
    day = datetime.date.today().isoformat()
    path = ROOT / "benchmarks" / "results" / f"{platform.machine()}-{os.cpu_count()}cpu-{day}-{a.tag}.json"
    path.write_text(json.dumps({"lengths": lengths, "results": res}, indent=1))
    update_readme(f"Measured {day} on this machine ({platform.machine()}, {os.cpu_count()} CPUs), "
                  f"`python -m benchmarks.long_prompts`; results: `{path.relative_to(ROOT)}`.\n\n{text}", "bench-long")
    return 0


if __name__ == "__main__":
    sys.exit(main())
