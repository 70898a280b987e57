"""Beam search (k=4) on Gemma 3 270M float32, jaxgen against HF transformers.  python -m benchmarks.beam

One prompts file (tools/make_reference.py's prompts, cycled to the batch size), greedy beam search with
k beams and exactly `--new-tokens` new tokens per prompt (no stop ids: every beam runs to the budget,
so both systems do the same work), batch 1 and 8. Each system runs in its own process and
virtualenv, alternating round by round; per batch size a warm-up call (jaxgen: the compile), then
`--reps` timed calls. tokens/s = new tokens of the returned best beams (batch x new_tokens) / wall
time of the call; medians. The best beams' tokens of the two systems are compared (same = HF's
`generate(num_beams=k, do_sample=False)` output, as tests/test_real_models.py checks on 11 prompts).
Writes benchmarks/results/<machine>-<date>-beam.json and the README's bench-beam table.
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tools"))


def prompts(batch: int) -> list[str]:
    from make_reference import PROMPTS

    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def timed(run, reps: int):
    """(first call s: the compile for jaxgen, [s of each of `reps` more calls], the last output)."""
    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
    return first, times, out


def worker_jaxgen(s: dict) -> dict:
    import jaxgen

    model = jaxgen.load("gemma3-270m", "float32")
    texts = prompts(s["batch"])
    run = lambda: jaxgen.generate(model, texts, num_beams=s["k"], max_new_tokens=s["new_tokens"], stop_ids=[])
    first, times, out = timed(run, s["reps"])
    return {"first_call_s": first, "times_s": times, "tokens": [c.tokens for c in out]}


def worker_hf(s: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 2)
    p = pathlib.Path(s["gguf"])
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    tok.padding_side = "left"  # decoder-only batches pad on the left
    texts = prompts(s["batch"])
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, ids))
    x = torch.tensor([[0] * (T - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids])

    def run():
        with torch.inference_mode():
            return model.generate(x, attention_mask=mask, max_new_tokens=s["new_tokens"], min_new_tokens=s["new_tokens"],
                                  num_beams=s["k"], do_sample=False, eos_token_id=None, pad_token_id=0)
    first, times, out = timed(run, s["reps"])
    return {"first_call_s": first, "times_s": times, "tokens": out[:, T:].tolist(),
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}


def run_one(system: str, spec: dict, timeout: int) -> dict:
    from run import python_for, run_worker

    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return run_worker(pathlib.Path(__file__).resolve(), system, spec, python_for(system), env, timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        s = json.loads(a.spec)
        print(json.dumps(worker_hf(s) if a.worker == "hf" else worker_jaxgen(s)), flush=True)
        return 0
    from jaxgen.checkpoint import registry
    from run import publish

    gguf = str(registry.gguf_path("gemma3-270m"))
    res = {"k": a.k, "new_tokens": a.new_tokens, "reps": a.reps, "rounds": a.rounds, "runs": []}
    for rnd in range(a.rounds):
        for b in (int(x) for x in a.batches.split(",")):
            for system in (("jaxgen", "hf") if rnd % 2 == 0 else ("hf", "jaxgen")):
                r = run_one(system, {"batch": b, "k": a.k, "new_tokens": a.new_tokens, "reps": a.reps, "gguf": gguf},
                            a.timeout)
                res["runs"].append({"system": system, "batch": b, "round": rnd, **r})
                print(system, b, rnd, f"first {r['first_call_s']:.1f}s", [round(t, 2) for t in r["times_s"]],
                      file=sys.stderr, flush=True)
    rows = ["| batch (k = %d beams, %d new tokens) | jaxgen tok/s | HF tok/s | jaxgen / HF | jaxgen first call s | "
            "HF first call s | same best beams |" % (a.k, a.new_tokens), "|---|---|---|---|---|---|---|"]
    summary = {}
    for b in (int(x) for x in a.batches.split(",")):
        med = {}
        first = {}
        toks = {}
        for system in ("jaxgen", "hf"):
            runs = [r for r in res["runs"] if r["system"] == system and r["batch"] == b]
            med[system] = statistics.median(b * a.new_tokens / t for r in runs for t in r["times_s"])
            first[system] = statistics.median(r["first_call_s"] for r in runs)
            toks[system] = runs[-1]["tokens"]
        same = sum(x == y for x, y in zip(toks["jaxgen"], toks["hf"]))
        summary[b] = {"jaxgen_tps": med["jaxgen"], "hf_tps": med["hf"], "ratio": med["jaxgen"] / med["hf"],
                      "jaxgen_first_s": first["jaxgen"], "hf_first_s": first["hf"], "same_best_beams": same}
        rows.append(f"| {b} | {med['jaxgen']:.1f} | {med['hf']:.1f} | {med['jaxgen'] / med['hf']:.2f}x | "
                    f"{first['jaxgen']:.1f} | {first['hf']:.1f} | {same} / {b} |")
    res["summary"] = summary
    text = "\n".join(rows)
    print(text)
    publish("beam", res, text, "python -m benchmarks.beam")
    return 0


if __name__ == "__main__":
    sys.exit(main())
