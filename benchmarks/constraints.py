"""Structured output on the real models.  python -m benchmarks.constraints [--quick]

1. Validity: 4 prompts x n=8 samples at temperature 1 under each schema of SCHEMAS (nested objects,
   arrays with bounds, enums, bounded strings, patterns), up to 128 new tokens, on Gemma 3 270M and
   SmolLM2 135M: rows finished, and of those how many parse (json.loads) and validate (jsonschema).
2. Build: seconds and table size (states, classes, bytes) of each schema on Gemma's 262k vocabulary,
   built cold (an empty $JAXGEN_CACHE) and from the disk cache.
3. Cost per decode step on Gemma 3 270M float32, batch 1 and 32, 64 steps: free rows against rows
   under a regex that never closes (`[a-z ,.]+`, stop ids off), from `stream(timings=)` (compiled
   programs, compilation apart). The host-side peer: the same regex as outlines-core's per-step
   allowed set computed on the CPU and applied between single jitted decode steps (greedy, batch 1),
   as llguidance / xgrammar-style integrations do.
Writes benchmarks/results/<machine>-<date>-constraints.json and the README's bench-constraints table.
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 16},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["title", "tags", "address"], "additionalProperties": False},
    "list": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer"}, "kind": {"enum": ["a", "b"]}}, "required": ["id", "kind"],
        "additionalProperties": False}, "minItems": 1, "maxItems": 4},
}
PROMPTS = ["A JSON record: ", "Extract the fields as JSON.\n", "Output:\n", "Data (JSON): "]
FREE = "[a-z ,.]+"


def validity(name: str, n: int, max_new: int) -> dict:
    import jsonschema

    import jaxgen

    model = jaxgen.load(name, "float32")
    out = {}
    for key, schema in SCHEMAS.items():
        t = time.perf_counter()
        cs = jaxgen.generate(model, PROMPTS, n=n, max_new_tokens=max_new, temperature=1.0, seed=7, json_schema=schema)
        el = time.perf_counter() - t
        fin = [c for c in cs if c.finish_reason == "stop"]
        valid = 0
        for c in fin:
            try:
                jsonschema.validate(json.loads(c.text), schema)
                valid += 1
            except Exception:
                pass
        out[key] = {"rows": len(cs), "finished": len(fin), "valid": valid, "wall_s": round(el, 1),
                    "example": fin[0].text if fin else None}
        print(name, key, out[key], file=sys.stderr, flush=True)
    return out


def table_mb(table) -> float:
    """MB of a constraint table on the device (padded to its buckets)."""
    import numpy as np

    return round(sum(np.asarray(a).nbytes for a in (table.token_class, table.next_state, table.accepting,
                                                    table.closed)) / 2**20, 2)


def build_costs() -> dict:
    import jaxgen
    from jaxgen import constraints as con

    tok = jaxgen.load("gemma3-270m", "float32").tokenizer
    tb = tok.token_bytes()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        os.environ["JAXGEN_CACHE"] = d
        for key, schema in SCHEMAS.items():
            regex = con.to_regex("json_schema", schema)
            con._MEMO.clear()
            t = time.perf_counter()
            table, _ = con.build([regex], tb, len(tb), tok.stop_ids)
            cold = time.perf_counter() - t
            con._MEMO.clear()
            t = time.perf_counter()
            con.build([regex], tb, len(tb), tok.stop_ids)
            warm = time.perf_counter() - t
            auto = con.automaton(regex, tb, tok.stop_ids)
            out[key] = {"states": len(auto["accepting"]), "classes": int(table.token_class.max()) + 1,
                        "table_mb": table_mb(table),
                        "build_cold_s": round(cold, 2), "build_cached_s": round(warm, 3)}
            print("build", key, out[key], file=sys.stderr, flush=True)
    return out


def step_costs(steps: int) -> dict:
    import jaxgen
    from jaxgen.generate import stream

    model = jaxgen.load("gemma3-270m", "float32")
    out = {}
    for B in (1, 32):
        prompts = [f"Item {i}: the" for i in range(B)]
        for label, kw in (("free", {}), ("regex", {"regex": FREE})):
            best = None
            for _ in range(2):
                t: dict = {}
                for _ in stream(model, prompts, max_new_tokens=steps, stop_ids=[], timings=t, chunk_steps=1 << 30, **kw):
                    pass
                per = t["decode_s"] / (steps - 1)
                best = per if best is None else min(best, per)
            out[f"B{B}_{label}_ms"] = round(1000 * best, 2)
        out[f"B{B}_overhead"] = round(out[f"B{B}_regex_ms"] / out[f"B{B}_free_ms"] - 1, 4)
        print("step", B, out, file=sys.stderr, flush=True)
    out["host_peer_B1_ms"] = round(1000 * host_peer(model, steps), 2)
    return out


def host_peer(model, steps: int) -> float:
    """Per-token time of the host-side way: outlines-core's allowed tokens for the current state on the
    CPU, copied to the device as a mask, one jitted decode step (forward + masked argmax) at a time."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from outlines_core import Index

    from jaxgen import constraints as con
    from jaxgen.cache import init_cache
    from jaxgen.model import forward

    tok, cfg = model.tokenizer, model.cfg
    vocab, _, _ = con._outlines_vocab(tok.token_bytes(), tok.stop_ids)  # (with jaxgen's id V + 1 for "\x00")
    index = Index(FREE, vocab)

    @jax.jit
    def step(params, t, pos, cache, mask):
        logits, cache = forward(params, t, pos, cache, cfg)
        return jnp.argmax(jnp.where(mask, logits[:, -1], -jnp.inf), axis=-1), cache

    ids = tok.encode("Item 0: the")
    cache = init_cache(cfg, 1, 128)
    logits, cache = jax.jit(forward, static_argnames="cfg")(model.params, jnp.asarray([ids]), jnp.arange(len(ids))[None],
                                                           cache, cfg)
    state, nxt, pos = index.get_initial_state(), int(jnp.argmax(logits[0, -1])), len(ids)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        mask = np.zeros(cfg.vocab_size, bool)
        allowed = np.asarray(index.get_allowed_tokens(state), np.int64)
        mask[allowed[allowed < cfg.vocab_size]] = True
        nxt_d, cache = step(model.params, jnp.asarray([[nxt]]), jnp.asarray([[pos]]), cache, jnp.asarray(mask))
        nxt = int(nxt_d[0])
        state = index.get_next_state(state, nxt)
        pos += 1
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))


def table(res: dict) -> str:
    rows = ["| model | schema | rows | finished | valid of finished |", "|---|---|---|---|---|"]
    for name, per in res["validity"].items():
        for key, r in per.items():
            rows.append(f"| {name} | {key} | {r['rows']} | {r['finished']} | {r['valid']} / {r['finished']} |")
    rows += ["", "| schema | states | token classes | table MB | build s (cold) | build s (disk cache) |",
             "|---|---|---|---|---|---|"]
    for key, r in res["build"].items():
        rows.append(f"| {key} | {r['states']} | {r['classes']} | {r['table_mb']} | {r['build_cold_s']} | "
                    f"{r['build_cached_s']} |")
    s = res["steps"]
    rows += ["", "| decode step, Gemma 3 270M f32 | free rows | constrained rows | overhead |", "|---|---|---|---|"]
    for B in (1, 32):
        rows.append(f"| batch {B} | {s[f'B{B}_free_ms']} ms | {s[f'B{B}_regex_ms']} ms | "
                    f"{100 * s[f'B{B}_overhead']:+.1f}% |")
    rows.append(f"| batch 1, host-side mask per step (outlines-core on the CPU, one jitted step at a time) | | "
                f"{s['host_peer_B1_ms']} ms | {100 * (s['host_peer_B1_ms'] / s['B1_free_ms'] - 1):+.1f}% |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    n, max_new, steps = (2, 48, 16) if a.quick else (8, 128, 64)
    models = ["gemma3-270m"] if a.quick else ["gemma3-270m", "smollm2-135m"]
    res = {"validity": {m: validity(m, n, max_new) for m in models}, "build": build_costs(), "steps": step_costs(steps)}
    text = table(res)
    print(text)
    if not a.quick:
        from run import publish

        publish("constraints", res, text, "python -m benchmarks.constraints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
