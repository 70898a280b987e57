"""Sampling fixtures from HF transformers' logits processors: the distribution `generate(do_sample=True)`
draws from, for random logits and knobs, to hold jaxgen's sampling transforms to.

Run in a separate environment with torch and transformers (neither is a jaxgen dependency):

    python tools/make_sampling_fixtures.py [--out tests/fixtures] [--cases 240]

Each case: logits (ties, -inf entries, vocabularies of 5 to 1,000 ids: the largest exercise jaxgen's
full-vocabulary nucleus fallback), ids seen so far, temperature, top_k, top_p, min_p and
repetition_penalty, and HF's probabilities after RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper and MinPLogitsWarper, in the order `generate` applies them. Cases
whose kept set HF decides by the order of tied logits (its nucleus sort is not stable; jaxgen keeps every
tie, as documented) are left out.

Writes sampling-hf.json: {"meta": ..., "cases": [...]}, probabilities as [id, p] pairs for p > 0.
"""
import argparse
import json
import pathlib

import numpy as np


def random_case(rng):
    V = int(rng.choice([5, 17, 64, 300, 1000], p=[0.2, 0.25, 0.25, 0.2, 0.1]))
    x = rng.normal(0, float(rng.choice([0.3, 1, 3, 8])), V)
    kind = rng.integers(4)
    if kind == 1:
        x = np.round(x)  # many ties
    elif kind == 2:
        x[rng.random(V) < 0.3] = -np.inf
    x = np.round(x, 3)
    if not np.isfinite(x).any():
        x[0] = 0.0
    return {"logits": [None if not np.isfinite(v) else float(v) for v in x],
            "seen": sorted(set(rng.integers(0, V, rng.integers(0, 6)).tolist())),
            "temperature": float(rng.choice([0.3, 0.7, 1.0, 1.5])),
            "top_k": int(rng.choice([0, 0, 1, 2, 5, 40, min(V, 200)])),
            "top_p": float(rng.choice([1.0, 1.0, round(rng.uniform(0.01, 1.0), 4), 0.5, 0.9, 0.99])),
            "min_p": float(rng.choice([0.0, 0.0, round(rng.uniform(0, 1), 4), 0.05, 0.5])),
            "repetition_penalty": float(rng.choice([1.0, 1.0, 1.3, 0.8]))}


def hf_probs(c):
    import torch
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    x = torch.tensor([[float("-inf") if v is None else v for v in c["logits"]]], dtype=torch.float32)
    ids = torch.tensor([c["seen"] or [0]])
    procs = []
    if c["repetition_penalty"] != 1.0 and c["seen"]:
        procs.append(RepetitionPenaltyLogitsProcessor(c["repetition_penalty"]))
    if c["temperature"] != 1.0:
        procs.append(TemperatureLogitsWarper(c["temperature"]))
    if c["top_k"]:
        procs.append(TopKLogitsWarper(c["top_k"]))
    if c["top_p"] < 1.0:
        procs.append(TopPLogitsWarper(c["top_p"]))
    if c["min_p"] > 0:
        procs.append(MinPLogitsWarper(c["min_p"]))
    for p in procs:
        x = p(ids, x)
    return x[0].numpy(), torch.softmax(x, -1)[0].double().numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--cases", type=int, default=240)
    args = ap.parse_args()
    import transformers

    rng = np.random.default_rng(20261208)
    cases, dropped = [], 0
    while len(cases) < args.cases:
        c = random_case(rng)
        filtered, p = hf_probs(c)
        kept = np.isfinite(filtered)
        # a dropped id tied with a kept one (after the penalty and temperature): HF's choice among ties,
        # not a rule to test against
        raw = np.array([-np.inf if v is None else v for v in c["logits"]], np.float32)
        seen = np.isin(np.arange(raw.size), c["seen"])
        pen = np.where(seen, np.where(raw > 0, raw / c["repetition_penalty"], raw * c["repetition_penalty"]), raw)
        pen = pen / c["temperature"]
        if np.isin(pen[~kept & np.isfinite(pen)], pen[kept]).any():
            dropped += 1
            continue
        c["probs"] = [[int(i), float(f"{p[i]:.8g}")] for i in np.nonzero(kept)[0]]
        cases.append(c)
    out = pathlib.Path(args.out) / "sampling-hf.json"
    meta = {"reference": f"transformers {transformers.__version__} logits processors (float32)",
            "left_out_for_ties": dropped}
    out.write_text(json.dumps({"meta": meta, "cases": cases}, separators=(",", ":")))
    print("wrote", out, len(cases), "cases;", dropped, "left out for ties")


if __name__ == "__main__":
    main()
