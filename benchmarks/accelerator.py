"""Decode and prefill on an accelerator, side by side with HF transformers on the same device:
    python -m benchmarks.accelerator [--models ...] [--budget-s 420] [--no-hf] [--readme]
    python -m benchmarks.accelerator --smoke      # a tiny preset on CPU in seconds (CI runs it)

No network and no model packages: params are random (bf16) from the presets' shapes, and HF's models
are built from the same shapes (jaxgen.checkpoint.hf_save.hf_config -> transformers `from_config`).
Per model and batch: decode tokens/s (prompts of 32 random ids, 256 new tokens, greedy, no stop; the
32-token prefill is inside the time, for both systems), the
fraction of the roofline it reaches, compile time; per model: prefill tokens/s at 2k and 8k tokens.

Roofline: a decode step must read every weight once and each row's live keys and values (local layers
at most their window), so tokens/s <= batch * bandwidth / (weight bytes + KV bytes at the average live
length). The bandwidth is measured in the same run: the best of 10 jitted `x + 1` over a 2 GiB bf16
array (read + write). HF: torch bf16, sdpa attention, a static cache (`cache_implementation="static"`).
Then `paths` rows (jaxgen.backend, one model, --paths-s of the budget kept for them): decode tokens/s
with each backend-sensitive choice flipped from the backend's default, one at a time (decode
attention full / live / pallas, sampling gates cond / where with sampled rows, int8 weights
dequantized to f32 / bf16, unrolled / scanned layers with their compile times), on a uniform batch
and on a ragged one (one long prompt among short ones: the case length-aware attention is for). A
choice that fails to compile is a row with its error, not the end of the run.
After the model rows, `profiles` (benchmarks.step_profile; --profile-s of the budget kept for them):
where one decode step's time goes on the paths model at --profile-batches: wall and device-busy ms,
op launches and device<->host copies per step, the ops with the most self time and the jaxgen line
that made each.
Then `moe_rows` (issue 31 on the device; --moe-s of the
budget kept for them): benchmarks.moe's random model with Qwen3-30B-A3B's layer shapes (--moe-layers
layers, bf16): steady-state decode tokens/s and the fraction of the roofline of the *active* bytes
(non-expert weights plus the experts the batch picks) for the default computation at batch 1 / 8 / 32
and, at each, the one of gathered / grouped it did not choose (`jaxgen.moe.choose` switches between
them in that range), all experts ("dense") at batch 1, prefill of 2,048 tokens, and the same batch-1
fraction for a dense model of the active width.
Models run in order until --budget-s is spent (the rest are listed as skipped), so one GPU run fits
its time. Writes benchmarks/results/<device>-<date>-accelerator.json (`rows`) and, with --readme, the
README table between the accelerator markers. The file is rewritten after every stage ("complete":
false until the last), and a model whose jaxgen or HF run fails is a row with its error, so a run
stopped at its time limit, or one model out of memory, does not lose the rest.

On a lent device machine (no network; only the files a command leaves in $OUT come back), one command:
    PYTHONUNBUFFERED=1 python3 -m benchmarks.accelerator --out "$OUT" 2>&1 | tee "$OUT/accelerator.log"
(its packages are all in that image: `import jaxgen` needs no gguf, outlines-core or jsonschema); then
here, with the file copied into benchmarks/results/:
    python -m benchmarks.accelerator --readme-from benchmarks/results/<device>-<date>-accelerator.json
"""
import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import sys
import time

import numpy as np

# Let torch (the HF side) have device memory: JAX would otherwise take 75% of it at its first use.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from benchmarks import common  # noqa: E402
from benchmarks.run import ROOT, update_readme  # noqa: E402

MODELS = ["gemma3-270m", "qwen2.5-coder-1.5b", "llama3.2-1b", "gemma3-1b", "qwen3-4b", "llama3.1-8b", "qwen3-8b"]


def timed(fn, repeats: int) -> float:
    """The fastest of `repeats` calls (seconds), after one untimed call."""
    fn()
    return min(common.timed(fn, repeats))


def bandwidth(nbytes: int) -> float:
    """Device memory bandwidth (bytes/s): a jitted x + 1 reads and writes nbytes of bf16 once each."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(nbytes // 2, jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    t = timed(lambda: jax.block_until_ready(f(x)), 10)
    return 2 * nbytes / t


def kv_bytes_per_row(cfg, live: int, itemsize: int) -> int:
    """Key + value bytes a decode step reads for one row of `live` tokens (local layers: the window)."""
    per_token = 2 * cfg.n_kv_heads * cfg.head_dim * itemsize
    window = min(live, cfg.sliding_window) if cfg.sliding_window else live
    return per_token * (cfg.n_global * live + cfg.n_local * window)


def _error(e: Exception) -> str:
    """An exception as one line for the results file: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def preflight():
    """The paths the model rows run: the backend's defaults if a tiny model generates with them here,
    else the first fallback that does (each path is new on a device until a run has measured it:
    one that does not compile must not cost the whole run). Returns (paths, errors)."""
    import jax
    import jax.numpy as jnp

    import jaxgen
    from jaxgen import backend

    cfg = smoke_config()
    params = jax.jit(lambda k: jaxgen.init_params(cfg, k, jnp.bfloat16))(jax.random.key(0))
    default = backend.current()
    errors = {}
    for paths in (default, default.replace(decode_attention="live"),
                  default.replace(decode_attention="live", prefill_attention="xla"), backend.REFERENCE):
        try:
            jaxgen.generate(jaxgen.Model(cfg, params, paths=paths), [[1, 2, 3], [4] * 20], max_new_tokens=4)
            return paths, errors
        except Exception as e:  # noqa: BLE001 - recorded in the results file
            errors[str(paths)] = _error(e)
    raise RuntimeError(f"no paths generate on this device: {errors}")


def jaxgen_rows(cfg, args, bw, device_kind, paths=None):
    import jax

    import jaxgen
    from benchmarks.step_profile import random_model

    model = random_model(cfg, paths)  # random bf16 params in the layout jaxgen.load gives for these paths
    params = model.params
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    rows = []
    for B in args.batches:
        prompts = rng.integers(1, cfg.vocab_size, (B, args.prompt)).tolist()
        t = time.perf_counter()
        jaxgen.precompile(model, B, args.prompt, args.new)
        compile_s = time.perf_counter() - t
        run = lambda: jaxgen.generate(model, prompts, max_new_tokens=args.new, stop_ids=[])
        dt = timed(run, args.repeats)
        tok_s = B * args.new / dt
        step_bytes = weights + B * kv_bytes_per_row(cfg, args.prompt + args.new // 2, 2)
        rows.append(dict(device_kind=device_kind, model=cfg.name, params_b=n_params / 1e9, dtype="bfloat16", batch=B,
                         decode_tok_s=tok_s, roofline_fraction=tok_s / (B * bw / step_bytes), compile_s=compile_s))
    prefill = {}
    for L in args.prefill:
        if L + 1 > cfg.max_seq_len:
            continue
        ids = [rng.integers(1, cfg.vocab_size, L).tolist()]
        jaxgen.precompile(model, 1, L, 1)
        prefill[str(L)] = L / timed(lambda: jaxgen.generate(model, ids, max_new_tokens=1, stop_ids=[]), args.repeats)
    rows[0]["prefill_tok_s"] = prefill
    return rows  # (main's release() frees the model once this frame is gone)


def release():
    """Free what a finished (or failed) model left: Python's cycles, and torch's cached device memory,
    which JAX's next model could not otherwise allocate."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_figures(cfg, args):
    """HF transformers' decode tokens/s per batch and prefill tokens/s per length on the same device,
    or None where torch / transformers are missing."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    from jaxgen.checkpoint.hf_save import hf_config

    d = hf_config(cfg)
    d.pop("architectures")
    conf = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16,
                                                          attn_implementation="sdpa").to(dev).eval()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    out = {"decode": {}, "prefill": {}}
    with torch.no_grad():
        for B in args.batches:
            ids = torch.randint(1, cfg.vocab_size, (B, args.prompt), device=dev)
            gen = lambda: (model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                          min_new_tokens=args.new, do_sample=False, pad_token_id=0,
                                          cache_implementation="static"), sync())
            out["decode"][B] = B * args.new / timed(gen, 1)  # one timed call: HF's steps are slow to repeat
        for L in args.prefill:
            if L + 1 > cfg.max_seq_len:
                continue
            ids = torch.randint(1, cfg.vocab_size, (1, L), device=dev)
            out["prefill"][str(L)] = L / timed(lambda: (model(ids, logits_to_keep=1), sync()), args.repeats)
    return out  # (main's release() frees the model and torch's cached memory once this frame is gone)


def profile_rows(cfg, args, paths, deadline):
    """benchmarks.step_profile's one-step profile of cfg at each of --profile-batches, until `deadline`
    (a profile that fails is a row with its error: the profiler needs CUPTI on a GPU)."""
    from benchmarks import step_profile

    model = step_profile.random_model(cfg, paths)
    rng = np.random.default_rng(2)
    n1, n2 = (17, 32) if args.smoke else (144, 256)
    out = []
    for B in args.profile_batches:
        if time.perf_counter() > deadline:
            out.append(dict(model=cfg.name, batch=B, skipped=True))
            continue
        try:
            p = step_profile.profile(model, rng.integers(1, cfg.vocab_size, (B, args.prompt)).tolist(), n1, n2)
            print("\n".join(step_profile.lines(p)), file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - recorded in the results file
            if args.smoke:
                raise
            p = dict(model=cfg.name, batch=B, error=_error(e))
        out.append(p)
    del model
    gc.collect()
    return out


def moe_rows(args, bw, device_kind, paths, deadline):
    """benchmarks.moe's rows on this device (bf16), until `deadline`: see the module docstring."""
    from benchmarks import moe
    from jaxgen import moe as moe_lib

    cfg = moe.config(args.smoke, args.moe_layers)
    a = argparse.Namespace(prompt=args.prompt, new=16 if args.smoke else 32, repeats=args.repeats,
                           prefill=64 if args.smoke else 2048, batches=None)
    b = [1] if args.smoke else [1, 8, 32]
    # each batch's default, then the computations it did not choose (the choice's measured reason), all experts at 1
    plan = [("auto", b)] + [(impl, [B]) for B in b for impl in ("gathered", "grouped")
                            if impl != moe_lib.choose(cfg, B)]
    plan = plan[:2] if args.smoke else plan + [("dense", b[:1])]  # smoke: the code paths, not every computation
    rows, prefill = moe.rows_for(cfg, "bfloat16", a, bw, paths, plan, deadline, catch=True)
    ref = moe.dense_reference(cfg, a, bw, "bfloat16", paths) if time.perf_counter() < deadline else None
    for r in rows:
        r.update(device_kind=device_kind, model=cfg.name)
    return {"model": cfg.name, "layers": cfg.n_layers, "experts": cfg.n_experts,
            "experts_per_token": cfg.n_experts_per_tok, "rows": rows, "prefill_tokens": a.prefill,
            "prefill_tok_s": prefill, "dense_reference": ref}


PATH_FLIPS = [("decode_attention", "full"), ("decode_attention", "live"), ("decode_attention", "pallas"),
              ("prefill_attention", "xla"), ("prefill_attention", "dpa"), ("gates", "cond"), ("gates", "where"),
              ("unroll", True), ("unroll", False)]


def paths_rows(cfg, args, device_kind, deadline):
    """Decode tokens/s of the backend's default paths and of each single flip of them (PATH_FLIPS,
    and int8 weights with either dequantization), until `deadline` (perf_counter seconds)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    import jaxgen
    from jaxgen import backend, quant
    from jaxgen.model import stack_layers, unstack_layers

    default = backend.current()
    params = jax.jit(lambda k: jaxgen.init_params(cfg, k, jnp.bfloat16))(jax.random.key(0))
    rng = np.random.default_rng(1)
    short = lambda n: rng.integers(1, cfg.vocab_size, n).tolist()
    long_len = min(args.paths_long, cfg.max_seq_len - args.paths_new - 1)
    cases = {"uniform": [short(args.prompt) for _ in range(args.paths_batch)],
             "ragged": [short(long_len)] + [short(args.prompt) for _ in range(args.paths_batch - 1)]}
    if args.smoke:  # CI: every variant compiles and decodes once (the ragged batch is another program each)
        del cases["ragged"]
    knobs = {"greedy": {}, "sampled": dict(temperature=0.8, top_p=0.95, seed=list(range(args.paths_batch)))}
    variants = [("default", default, "float")] + [
        (f"{f}={v}", default.replace(**{f: v}), "float") for f, v in PATH_FLIPS if getattr(default, f) != v] + [
        (f"int8 dequant={d}", default.replace(dequant=d), "int8") for d in ("float32", "bfloat16")]
    int8 = None
    rows = []
    for name, paths, weights in variants:
        if time.perf_counter() > deadline:
            rows.append(dict(device_kind=device_kind, model=cfg.name, variant=name, skipped=True))
            continue
        if weights == "int8":
            int8 = int8 if int8 is not None else quant.quantize_params(params, "int8")
            p = int8
        else:
            p = unstack_layers(params) if paths.unroll else stack_layers(params)
        model = jaxgen.Model(cfg, p, paths=paths)
        row = dict(device_kind=device_kind, model=cfg.name, variant=name, paths=dataclasses.asdict(paths),
                   weights=weights, batch=args.paths_batch, new_tokens=args.paths_new, long_prompt=long_len,
                   short_prompt=args.prompt)
        try:
            for case, prompts in cases.items():
                for kind, kw in knobs.items():
                    if kind == "sampled" and case == "ragged":
                        continue
                    run = lambda: jaxgen.generate(model, prompts, max_new_tokens=args.paths_new, stop_ids=[], **kw)
                    t = time.perf_counter()
                    run()
                    row[f"first_call_s_{case}_{kind}"] = time.perf_counter() - t
                    dt = min(common.timed(run, args.repeats))
                    row[f"decode_tok_s_{case}_{kind}"] = len(prompts) * args.paths_new / dt
        except Exception as e:  # a path that does not compile here is a finding, not the end of the run
            row["error"] = _error(e)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del model, p
        gc.collect()
    return rows


def results_stem(device_kind: str) -> str:
    """A device kind as the start of a results file name ("NVIDIA H200" -> "nvidia-h200")."""
    return re.sub(r"[^A-Za-z0-9]+", "-", device_kind).strip("-").lower()


def smoke_config():
    import jaxgen

    return jaxgen.load_config("gemma3-270m").replace(
        name="tiny-gemma3", vocab_size=512, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128,
        layer_pattern="LG", sliding_window=16, max_seq_len=256, query_pre_attn_scalar=32.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64, 256])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--prefill", type=int, nargs="*", default=[2048, 8192])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bandwidth-bytes", type=int, default=2 * 2**30)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new model after this many seconds")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--paths-model", default="llama3.2-1b", help="the model of the `paths` rows")
    ap.add_argument("--paths-s", type=float, default=120.0, help="seconds of the budget kept for the paths rows")
    ap.add_argument("--paths-batch", type=int, default=16)
    ap.add_argument("--paths-new", type=int, default=128)
    ap.add_argument("--paths-long", type=int, default=3000, help="the ragged batch's long prompt")
    ap.add_argument("--profile-batches", type=int, nargs="*", default=[1, 64], help="batches of the step profiles")
    ap.add_argument("--profile-s", type=float, default=60.0, help="seconds of the budget kept for the profiles")
    ap.add_argument("--moe-layers", type=int, default=8, help="layers of the MoE rows' model")
    ap.add_argument("--moe-s", type=float, default=90.0, help="seconds of the budget kept for the MoE rows")
    ap.add_argument("--smoke", action="store_true", help="a tiny preset, small settings (CPU, CI)")
    ap.add_argument("--readme", action="store_true", help="write the README table")
    ap.add_argument("--readme-from", metavar="FILE", help="only write the README table of this results file (one "
                    "a device run wrote to its $OUT)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.readme_from:
        with open(args.readme_from) as f:
            result = json.load(f)
        update_readme(table(result, os.path.relpath(os.path.abspath(args.readme_from), ROOT)), "accelerator")
        return result
    import jax

    import jaxgen

    if args.smoke:
        args.batches, args.new, args.prompt, args.prefill, args.repeats = [1, 2], 8, 8, [64], 1
        args.bandwidth_bytes = 64 * 2**20
        args.paths_batch, args.paths_new, args.paths_long, args.paths_s, args.budget_s = 2, 4, 40, 0.0, 1e9
        args.moe_s, args.moe_layers = 0.0, 2
        args.profile_batches, args.profile_s = [2], 0.0
    from jaxgen import backend

    os.makedirs(args.out, exist_ok=True)  # the results file is rewritten after every stage, the first included
    t0 = time.perf_counter()
    device = jax.devices()[0]
    device_kind = device.device_kind
    path = os.path.join(args.out, f"{results_stem(device_kind)}-{datetime.date.today()}-accelerator{'-smoke' if args.smoke else ''}.json")
    result = {"date": str(datetime.date.today()), "device_kind": device_kind, "platform": device.platform,
              "jax": jax.__version__, "smoke": args.smoke, "complete": False, "settings": {
                  "batches": args.batches, "new_tokens": args.new, "prompt": args.prompt, "prefill": args.prefill},
              "default_paths": dataclasses.asdict(backend.current()), "rows": [], "skipped": []}

    def save():
        """The results so far, rewritten after every stage: a run stopped at its time limit (a device
        run's command) still leaves what it measured, with complete: false."""
        result["wall_s"] = time.perf_counter() - t0
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    bw = bandwidth(args.bandwidth_bytes)
    paths, preflight_errors = preflight()
    result.update(bandwidth_gb_s=bw / 1e9, paths=dataclasses.asdict(paths), preflight_errors=preflight_errors)
    print(f"{device_kind}: {bw / 1e9:.0f} GB/s; paths {paths}; preflight errors {preflight_errors}", file=sys.stderr)
    save()
    configs = [smoke_config()] if args.smoke else [jaxgen.load_config(m) for m in args.models]
    for cfg in configs:
        if time.perf_counter() - t0 > args.budget_s - args.paths_s - args.moe_s - args.profile_s:
            result["skipped"].append(cfg.name)
            continue
        try:
            got = jaxgen_rows(cfg, args, bw, device_kind, paths)
        except Exception as e:  # noqa: BLE001 - one model that fails (memory, a kernel) is a row, not the end
            if args.smoke:
                raise
            got = [dict(device_kind=device_kind, model=cfg.name, error=_error(e))]
        release()  # (after the except block, which holds the traceback and so the failed call's arrays)
        hf, hf_error = None, None
        if not args.no_hf and "error" not in got[0]:
            try:
                hf = hf_figures(cfg, args)
            except Exception as e:  # noqa: BLE001 - HF's side failing leaves jaxgen's figures standing
                if args.smoke:
                    raise
                hf_error = _error(e)
            release()
        for r in got:
            r["hf_decode_tok_s"] = hf["decode"].get(r["batch"]) if hf else None
        got[0]["hf_prefill_tok_s"] = hf["prefill"] if hf else None
        if hf_error:
            got[0]["hf_error"] = hf_error
        result["rows"] += got
        print(json.dumps(got), file=sys.stderr)
        save()
    paths_cfg = smoke_config() if args.smoke else jaxgen.load_config(args.paths_model)
    try:
        result["profiles"] = profile_rows(paths_cfg, args, paths, t0 + args.budget_s - args.paths_s - args.moe_s)
    except Exception as e:  # noqa: BLE001 - as the MoE rows: a finding, not the end of the run
        if args.smoke:
            raise
        result["profiles"] = [dict(model=paths_cfg.name, error=_error(e))]
    save()
    try:
        result["moe"] = moe_rows(args, bw, device_kind, paths, t0 + args.budget_s - args.paths_s)
    except Exception as e:  # noqa: BLE001 - a failure here (memory, a kernel) is a finding, not the end of the run
        if args.smoke:
            raise
        result["moe"] = {"error": _error(e)}
    save()
    gc.collect()
    result["paths_rows"] = paths_rows(paths_cfg, args, device_kind, t0 + args.budget_s)
    result["complete"] = True
    save()
    if args.readme and not args.smoke:
        update_readme(table(result, os.path.relpath(path, ROOT)), "accelerator")
    print(f"wrote {path}", file=sys.stderr)
    return result


def table(result, path) -> str:
    lines = [f"Measured {result['date']} on {result['device_kind']} (jax {result['jax']}, measured bandwidth "
             f"{result['bandwidth_gb_s']:.0f} GB/s), `python -m benchmarks.accelerator`; results: `{path}`. Paths: "
             + ", ".join(f"{k}={v}" for k, v in (result.get("paths") or {}).items())
             + (f" (the defaults failed here: {result['preflight_errors']})" if result.get("preflight_errors") else "")
             + ".", "",
             "| model | batch | jaxgen decode tok/s | of roofline | HF decode tok/s | compile s | prefill tok/s "
             "(jaxgen / HF) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r['model']} | | error: {r['error'][:80]} | | | | |")
            continue
        pre = "; ".join(f"{L}: {v:.0f} / {(r.get('hf_prefill_tok_s') or {}).get(L, float('nan')):.0f}"
                        for L, v in (r.get("prefill_tok_s") or {}).items())
        hf = f"{r['hf_decode_tok_s']:.0f}" if r.get("hf_decode_tok_s") else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['decode_tok_s']:.0f} | {r['roofline_fraction']:.0%} | {hf} | "
                     f"{r['compile_s']:.1f} | {pre} |")
    if hf_errors := [f"{r['model']}: {r['hf_error'][:120]}" for r in result["rows"] if r.get("hf_error")]:
        lines.append(f"\nHF transformers failed on {'; '.join(hf_errors)}.")
    if result["skipped"]:
        lines.append(f"\nNot reached within the time budget: {', '.join(result['skipped'])}.")
    if not result.get("complete", True):
        lines.append("\nThe run stopped before its end (its time limit): the stages after these rows are missing.")
    lines += profile_table(result.get("profiles"))
    lines += moe_table(result.get("moe"))
    prs = [r for r in result.get("paths_rows", []) if not r.get("skipped")]
    if prs:
        r0 = prs[0]
        lines += ["", f"Implementation paths (jaxgen.backend) on {r0['model']}, batch {r0['batch']}, {r0['new_tokens']} new "
                  f"tokens; ragged: one {r0['long_prompt']}-token prompt among {r0['short_prompt']}-token ones. "
                  "Decode tok/s (first call s):", "",
                  "| variant | uniform greedy | uniform sampled | ragged greedy |", "|---|---|---|---|"]
        for r in prs:
            if r.get("error"):
                lines.append(f"| {r['variant']} | error: {r['error'][:80]} | | |")
                continue
            cell = lambda k: (f"{r[f'decode_tok_s_{k}']:.0f} ({r[f'first_call_s_{k}']:.1f})"
                              if f"decode_tok_s_{k}" in r else "-")
            lines.append(f"| {r['variant']} | {cell('uniform_greedy')} | {cell('uniform_sampled')} | {cell('ragged_greedy')} |")
    return "\n".join(lines)


def profile_table(profiles, top: int = 5) -> list[str]:
    """The step profiles as README lines: per batch, the step's wall / busy ms, launches, copies and its
    `top` ops by self time."""
    done = [p for p in profiles or [] if "wall_ms" in p]
    if not done:
        return []
    lines = ["", f"One decode step of {done[0]['model']} (`benchmarks.step_profile`: two traced calls, "
             f"{done[0]['new_tokens'][0]} and {done[0]['new_tokens'][1]} new tokens, differenced):", "",
             "| batch | wall ms | device busy | launches | copies | top ops: ms (share) source |", "|---|---|---|---|---|---|"]
    for p in done:
        ops = "<br>".join(f"{r['ms']:.3f} ({(r['share'] or 0):.0%}) {r.get('source') or r['op']}" for r in p["top"][:top])
        copies = ", ".join(f"{k} x{v:.1f}" for k, v in p["copies"].items()) or "none"
        lines.append(f"| {p['batch']} | {p['wall_ms']:.3f} | {(p['busy_fraction'] or 0):.0%} | {p['launches']:.0f} | "
                     f"{copies} | {ops} |")
    return lines


def moe_table(m) -> list[str]:
    """The MoE rows as README lines (none if the run had none)."""
    if m and m.get("error"):
        return ["", f"Mixture of experts: the run failed: {m['error'][:200]}"]
    if not m or not any("decode_tok_s" in r for r in m["rows"]):
        return []
    lines = ["", f"Mixture of experts ({m['model']}, benchmarks.moe's model: {m['layers']} layers, {m['experts']} "
             f"experts, {m['experts_per_token']} per token, bf16; steady-state decode tok/s and the fraction of the "
             "roofline of the bytes a step reads: the dense weights and the experts the batch picks):", "",
             "| computation | batch | decode tok/s | experts read / layer | active-bytes roofline fraction |",
             "|---|---|---|---|---|"]
    for r in m["rows"]:
        if "decode_tok_s" in r:
            name = f"auto ({r['computation']})" if r["impl"] == "auto" else r["impl"]
            lines.append(f"| {name} | {r['batch']} | {r['decode_tok_s']:.0f} | {r['experts_per_layer']} | "
                         f"{r['roofline_fraction']:.0%} |")
        elif r.get("error"):
            lines.append(f"| {r['impl']} | {r['batch']} | error: {r['error'][:80]} | | |")
    ref, auto1 = m.get("dense_reference"), [r for r in m["rows"] if r["impl"] == "auto" and r["batch"] == 1
                                             and "decode_tok_s" in r]
    if ref and auto1:
        lines.append(f"| dense model of the active width | 1 | {ref['decode_tok_s']:.0f} | | "
                     f"{ref['roofline_fraction']:.0%} (MoE / dense: "
                     f"{auto1[0]['roofline_fraction'] / ref['roofline_fraction']:.2f}) |")
    if m.get("prefill_tok_s"):
        lines.append(f"\nMoE prefill of one {m['prefill_tokens']}-token prompt: {m['prefill_tok_s']:.0f} tok/s.")
    return lines


if __name__ == "__main__":
    main()
