"""lm-eval requests/s: jaxgen.lm_eval against lm-eval's own hf backend.  python -m benchmarks.evals [--quick]

Side by side on this machine, SmolLM2-135M in float32 (its GGUF exported as an HF directory with
jaxgen.checkpoint.hf_save: HFLM reads that directory, and so does jaxgen), batch size 32 for both, each
system's default settings otherwise (HFLM's float32 log-softmax, its padded batches):
- loglikelihood: 64 multiple-choice questions x 4 choices = 256 requests (the tests' jaxgen_mc docs,
  numbered variants), as a multiple-choice task sends them;
- generate_until: 32 questions, until ["\\n", "."], max_gen_toks 32, greedy.
Each system runs in its own process (HF in .benchmarks/hf, which needs lm-eval: benchmarks/setup_peers.sh
hf), one after the other: the first call (jaxgen compiles its programs there), then the median of 3
timed calls. The answers are compared too (largest log-likelihood difference, is-greedy flags and texts
equal), so a fast wrong answer would show.
Writes benchmarks/results/<machine>-<date>-evals.json and the README's bench-evals table.
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
GEN = {"until": ["\n", "."], "max_gen_toks": 32, "do_sample": False}


def requests(n_questions: int, n_gen: int):
    """(loglikelihood args, generate_until args), built from the tests' local task data."""
    data = ROOT / "tests" / "fixtures" / "lm_eval"
    mc = [json.loads(line) for line in (data / "mc.jsonl").read_text().splitlines()]
    gen = [json.loads(line) for line in (data / "gen.jsonl").read_text().splitlines()]
    ll = []
    for i in range(n_questions):
        d = mc[i % len(mc)]
        ctx = f"Question {i + 1}: {d['question']}\nAnswer:"
        ll += [(ctx, " " + c) for c in d["choices"]]
    gens = [(f"Q{i + 1}: {gen[i % len(gen)]['question']}\nA:", GEN) for i in range(n_gen)]
    return ll, gens


def worker(system: str, spec: dict) -> dict:
    from lm_eval.api.instance import Instance

    if system == "jaxgen":
        from jaxgen.lm_eval import JaxgenLM

        lm = JaxgenLM(model=spec["dir"], dtype="float32", batch_size=spec["batch"])
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=spec["dir"], dtype="float32", batch_size=spec["batch"], device="cpu")
    ll, gen = requests(spec["questions"], spec["gen"])
    out = {}
    for kind, args in (("loglikelihood", ll), ("generate_until", gen)):
        reqs = [Instance(kind, {}, a, i) for i, a in enumerate(args)]
        call = lambda: getattr(lm, kind)(reqs, disable_tqdm=True)
        t = time.perf_counter()
        call()
        first = time.perf_counter() - t
        times, answers = [], None
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            answers = call()
            times.append(time.perf_counter() - t)
        out[kind] = {"requests": len(reqs), "first_call_s": first, "times_s": times,
                     "requests_per_s": len(reqs) / statistics.median(times), "answers": answers}
    return out


def table(res) -> str:
    rows = ["| requests | jaxgen req/s | lm-eval hf req/s | jaxgen / hf | first call (jaxgen, hf) | answers |",
            "|---|---|---|---|---|---|"]
    for kind, what in (("loglikelihood", "loglikelihood (multiple choice)"), ("generate_until", "generate_until")):
        j, h = res["jaxgen"][kind], res["hf"][kind]
        if kind == "loglikelihood":
            diff = max(abs(a[0] - b[0]) for a, b in zip(j["answers"], h["answers"]))
            flags = sum(a[1] == b[1] for a, b in zip(j["answers"], h["answers"]))
            same = f"max log-lik diff {diff:.1e}, is-greedy equal {flags}/{j['requests']}"
        else:
            same = f"texts equal {sum(a == b for a, b in zip(j['answers'], h['answers']))}/{j['requests']}"
        rows.append(f"| {what}: {j['requests']} | {j['requests_per_s']:.1f} | {h['requests_per_s']:.1f} | "
                    f"{j['requests_per_s'] / h['requests_per_s']:.2f}x | {j['first_call_s']:.1f} s, "
                    f"{h['first_call_s']:.1f} s | {same} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 questions, 4 generations, jaxgen alone, one timed call")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per system")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, json.loads(a.spec))), flush=True)
        return 0
    import jaxgen
    from jaxgen.checkpoint import hf_save

    from benchmarks.run import publish, python_for, run_worker

    systems = ["jaxgen"] if a.quick else ["jaxgen", "hf"]
    if "hf" in systems and python_for("hf") is None:
        print("the hf peer is not set up: bash benchmarks/setup_peers.sh hf", file=sys.stderr)
        return 2
    out_dir = ROOT / ".benchmarks" / "models" / f"{MODEL}-hf-float32"
    if not (out_dir / "config.json").is_file():
        hf_save.save(jaxgen.load(MODEL, "float32"), out_dir)
    spec = {"dir": str(out_dir), "batch": 32, "questions": 8 if a.quick else 64, "gen": 4 if a.quick else 32,
            "repeats": 1 if a.quick else 3}
    res = {"spec": spec, "model": MODEL}
    for system in systems:
        env = dict(os.environ, PYTHONPATH=str(ROOT) if system == "jaxgen" else "", TF_CPP_MIN_LOG_LEVEL="3",
                   HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        try:
            res[system] = run_worker(pathlib.Path(__file__).resolve(), system, spec, python_for(system), env, a.timeout)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        print(system, {k: round(v["requests_per_s"], 2) for k, v in res[system].items()}, file=sys.stderr, flush=True)
    if a.quick:
        print(json.dumps({k: v["requests_per_s"] for k, v in res["jaxgen"].items()}))
        return 0
    text = table(res)
    print(text)
    publish("evals", res, text, "python -m benchmarks.evals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
