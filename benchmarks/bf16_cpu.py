"""bfloat16 on CPU: jaxgen's programs (compiled with backend.CPU_COMPILER_OPTIONS, each bfloat16 operation
rounded) against the same forward compiled with XLA's defaults (chains of bfloat16 arithmetic kept in
float32), both measured against HF transformers in bfloat16 and float32 on the same GGUF.

    python -m benchmarks.bf16_cpu      (needs `bash benchmarks/setup_peers.sh hf`)

The 7 reference prompts of tests/fixtures/<model>.json, each followed by its 32 float32 greedy tokens, are
scored teacher-forced in one pass; per position the KL divergence KL(reference || jaxgen) of the next-token
distributions, averaged over every position of every sequence (nats/token), and how often the argmax
agrees. Writes benchmarks/results/<machine>-<date>-bf16-vs-hf.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
HF_DTYPES = ("bfloat16", "float32")


def sequences(model: str) -> list[list[int]]:
    fx = json.loads((ROOT / "tests" / "fixtures" / f"{model}.json").read_text())
    return [c["prompt_ids"] + c["greedy_ids"] for c in fx["cases"]]


def hf_worker(spec: dict) -> dict:
    """In the hf peer's virtualenv: log-softmax [T, V] of each sequence, per dtype, saved to spec["out"]."""
    import torch
    from transformers import AutoModelForCausalLM

    path = pathlib.Path(spec["gguf"])
    arrays = {}
    for dt in HF_DTYPES:
        m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dt)).eval()
        for i, ids in enumerate(spec["sequences"]):
            with torch.inference_mode():
                arrays[f"{dt}_{i}"] = torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1).numpy()
    np.savez(spec["out"], **arrays)
    return {"transformers": __import__("transformers").__version__, "torch": torch.__version__}


def jaxgen_logprobs(model: str, seqs: list[list[int]]) -> dict:
    """{(dtype, compile): [log-softmax [T, V] per sequence]} for jaxgen's compile and XLA's default one."""
    import jax
    import jax.numpy as jnp

    import jaxgen
    from jaxgen import backend
    from jaxgen.cache import init_cache
    from jaxgen.model import forward

    def lp(params, tokens, cfg):
        cache = init_cache(cfg, 1, tokens.shape[1], params.embed.dtype)
        logits, _ = forward(params, tokens, jnp.arange(tokens.shape[1])[None], cache, cfg)
        return jax.nn.log_softmax(logits[0].astype(jnp.float32), -1)

    out = {}
    for dt in ("bfloat16", "float32"):
        m = jaxgen.load(model, dtype=dt)
        for name, jit in (("jaxgen", backend.jit(lp, static_argnums=2)), ("xla-default", jax.jit(lp, static_argnums=2))):
            out[dt, name] = [np.asarray(jit(m.params, np.asarray([s], np.int32), m.cfg)) for s in seqs]
    return out


def kl(ref: list[np.ndarray], got: list[np.ndarray], per_sequence: bool = False) -> float:
    """Mean over every position of every sequence of KL(ref || got), nats; per_sequence: the mean of each
    sequence's mean (one prompt is 700 tokens long, the others 30-50: the two weightings differ)."""
    each = [(np.exp(r) * (r - g)).sum(-1) for r, g in zip(ref, got)]
    return float(np.mean([e.mean() for e in each]) if per_sequence else np.mean(np.concatenate(each)))


def agree(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    return float(np.mean(np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)])))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--worker")
    ap.add_argument("--spec")
    a = ap.parse_args()
    if a.worker == "hf":
        print(json.dumps(hf_worker(json.loads(a.spec))))
        return
    from benchmarks.run import cpu, machine, python_for, run_worker
    from jaxgen.checkpoint import gguf_path

    if python_for("hf") is None:
        raise SystemExit("benchmarks.bf16_cpu needs the hf peer: bash benchmarks/setup_peers.sh hf")
    seqs = sequences(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"gguf": str(gguf_path(a.model)), "sequences": seqs, "out": os.path.join(tmp, "hf.npz")}
        versions = run_worker(pathlib.Path(__file__), "hf", spec, python=python_for("hf"),
                              env=dict(os.environ, PYTHONPATH=""))
        hf_npz = np.load(spec["out"])
        hf = {dt: [hf_npz[f"{dt}_{i}"] for i in range(len(seqs))] for dt in HF_DTYPES}
    ours = jaxgen_logprobs(a.model, seqs)
    def row(dt, name, got):
        return {"jaxgen_dtype": dt, "compile": name, "kl_to_hf_bfloat16": kl(hf["bfloat16"], got),
                "kl_to_hf_float32": kl(hf["float32"], got),
                "kl_to_hf_bfloat16_per_sequence": kl(hf["bfloat16"], got, True),
                "kl_to_hf_float32_per_sequence": kl(hf["float32"], got, True),
                "argmax_agrees_hf_same_dtype": None if dt is None else agree(hf[dt], got)}

    rows = [row(dt, name, got) for (dt, name), got in ours.items()] + [row(None, "HF bfloat16 itself", hf["bfloat16"])]
    day = datetime.date.today().isoformat()
    out = ROOT / "benchmarks" / "results" / f"{machine()}-{day}-bf16-vs-hf.json"
    out.write_text(json.dumps({"model": a.model, "date": day, "cpu": cpu(), "positions": sum(map(len, seqs)),
                               "hf": versions, "rows": rows}, indent=1))
    for r in rows:
        print(r)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
