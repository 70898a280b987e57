"""A/B of jaxgen's float32 greedy decode across two checkouts on one machine: tokens/s at batch 1, 8
and 32 (32 new tokens, median of 3 paired timings, prefill excluded), for the jaxgen package found in
the directory given.  python benchmarks/decode_ab.py /path/to/checkout   (run it for each, alternating)"""
import json
import statistics
import sys
import time

sys.path.insert(0, sys.argv[1])

import jaxgen  # noqa: E402
from jaxgen.checkpoint import load  # noqa: E402

model = load("gemma3-270m", "float32")
ids = model.tokenizer.encode("The capital of France is")
out = {}
for B in (1, 8, 32):
    def run(n):
        t = time.perf_counter()
        jaxgen.generate(model, [ids] * B, max_new_tokens=n, stop_ids=[])
        return time.perf_counter() - t
    run(33), run(1)  # compile both programs
    rates = []
    for _ in range(3):
        t1, tn = run(1), run(33)
        rates.append(B * 32 / (tn - t1))
    out[B] = round(statistics.median(rates), 1)
print(json.dumps({"tree": sys.argv[1], "tokens_per_s": out}))
