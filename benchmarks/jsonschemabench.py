"""Structured output on real-world schemas: the public JSONSchemaBench sample (25 schemas from each of
six subsets; tests/fixtures/jsonschemabench-sample.json).  python -m benchmarks.jsonschemabench [--quick]

Per subset:
- accepted: jaxgen.schema writes the regex and outlines-core builds its automaton on SmolLM2-135M's
  vocabulary within jaxgen.constraints.MAX_CELLS; the refusals' reasons are listed;
- build: seconds from schema to the device table (regex + automaton + token classes, an empty
  $JAXGEN_CACHE), p50 / p99, and the table's states, token classes and MB;
- generation: every accepted schema, greedy, SmolLM2-135M float32, its chat template with the user
  message "Produce a JSON object that follows this schema: <schema JSON>", up to 512 new tokens, batches
  of 8 rows: finished (the automaton closed or an end token in an accepting state), and valid of
  finished (json.loads + jsonschema, the schema's draft, format checking on): must be 100%.
- per decode step: a batch of 8 rows under the sample's largest accepted schemas that share one table
  (12,000 states) against the same rows free, the same number of steps (stop ids off), stream(timings=).
Published declared coverage (JSONSchemaBench, Table 4: Guidance / Outlines / XGrammar) is quoted beside.
Writes benchmarks/results/<machine>-<date>-jsonschemabench.json and the README's bench-jsonschemabench table.
"""
import argparse
import json
import os
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
SAMPLE = ROOT / "tests" / "fixtures" / "jsonschemabench-sample.json"
PUBLISHED = {  # declared coverage, Guidance / Outlines / XGrammar (None: not reported)
    "Github_easy": (.90, .86, .91), "Github_medium": (.79, .72, .79), "Glaiveai2K": (.98, .99, 1.00),
    "Kubernetes": (.98, .98, .12), "Snowplow": (.87, .95, None), "JsonSchemaStore": (.35, .38, .76)}
MODEL = "smollm2-135m"
MESSAGE = "Produce a JSON object that follows this schema: "


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def compile_all(tok, subsets) -> dict:
    """{subset: [{id, regex | refused, build_s, states, classes, table_mb}]} with an empty cache."""
    from constraints import table_mb  # benchmarks/constraints.py

    from jaxgen import constraints as con
    from jaxgen.schema import to_regex

    tb = tok.token_bytes()
    out = {}
    for sub, items in subsets.items():
        rows = []
        for it in items:
            r = {"id": it["id"]}
            t = time.perf_counter()
            try:
                regex = to_regex(it["schema"])
                table, _ = con.build([regex], tb, len(tb), tok.stop_ids)
                r.update(regex=regex, build_s=round(time.perf_counter() - t, 3),
                         states=len(con.automaton(regex, tb, tok.stop_ids)["accepting"]),
                         classes=int(table.token_class.max()) + 1, table_mb=table_mb(table))
            except ValueError as e:
                r["refused"] = str(e)
            rows.append(r)
            print(sub, it["id"], {k: v for k, v in r.items() if k != "regex"}, file=sys.stderr, flush=True)
        out[sub] = rows
    return out


def generate_all(model, subsets, built, batch: int, max_new: int) -> dict:
    """Greedy generation under every accepted schema; {subset: [{id, finish, valid, tokens, text}]}."""
    import jsonschema

    from jaxgen.constraints import STATE_BUCKETS

    jobs = [(sub, it, b["states"]) for sub, items in subsets.items() for it, b in zip(items, built[sub]) if "regex" in b]
    jobs.sort(key=lambda j: len(json.dumps(j[1]["schema"])))  # similar prompt lengths share a batch
    parts, part = [], []
    for job in jobs:  # a batch's schemas share one table: their states side by side within the largest bucket
        if part and (len(part) == batch or sum(j[2] for j in part) + job[2] >= STATE_BUCKETS[-1] - 1):
            parts.append(part)
            part = []
        part.append(job)
    parts += [part] if part else []
    out = {sub: [] for sub in subsets}
    for i, part in enumerate(parts):
        part = [(sub, it) for sub, it, _ in part]
        prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": MESSAGE + json.dumps(it["schema"])}])
                   for _, it in part]
        t = time.perf_counter()
        cs = run_split(model, prompts, [it["schema"] for _, it in part], max_new)
        wall = time.perf_counter() - t
        for (sub, it), c in zip(part, cs):
            cls = jsonschema.validators.validator_for(it["schema"], default=jsonschema.Draft202012Validator)
            valid = None
            if c.finish_reason == "stop":
                try:
                    valid = cls(it["schema"], format_checker=cls.FORMAT_CHECKER).is_valid(json.loads(c.text))
                except json.JSONDecodeError:
                    valid = False
            out[sub].append({"id": it["id"], "finish": c.finish_reason, "valid": valid, "tokens": len(c.tokens),
                             "text": c.text[:400]})
        print(f"batch {i} of {len(parts)}: {wall:.1f} s", [(c.finish_reason, len(c.tokens)) for c in cs], file=sys.stderr,
              flush=True)
    return out


def run_split(model, prompts, schemas, max_new):
    """generate, halving the batch where its schemas' shared table would be over MAX_CELLS."""
    import jaxgen

    try:
        return jaxgen.generate(model, prompts, max_new_tokens=max_new, json_schema=schemas)
    except ValueError as e:
        if "MAX_CELLS" not in str(e) or len(prompts) == 1:
            raise
        h = len(prompts) // 2
        return run_split(model, prompts[:h], schemas[:h], max_new) + run_split(model, prompts[h:], schemas[h:], max_new)


def step_cost(model, subsets, built, batch: int, steps: int) -> dict:
    """Per decode step, batch rows under the largest accepted schemas vs the same rows free."""
    from jaxgen.generate import stream

    accepted = [(b["states"], it["schema"]) for sub, items in subsets.items() for it, b in zip(items, built[sub])
                if "regex" in b]
    schemas, total = [], 0
    for states, schema in sorted(accepted, key=lambda x: -x[0]):  # the largest that share one table
        if len(schemas) < batch and total + states <= 12_000:
            schemas.append(schema)
            total += states
    schemas = (schemas * batch)[:batch]
    prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": MESSAGE + "(see above)"}])] * batch
    res = {}
    for label, kw in (("free", {}), ("schema", {"json_schema": schemas})):
        best = None
        for _ in range(3):
            t: dict = {}
            for out in stream(model, prompts, max_new_tokens=steps, stop_ids=[], timings=t, chunk_steps=1 << 30, **kw):
                pass
            n = int(out.num_new.max())  # the loop runs until its last row ends
            per = t["decode_s"] / max(n - 1, 1)
            best = per if best is None else min(best, per)
        res[f"{label}_ms"] = round(1000 * best, 2)
    res["overhead"] = round(res["schema_ms"] / res["free_ms"] - 1, 4)
    res["batch"], res["steps"] = batch, steps
    return res


def summarize(built, gen) -> dict:
    out = {}
    for sub, rows in built.items():
        ok = [r for r in rows if "regex" in r]
        g = gen.get(sub, [])
        fin = [x for x in g if x["finish"] == "stop"]
        out[sub] = {"schemas": len(rows), "accepted": len(ok),
                    "build_p50_s": pct([r["build_s"] for r in ok], .5), "build_p99_s": pct([r["build_s"] for r in ok], .99),
                    "states_p50": pct([r["states"] for r in ok], .5), "states_max": max((r["states"] for r in ok), default=0),
                    "table_mb_max": max((r["table_mb"] for r in ok), default=0),
                    "generated": len(g), "finished": len(fin), "valid": sum(bool(x["valid"]) for x in fin),
                    "refusals": sorted(re.sub(r"^[^:]*: ", "", r["refused"])[:100] for r in rows if "refused" in r)}
    return out


def table(res) -> str:
    rows = ["| subset | accepted | published (Guidance / Outlines / XGrammar) | finished | valid of finished | "
            "build p50 / p99 s | states p50 / max | table MB max |", "|---|---|---|---|---|---|---|---|"]
    for sub, s in res["summary"].items():
        pub = " / ".join("n/a" if x is None else f"{x:.2f}" for x in PUBLISHED[sub])
        rows.append(f"| {sub} | {s['accepted']} / {s['schemas']} ({s['accepted'] / s['schemas']:.2f}) | {pub} | "
                    f"{s['finished']} / {s['generated']} | {s['valid']} / {s['finished']} | {s['build_p50_s']} / "
                    f"{s['build_p99_s']} | {s['states_p50']} / {s['states_max']} | {s['table_mb_max']} |")
    st = res.get("steps")
    if st:
        rows += ["", f"| decode step, {MODEL} f32, batch {st['batch']} | free rows | rows under the largest schemas "
                     "sharing one table | overhead |", "|---|---|---|---|",
                 f"| {st['steps']} steps | {st['free_ms']} ms | {st['schema_ms']} ms | {100 * st['overhead']:+.1f}% |"]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 schemas per subset, 48 new tokens; nothing published")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    a = ap.parse_args(argv)
    import jaxgen

    subsets = json.loads(SAMPLE.read_text())["subsets"]
    if a.quick:
        subsets = {k: v[:3] for k, v in subsets.items()}
        a.max_new_tokens = 48
    model = jaxgen.load(MODEL, "float32")
    with tempfile.TemporaryDirectory() as d:
        os.environ["JAXGEN_CACHE"] = d
        built = compile_all(model.tokenizer, subsets)
        gen = generate_all(model, subsets, built, a.batch, a.max_new_tokens)
        steps = step_cost(model, subsets, built, a.batch, 64 if not a.quick else 8)
    res = {"model": MODEL, "max_new_tokens": a.max_new_tokens, "summary": summarize(built, gen), "steps": steps,
           "schemas": {sub: [{k: v for k, v in r.items() if k != "regex"} for r in rows] for sub, rows in built.items()},
           "generations": gen}
    text = table(res)
    print(text)
    if not a.quick:
        from run import publish

        publish("jsonschemabench", res, text, "python -m benchmarks.jsonschemabench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
