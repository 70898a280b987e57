"""Quality of the reduced-precision variants against float32 on a fixed text set.

    python -m benchmarks.quality [--tokens-per-text 1024] [--chunk 256]

Text set (nothing downloaded, nothing written by us to flatter the model): prose from the Python
license bundled with the interpreter (LICENSE.txt) and code from the standard library's `textwrap.py`
and `json/decoder.py`. Each text is cut into chunks scored teacher-forced from an empty cache, so
the KV cache variant is exercised too (prefill writes the quantized keys, later tokens attend to them).

Per variant (bfloat16, int8, int4 weights; int8 KV cache): perplexity, mean KL(f32 || variant) in
nats per token, and greedy agreement with the float32 greedy tokens on the reference prompts
(tests/fixtures/<model>.json). Also param and cache bytes. Writes benchmarks/results/quality-<model>.json
and the README's quality table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import sysconfig

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = ("float32", "bfloat16", "int8", "int4", "int8kv")


def texts() -> dict[str, str]:
    std = pathlib.Path(sysconfig.get_paths()["stdlib"])
    lic = next((p for p in (std / "LICENSE.txt", pathlib.Path(sys.base_prefix) / "LICENSE.txt") if p.exists()), None)
    out = {"code": (std / "textwrap.py").read_text() + "\n" + (std / "json" / "decoder.py").read_text()}
    if lic is not None:
        out["prose"] = lic.read_text()
    return out


def token_chunks(tokenizer, tokens_per_text: int, chunk: int) -> list[list[int]]:
    """BOS + chunk-1 tokens per chunk, tokens_per_text tokens of each text."""
    out = []
    for text in texts().values():
        ids = tokenizer.encode(text, add_bos=False)[:tokens_per_text]
        for i in range(0, len(ids) - chunk + 2, chunk - 1):
            out.append([tokenizer.bos_id] + ids[i:i + chunk - 1])
    return out


def variant_model(base, variant: str):
    """The Model for a variant, from the float32 base (quantized in-process)."""
    import jax
    import jax.numpy as jnp

    from jaxgen import quant

    if variant == "float32":
        return base
    if variant == "bfloat16":
        return dataclasses.replace(base, params=jax.tree.map(lambda a: a.astype(jnp.bfloat16), base.params))
    if variant == "int8kv":
        return dataclasses.replace(base, kv_quant="int8")
    return dataclasses.replace(base, params=quant.quantize_params(base.params, variant))


def _logprobs_fn():
    import jax

    from jaxgen import backend
    from jaxgen.cache import init_cache
    from jaxgen.model import forward

    def logprobs(params, tokens, cfg, kv_quant):
        B, T = tokens.shape
        pos = jax.numpy.broadcast_to(jax.numpy.arange(T), (B, T))
        cache = init_cache(cfg, B, T, params.embed.dtype, kv_quant=kv_quant)
        logits, _ = forward(params, tokens, pos, cache, cfg)
        return jax.nn.log_softmax(logits[:, :-1].astype(jax.numpy.float32), axis=-1)  # [B, T-1, V]

    # compiled as jaxgen compiles its own programs (on CPU: backend.CPU_COMPILER_OPTIONS, which change
    # bfloat16 rounding), so the figures are those of jaxgen's generate and score paths
    return backend.jit(logprobs, static_argnames=("cfg", "kv_quant"))


def compare(ref, model, chunks: list[list[int]], ref_cache: dict | None = None) -> dict:
    """ppl of `model` and mean KL(ref || model) per token over the chunks (each [T] ids). ref_cache: a
    dict that keeps ref's log-probs per chunk, for comparing several models against one ref."""
    import jax.numpy as jnp

    fn = _logprobs_fn()
    nll, kl, n = 0.0, 0.0, 0
    for i, ids in enumerate(chunks):
        t = jnp.asarray([ids], jnp.int32)
        if ref_cache is not None and i in ref_cache:
            lp_ref = ref_cache[i]
        else:
            lp_ref = fn(ref.params, t, ref.cfg, ref.kv_quant)
            if ref_cache is not None:
                ref_cache[i] = lp_ref
        lp = lp_ref if model is ref else fn(model.params, t, model.cfg, model.kv_quant)
        picked = jnp.take_along_axis(lp, t[:, 1:, None], axis=-1)[..., 0]
        nll -= float(picked.sum())
        kl += float(jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp)))
        n += t.shape[1] - 1
    return {"ppl": float(np.exp(nll / n)), "kl": kl / n, "tokens": n}


def greedy_agreement(model, cases: list[dict], new_tokens: int = 32) -> dict:
    """Against float32 reference greedy tokens: the fraction of positions that match, and the
    fraction of tokens before each row's first mismatch."""
    import jaxgen

    out = [jaxgen.generate(model, [c["prompt_ids"]], max_new_tokens=new_tokens, stop_ids=[])[0] for c in cases]
    same = prefix = total = 0
    for c, o in zip(cases, out):
        ref = c["greedy_ids"][:new_tokens]
        eq = [a == b for a, b in zip(o.tokens, ref)]
        same += sum(eq)
        prefix += next((i for i, e in enumerate(eq) if not e), len(eq))
        total += len(ref)
    return {"agreement": same / total, "prefix_agreement": prefix / total}


def table(rows: dict) -> str:
    head = ["variant", "param MB", "KV cache MB (B=1, 4096 tokens)", "perplexity", "KL to f32 (nats/token)",
            "greedy agreement (32 tokens)", "agreement before first divergence"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['param_bytes'] / 1e6:.0f} | {r['cache_bytes'] / 1e6:.1f} | {r['ppl']:.3f} | "
                     f"{r['kl']:.4f} | {100 * r['agreement']:.1f}% | {100 * r['prefix_agreement']:.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens-per-text", type=int, default=1536)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-readme", action="store_true")
    a = ap.parse_args(argv)

    import jaxgen
    from jaxgen import quant
    from jaxgen.cache import cache_bytes

    base = jaxgen.load(a.model, "float32")
    chunks = token_chunks(base.tokenizer, a.tokens_per_text, a.chunk)
    cases = json.loads((ROOT / "tests" / "fixtures" / f"{a.model}.json").read_text())["cases"]
    rows, ref_cache = {}, {}
    for v in a.variants.split(","):
        m = variant_model(base, v)
        r = compare(base, m, chunks, ref_cache)
        r.update(greedy_agreement(m, cases))
        r["param_bytes"] = quant.param_bytes(m.params)
        r["cache_bytes"] = cache_bytes(m.cfg, 1, 4096, m.params.embed.dtype, kv_quant=m.kv_quant)
        rows[v] = r
        print(v, json.dumps(r), file=sys.stderr, flush=True)
    import datetime

    from benchmarks.run import cpu, machine

    day = datetime.date.today().isoformat()
    out = ROOT / "benchmarks" / "results" / f"quality-{a.model}.json"
    out.write_text(json.dumps({"model": a.model, "date": day, "machine": machine(), "cpu": cpu(),
                               "chunks": len(chunks), "chunk": a.chunk,
                               "tokens": rows["float32"]["tokens"] if "float32" in rows else None,
                               "texts": list(texts()), "variants": rows}, indent=1))
    text = table(rows) + (f"\n\n{a.model}; {len(chunks)} chunks of {a.chunk} tokens (prose: the Python license; code: "
                          "textwrap.py and json/decoder.py), teacher-forced; greedy agreement on the 7 reference "
                          f"prompts against the float32 greedy tokens. Measured {day} by `python -m benchmarks.quality`; "
                          f"results: `benchmarks/results/quality-{a.model}.json`.")
    print(text)
    if not a.no_readme:
        from benchmarks.run import update_readme

        update_readme(text, "quality")

if __name__ == "__main__":
    main()
