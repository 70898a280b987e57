"""Plain vs speculative greedy decoding: tokens/s, acceptance and identical output, side by side.

    python -m benchmarks.speculative [--model gemma3-270m] [--draft MODEL] [--new-tokens 64]

Two prompt sets: extractive (a code snippet, then the start of a verbatim copy of it: prompt lookup can
draft the rest) and open prose. Each configuration is compiled by a first call, then timed over
`--repeats` calls (median); greedy, stop tokens ignored. Writes benchmarks/results/speculative-<model>.json
and the README table between <!-- spec:start --> and <!-- spec:end -->.
"""
from __future__ import annotations

import argparse
import inspect
import json
import pathlib
import statistics
import sys
import textwrap
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def prompts() -> dict[str, list[str]]:
    import json as json_mod
    import textwrap as tw

    snippets = [inspect.getsource(tw.dedent), inspect.getsource(tw.indent),
                inspect.getsource(json_mod.dumps).split('"""')[0] + inspect.getsource(json_mod.dumps).split('"""')[2],
                inspect.getsource(tw.TextWrapper._split_chunks)]
    extract = []
    for code in snippets:
        code = textwrap.dedent(code)
        first = code.splitlines()[0]
        extract.append(f"{code}\n\n# The function above, copied verbatim:\n{first}\n")
    prose = ["The capital of France is", "Once upon a time, in a small village by the sea,",
             "The most important thing to know about machine learning is", "My favourite recipe for dinner is"]
    return {"extractive": extract, "prose": prose}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--draft", default=None, help="a draft model sharing the vocabulary (e.g. qwen2.5-coder-0.5b)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lookup", default="ngram=3,gamma=8")
    ap.add_argument("--gamma", type=int, default=4, help="gamma of the draft model")
    ap.add_argument("--no-readme", action="store_true")
    a = ap.parse_args(argv)

    import jaxgen
    from jaxgen import speculative as S

    model = jaxgen.load(a.model, "float32")
    systems = {"plain": None, f"lookup ({a.lookup})": S.parse("lookup," + a.lookup)}
    if a.draft:
        systems[f"draft {a.draft} (gamma={a.gamma})"] = S.Proposer(gamma=a.gamma, draft=jaxgen.load(a.draft, "float32"))
    rows = []
    for task, ps in prompts().items():
        for B in map(int, a.batches.split(",")):
            batch = (ps * B)[:B] if B > 1 else ps[:1]
            ref = None
            for name, prop in systems.items():
                def call():
                    if prop is None:
                        return jaxgen.generate(model, batch, max_new_tokens=a.new_tokens, stop_ids=[]), None
                    return S.generate(model, batch, prop, max_new_tokens=a.new_tokens, stop_ids=[])

                out, stats = call()  # compiles
                times = []
                for _ in range(a.repeats):
                    t = time.perf_counter()
                    out, stats = call()
                    times.append(time.perf_counter() - t)
                toks = [o.tokens for o in out]
                ref = toks if prop is None else ref
                n = sum(len(x) for x in toks)
                row = {"task": task, "batch": B, "system": name, "tokens_per_s": n / statistics.median(times),
                       "identical_to_plain": toks == ref,
                       "acceptance_rate": stats.acceptance_rate if stats else None,
                       "tokens_per_target_pass": stats.tokens_per_pass if stats else 1.0}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    for r in rows:
        plain = next(x for x in rows if x["task"] == r["task"] and x["batch"] == r["batch"] and x["system"] == "plain")
        r["speedup"] = r["tokens_per_s"] / plain["tokens_per_s"]
    out = ROOT / "benchmarks" / "results" / f"speculative-{a.model}.json"
    out.write_text(json.dumps({"model": a.model, "new_tokens": a.new_tokens, "repeats": a.repeats, "rows": rows},
                              indent=1))
    lines = ["| task | batch | system | tokens/s | speedup | tokens per target pass | acceptance | same tokens as plain |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r['acceptance_rate']:.0f}%" if r["acceptance_rate"] is not None else "-"
        lines.append(f"| {r['task']} | {r['batch']} | {r['system']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['tokens_per_target_pass']:.2f} | {acc} | {'yes' if r['identical_to_plain'] else 'NO'} |")
    text = "\n".join(lines) + (f"\n\n{a.model}, float32, greedy, {a.new_tokens} new tokens per row, median of "
                               f"{a.repeats} timed calls after a compiling one (`python -m benchmarks.speculative`). "
                               "Tokens per target pass: new tokens after each row's first (which the prefill gives) "
                               "per target forward pass, at most gamma + 1; acceptance: accepted / drafted tokens "
                               "(prompt lookup's plain fallback steps draft none).")
    print(text)
    if not a.no_readme:
        from benchmarks.run import update_readme

        update_readme(text, "spec")

if __name__ == "__main__":
    main()
