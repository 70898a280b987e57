"""jaxgen on the benchmark protocol (see common.py). Runs in jaxgen's own environment.

The spec's dtype may also name a quantized variant (float32 compute): int8 / int4 weights, or int8kv
(float32 weights, int8 KV cache)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import clock, decode_rates, report, spec  # noqa: E402


def main():
    s = spec()
    import jax

    import jaxgen

    from jaxgen import quant
    from jaxgen.cache import cache_bytes

    variant = s["dtype"]
    dtype = variant if variant in ("float32", "bfloat16") else "float32"
    q = variant if variant in ("int8", "int4") else None
    kvq = "int8" if variant == "int8kv" else None
    # the registry name uses the Orbax cache (per quantization mode)
    model = jaxgen.load(s.get("jaxgen_model") or s["gguf"], dtype, quant=q, kv_quant=kvq)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda e, d, **kw: compiles.append(kw.get("fun_name")) if e == "/jax/core/compile/backend_compile_duration" else None)

    seen = set()

    def run(batch, n, ids=s["prompt_ids"], **knobs):
        key, before = (batch, n, len(ids)), len(compiles)
        out = jaxgen.generate(model, [ids] * batch, max_new_tokens=n, stop_ids=[], **knobs)
        assert all(len(o.tokens) == n for o in out)
        if key in seen:  # a shape seen before must not compile again
            assert len(compiles) == before, f"recompiled for {key}: {compiles[before:]}"
        seen.add(key)

    t = clock()
    run(1, s["new_tokens"])
    first = clock() - t
    t = clock()
    run(1, 1, s["prefill_ids"])
    run(1, 1, s["prefill_ids"])  # compiled now
    t = clock()
    run(1, 1, s["prefill_ids"])
    prefill = len(s["prefill_ids"]) / (clock() - t)
    decode = {}
    for b in s["batches"]:
        decode[b] = decode_rates(run, b, s["new_tokens"], s["inner"])
    # the cost of sampling at the largest batch: top-k + top-p (+ temperature) against greedy, same
    # program (the knobs are traced), so the difference is the sampling stages' work per step
    big = max(s["batches"])
    sampled = decode_rates(lambda b, n, **kw: run(b, n, temperature=0.8, top_k=50, top_p=0.9, seed=0, **kw),
                           big, s["new_tokens"], s["inner"])
    report("jaxgen", s, first_call_s=first, prefill_tps=prefill, decode_tps=decode, compiles=len(compiles),
           sampled_tps={big: sampled},
           weight_bytes=quant.param_bytes(model.params),
           cache_bytes_b1_s1024=cache_bytes(model.cfg, 1, 1024, model.params.embed.dtype, kv_quant=kvq))


if __name__ == "__main__":
    main()
