"""Long-prompt prefill on Gemma 3 270M float32, side by side.  python -m benchmarks.long_prompts

For each prompt length (random token ids after BOS, batch 1) and system, a fresh process loads the
model and prefills the prompt up to its first new token; it reports prefill tokens/s and the
process's peak resident memory (VmHWM: load, compile and run). jaxgen: `stream(...,
max_new_tokens=1, timings=)`, which compiles the prefill and decode programs ahead (compile_s) and
times the prefill program alone (chunked prefill, `Model.prefill_chunk`; `--chunk` sets it). HF
transformers: `generate(max_new_tokens=1)` with sdpa attention on the same GGUF, float32, timed on a
second call after a warm-up one. A run past `--timeout` seconds or out of memory is reported as such
(and longer prompts of that system are not tried). `--mixed`: `jaxgen batch` (refill) on a file of
~100-token rows and two ~8k-token ones, wall time and peak RSS, at this revision and at `--before`. Writes benchmarks/results/<machine>-<date>-long.json
and the README's bench-long table; `--before REV` also measures jaxgen at another git revision (a
worktree) for the before/after rows.
"""
import argparse
import datetime
import json
import os
import pathlib
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
    from jaxgen.generate import stream

    model = jaxgen.load("gemma3-270m", "float32")
    if chunk and hasattr(model, "prefill_chunk"):
        model = dataclasses.replace(model, prefill_chunk=chunk)
    rss_loaded = peak_rss_mb()
    ids = prompt(length)
    t, timings = time.perf_counter(), {}
    out = list(stream(model, [ids], max_new_tokens=1, stop_ids=[], timings=timings))[-1]
    first = time.perf_counter() - t
    el = timings["prefill_s"]  # the compiled prefill program alone, device-synchronized
    return {"first_call_s": first, "compile_s": timings["compile_s"], "prefill_s": el, "prefill_tps": length / el,
            "token": int(out.tokens[0, 0]), "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
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


SENTENCE = ("The river runs past the old mill, under three stone bridges and along the market square, "
            "where traders have sold bread, fish and cloth since the town was founded. ")


def mixed_file(path: pathlib.Path, short: int, long: int, long_chars: int):
    """`short` rows of ~100 tokens and `long` rows of ~long_chars / 4.5 tokens, the long ones spread."""
    with open(path, "w") as f:
        for i in range(short + long):
            is_long = i % max(1, (short + long) // max(long, 1)) == 0 and i // max(1, (short + long) // long) < long
            text = SENTENCE * (long_chars // len(SENTENCE) if is_long else 3)
            f.write(json.dumps({"id": i, "prompt": f"Note {i}. {text}Summary of note {i}:"}) + "\n")


def run_batch(python: str, cwd: pathlib.Path, inp: pathlib.Path, out: pathlib.Path, extra: list[str], timeout: int):
    """Wall time and peak RSS (this child's own, from wait4) of one `jaxgen batch` run, and its plan."""
    base = [python, "-m", "jaxgen.cli", "batch", "--input", str(inp), "--output", str(out), "--model", "gemma3-270m",
            "--max-new-tokens", "32", "--ignore-stop", *extra]
    env = dict(os.environ, PYTHONPATH=str(cwd))
    out.unlink(missing_ok=True)
    plan = subprocess.run(base + ["--dry-run"], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    t = time.perf_counter()
    p = subprocess.Popen(base, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, status, usage = os.wait4(p.pid, 0)
    except KeyboardInterrupt:
        p.kill()
        raise
    wall = time.perf_counter() - t
    err = p.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        lines = [x for x in err.strip().splitlines() if "jaxgen batch:" in x] or err.strip().splitlines() or ["?"]
        return {"error": f"exit {code}: {lines[-1][:200]}", "wall_s": round(wall, 1),
                "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    rows = [json.loads(x) for x in open(out)]
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "rows": len(rows),
            "plan": json.loads(plan.stdout.strip().splitlines()[-1]) if plan.returncode == 0 else None,
            "tokens": {str(r["id"]): r.get("tokens") for r in rows}}


def mixed(a, runs) -> dict:
    d = ROOT / ".benchmarks" / "mixed"
    d.mkdir(parents=True, exist_ok=True)
    inp = d / "mixed.jsonl"
    mixed_file(inp, a.short_rows, a.long_rows, a.long_chars)
    res = {}
    for name, py, cwd in runs:
        r = run_batch(py, cwd, inp, d / f"out-{name.replace('@', '-')}.jsonl", ["--batch-size", str(a.batch_size)],
                      a.timeout)
        res[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "tokens"}), file=sys.stderr, flush=True)
    names = [n for n in res if "tokens" in res[n]]
    if len(names) == 2:
        x, y = (res[n]["tokens"] for n in names)
        res["same_tokens"] = sum(x[k] == y.get(k) for k in x)
    for r in res.values():
        if isinstance(r, dict):
            r.pop("tokens", None)
    return res


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
    ap.add_argument("--mixed", action="store_true",
                    help="instead: `jaxgen batch` (refill) on a file of ~100-token rows and a few ~8k-token ones")
    ap.add_argument("--batch-size", type=int, default=32, help="--mixed: jaxgen batch --batch-size")
    ap.add_argument("--short-rows", type=int, default=62)
    ap.add_argument("--long-rows", type=int, default=2)
    ap.add_argument("--long-chars", type=int, default=33000)
    ap.add_argument("--worker")
    a = ap.parse_args(argv)
    if a.worker:
        s = json.loads(a.worker)
        out = _hf(s["length"], s["gguf"]) if s["system"] == "hf" else worker_jaxgen(s["length"], s["chunk"])
        print(json.dumps(out), flush=True)
        return 0
    from jaxgen.checkpoint import registry
    from run import machine, publish, python_for

    gguf_path = str(registry.gguf_path("gemma3-270m"))
    lengths = [int(x) for x in a.lengths.split(",")]
    runs = [(s, python_for(s), ROOT) for s in a.systems.split(",")]
    if a.before:
        tree = ROOT / ".benchmarks" / f"before-{a.before}"
        if not tree.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), a.before], check=True, cwd=ROOT)
        runs.insert(0, (f"jaxgen@{a.before}", python_for("jaxgen"), tree))
    day = datetime.date.today().isoformat()
    stem = ROOT / "benchmarks" / "results" / f"{machine()}-{day}"
    if a.mixed:
        res = mixed(a, [r for r in runs if r[0] != "hf"])
        pathlib.Path(f"{stem}-mixed-b{a.batch_size}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return 0
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
    publish(a.tag, {"lengths": lengths, "results": res}, text, "python -m benchmarks.long_prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
