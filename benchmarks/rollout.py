"""Rollout workloads on Gemma 3 270M float32, side by side.  python -m benchmarks.rollout [--quick]

1. GRPO-shaped: 8 prompts of ~256 tokens x G=8 samples, temperature 0.9, top-k 50, up to 128 new
   tokens, stop string "." (ends most rows early). jaxgen n=8 (one prefill per prompt) against jaxgen
   with the prompts repeated 8 times, HF transformers generate (num_return_sequences=8, stop_strings)
   and Google's gemma library with the prompts repeated (its sampler stops on EOS ids only, so its
   rows run to 128 tokens).
2. Shared prefix: a ~1,000-token few-shot prefix and 64 short questions, batch 16, 32 new tokens:
   jaxgen with `prefill_prefix` once against the concatenated prompts.

GRPO figures: jaxgen's is its compiled prefill + decode loop (`stream(timings=)`, compilation timed
apart), HF's its one `generate` call, gemma's a call after a warm-up call (its compilation). Shared
prefix: end-to-end wall time of all the questions (prefill_prefix included) after a warm-up call;
"wasted steps" counts, per stopped row, the tokens generated after the one whose text completed the
stop string (decided in the compiled loop: 0 by construction, measured here from the outputs).
Each system runs in its own process (peers in their virtualenvs, see setup_peers.sh). Writes
benchmarks/results/<machine>-<date>-rollout.json and the README's bench-rollout table.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

TOPICS = ["rivers", "bread", "the moon", "trains", "bees", "glass", "maps", "tea"]
BODY = ("The history of the city begins with a small settlement on an island in the river, where fishermen "
        "and traders met to exchange goods. Over the centuries the settlement grew into a town, then a city, "
        "with walls, bridges, markets, churches and palaces. ")
SHOT = "Q: What is the capital of {c}?\nA: The capital of {c} is {k}.\n\n"
CAPS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
        ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Greece", "Athens"), ("Cuba", "Havana")]
QUESTIONS = ["Norway", "Poland", "Canada", "Brazil", "India", "China", "Mexico", "Ireland"]


def grpo_prompts(tok, length=256):
    out = []
    for t in TOPICS:
        ids, text = [], ""
        while len(ids) < length - 16:
            text += BODY
            ids = tok.encode(text)
        out.append(text + f"In one sentence, what does this say about {t}?")
    return out


def few_shot(tok, length=1000):
    text, i = "", 0
    while len(tok.encode(text)) < length:
        c, k = CAPS[i % len(CAPS)]
        text += SHOT.format(c=c, k=k)
        i += 1
    return text


def timed(fn, reps):
    first_t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - first_t
    ts = [first] if reps == 0 else []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return first, statistics.median(ts), out


def wasted_steps(tok, rows, stop):
    """Per stopped row: tokens after the first one whose text holds the stop string."""
    w = []
    for toks in rows:
        k = next((k for k in range(1, len(toks) + 1) if stop in tok.decode(toks[:k])), None)
        if k is not None:
            w.append(len(toks) - k)
    return w


# ---- systems -------------------------------------------------------------------------------------
def run_jaxgen(spec):
    import jaxgen
    from jaxgen.generate import prefill_prefix, stream

    model = jaxgen.load(spec["model"], "float32")
    tok = model.tokenizer
    g, reps = spec["G"], spec["reps"]
    kw = dict(max_new_tokens=spec["max_new"], temperature=0.9, top_k=50, seed=0, stop=[spec["stop"]])
    prompts = grpo_prompts(tok)[:spec["P"]]
    res = {}
    from jaxgen.generate import to_completions

    for name, rows, n in (("n", prompts, g), ("repeated", [p for p in prompts for _ in range(g)], 1)):
        # stream times the compiled prefill and decode loop apart (compilation excluded): one call
        timings = {}
        t = time.perf_counter()
        *_, last = stream(model, rows, n=n, chunk_steps=1 << 30, timings=timings, **kw)
        first = time.perf_counter() - t
        out = to_completions(model, rows, last, len(rows) * n, n, [[spec["stop"]]] * (len(rows) * n))
        stopped = [c for c in out if c.stop_reason == spec["stop"]]
        res[f"grpo_{name}"] = {"first_s": first, "wall_s": timings["prefill_s"] + timings["decode_s"],
                               "compile_s": timings["compile_s"], "prefill_s": timings["prefill_s"],
                               "decode_s": timings["decode_s"], "new_tokens": sum(len(c.tokens) for c in out),
                               "rows": len(out), "stopped": len(stopped), "steps": int(last.steps),
                               "wasted_steps": wasted_steps(tok, [c.tokens for c in stopped], spec["stop"])}
    # shared prefix: the questions in batches of 16
    prefix = few_shot(tok, spec["prefix_tokens"])
    qs = [f"Q: What is the capital of {QUESTIONS[i % len(QUESTIONS)]}? ({i})\nA:" for i in range(spec["questions"])]
    pk = dict(max_new_tokens=32, stop_ids=[])
    batches = [qs[i:i + 16] for i in range(0, len(qs), 16)]

    def with_prefix():
        shared = prefill_prefix(model, prefix)
        return [c for b in batches for c in jaxgen.generate(model, b, prefix=shared, **pk)]

    def concatenated():
        return [c for b in batches for c in jaxgen.generate(model, [prefix + q for q in b], **pk)]

    for name, call in (("prefix", with_prefix), ("concatenated", concatenated)):
        first, med, out = timed(call, reps)
        res[f"prefix_{name}"] = {"first_s": first, "wall_s": med, "new_tokens": sum(len(c.tokens) for c in out),
                                 "prefix_tokens": len(tok.encode(prefix))}
    return res


def run_hf(spec):
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    import sentencepiece as spm

    torch.set_num_threads(os.cpu_count() or 2)
    path = pathlib.Path(spec["gguf"])
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=spec["sp_model"])
    stop = spec["stop"]

    class StopString(StoppingCriteria):  # HF's stop_strings needs an HF tokenizer; this decodes with the same SP model
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([stop in sp.decode(row[self.start:].tolist()) for row in input_ids])

    prompts = [[2] + sp.encode(p) for p in grpo_prompts(_SP(sp))[:spec["P"]]]
    T = max(map(len, prompts))
    x = torch.tensor([[0] * (T - len(p)) + p for p in prompts])  # left-padded, as HF generate wants
    mask = (torch.arange(T)[None, :] >= (T - torch.tensor([len(p) for p in prompts]))[:, None]).long()

    def call():
        torch.manual_seed(0)
        with torch.inference_mode():
            return model.generate(x, attention_mask=mask, max_new_tokens=spec["max_new"], do_sample=True,
                                  temperature=0.9, top_k=50, num_return_sequences=spec["G"], pad_token_id=0,
                                  stopping_criteria=StoppingCriteriaList([StopString(T)]))

    first, med, out = timed(call, 0)  # no compilation to warm up: the first call is the measurement
    return {"grpo_hf": {"first_s": first, "wall_s": med, "rows": out.shape[0],
                        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}}


class _SP:  # the encode() that grpo_prompts needs, over a bare SentencePiece model
    def __init__(self, sp):
        self.sp = sp

    def encode(self, text):
        return [2] + self.sp.encode(text)


def run_gemma(spec):
    import jax
    import jax.numpy as jnp
    from gemma import gm

    from peer_gemma import gemma_params

    params = gemma_params(spec["gguf"], jnp.float32)
    model = gm.nn.Gemma3_270M()
    tok = gm.text.Gemma3Tokenizer(path=spec["sp_model"])
    import sentencepiece as spm

    prompts = grpo_prompts(_SP(spm.SentencePieceProcessor(model_file=spec["sp_model"])))[:spec["P"]]
    rows = [p for p in prompts for _ in range(spec["G"])]
    # its stop_tokens are single tokens: "." as a token (a "." inside a longer token does not stop it)
    sampler = gm.text.Sampler(model=model, params=params, tokenizer=tok, cache_length=512,
                              max_out_length=spec["max_new"], pad_length=(256, 320), stop_tokens=[spec["stop"]])

    def call():
        out = sampler.sample(rows, max_new_tokens=spec["max_new"], sampling=gm.text.TopkSampling(k=50, temperature=0.9),
                             rng=jax.random.key(0))
        return out

    first, med, out = timed(call, spec["reps"])
    return {"grpo_gemma": {"first_s": first, "wall_s": med, "rows": len(rows),
                           "versions": {"gemma": __import__("gemma").__version__, "jax": jax.__version__}}}


SYSTEMS = {"jaxgen": run_jaxgen, "hf": run_hf, "gemma": run_gemma}


def table(res, spec):
    spec_pg = f"{spec['P']}x{spec['G']}"
    g = res.get("grpo_n", {})
    rows = ["| workload | system | wall s | vs jaxgen n=8 | prefill s | new tokens | rows stopped | wasted steps / stopped row |",
            "|---|---|---|---|---|---|---|---|"]
    base = g.get("wall_s")
    for key, label in (("grpo_n", "jaxgen n=8 (one prefill per prompt)"), ("grpo_repeated", "jaxgen, prompts repeated x8"),
                       ("grpo_hf", "HF generate num_return_sequences=8 (first call)"), ("grpo_gemma", "gemma Sampler, prompts repeated x8")):
        r = res.get(key)
        if not r:
            rows.append(f"| GRPO {spec_pg} | {label} | not run | | | | | |")
            continue
        w = r.get("wasted_steps")
        rows.append(f"| GRPO {spec_pg} | {label} | {r['wall_s']:.1f} | {r['wall_s'] / base:.2f}x | "
                    f"{r.get('prefill_s', float('nan')):.1f} | {r.get('new_tokens', '')} | "
                    f"{r.get('stopped', '')} | "
                    f"{(sum(w) / max(len(w), 1)) if w is not None else ''} |".replace("nan", "-"))
    p, c = res.get("prefix_prefix"), res.get("prefix_concatenated")
    if p and c:
        q = f"prefix {p['prefix_tokens']} tok + {spec['questions']} questions"
        rows.append(f"| {q} | jaxgen prefill_prefix | {p['wall_s']:.1f} | {c['wall_s'] / p['wall_s']:.2f}x faster "
                    f"than concatenated | | {p['new_tokens']} | | |")
        rows.append(f"| {q} | jaxgen concatenated prompts | {c['wall_s']:.1f} | | | {c['new_tokens']} | | |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="jaxgen,hf,gemma")
    ap.add_argument("--quick", action="store_true", help="2 prompts x G=2, 16 new tokens, jaxgen only")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per system")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(SYSTEMS[a.worker](json.loads(a.spec))), flush=True)
        return 0
    from jaxgen.checkpoint import registry
    from run import publish, python_for, run_worker

    import jaxgen

    tok = jaxgen.load("gemma3-270m", "float32").tokenizer
    out_dir = ROOT / "benchmarks" / "results"
    sp_model = out_dir / ".gemma3-270m.spm"
    sp_model.write_bytes(tok.proto)
    spec = {"model": "gemma3-270m", "gguf": str(registry.gguf_path("gemma3-270m")), "sp_model": str(sp_model),
            "P": 2 if a.quick else 8, "G": 2 if a.quick else 8, "max_new": 16 if a.quick else 128, "stop": ".",
            "reps": a.reps, "prefix_tokens": 100 if a.quick else 1000, "questions": 16 if a.quick else 64}
    systems = ["jaxgen"] if a.quick else a.systems.split(",")
    res = {}
    for s in systems:
        py = python_for(s)
        if py is None:
            print(f"{s}: no virtualenv (benchmarks/setup_peers.sh)", file=sys.stderr)
            continue
        env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
        try:
            res.update(run_worker(pathlib.Path(__file__).resolve(), s, spec, py, env, a.timeout))
        except subprocess.TimeoutExpired:
            print(f"{s}: timed out after {a.timeout} s", file=sys.stderr)
            res[f"grpo_{s}_timeout_s"] = a.timeout
            continue
        except RuntimeError as e:  # the worker failed: its stderr tail, and the other systems still run
            print(e, file=sys.stderr)
            continue
        print(s, json.dumps(res), file=sys.stderr)
    text = table(res, spec)
    print(text)
    if not a.quick:
        publish("rollout", {"spec": spec, "results": res}, text, "python -m benchmarks.rollout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
