"""Mixture-of-experts decode and prefill on this machine.  python -m benchmarks.moe [--quick]

A random-init model with Qwen3-30B-A3B's layer shapes (d_model 2048, 32 query / 4 kv heads of 128,
128 experts of width 768, 8 per token) and 2 layers, a 32k vocabulary (Qwen3's 152k unembedding would
be most of the bytes a step reads, hiding the experts), in float32 and bfloat16:
- decode tokens/s at batch 1, 8, 32 (32-token prompts, greedy), steady state: B x (new - 1) /
  (t(new) - t(1)) from paired timings of the same compiled program (benchmarks/common.py's rule:
  the prefill cancels, which at batch 1 reads all 128 experts for its 32 tokens), jaxgen's default
  expert computation on this CPU (picked below 128 / 8 = 16 tokens per call, looped above: see
  jaxgen.moe) against the dense all-experts computation (Paths.moe="dense", float32 only). The
  grouped `ragged_dot` computation (the accelerators' choice) is not run: XLA:CPU computes every
  expert on every row there (3.6 tokens/s at batch 32, measured once: see jaxgen.moe);
- each row's fraction of the roofline of its *active* bytes per step: every non-expert weight (the
  unembedding included) plus the experts the batch's tokens pick (measured from the router on the
  run's own inputs: the distinct experts of the batch's tokens), at the read bandwidth measured in
  the same run (benchmarks.run's probes: the fastest of four numpy reductions over 1 GiB, two threads);
- prefill tokens/s of one 2,048-token prompt;
- the same batch-1 roofline fraction for a dense model with the same attention and an MLP of the
  active width (8 x 768), the goal being MoE batch-1 within 1.5x of it;
- `layer_probe` (alone: --layer): one layer's experts for one token, jaxgen's gathered and picked
  against the same loop over separate per-expert arrays (where batch-1's expert time goes on CPU).
Writes benchmarks/results/<machine>-<date>-moe.json and the README's bench-moe table. On a GPU / TPU
the same rows (`rows_for`, `dense_reference`) come from `python -m benchmarks.accelerator` (bf16, more
layers, and at each batch also the one of gathered / grouped that the default did not choose).
"""
import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from benchmarks import common
from benchmarks.run import bandwidth_gbs, publish


def config(quick: bool, n_layers: int = 2):
    from jaxgen.config import ModelConfig

    if quick:
        return ModelConfig(name="moe-quick", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           head_dim=16, d_ff=96, max_seq_len=4096, n_experts=16, n_experts_per_tok=4, d_ff_expert=24,
                           norm_topk_prob=True)
    return ModelConfig(name=f"qwen3-moe-{n_layers}layer", vocab_size=32000, d_model=2048, n_layers=n_layers,
                       n_heads=32, n_kv_heads=4, head_dim=128, d_ff=6144, max_seq_len=4096, qk_norm=True,
                       tie_embeddings=False, rope_theta=1e6, n_experts=128, n_experts_per_tok=8, d_ff_expert=768,
                       norm_topk_prob=True)


def fastest(fn, repeats):
    fn()
    return min(common.timed(fn, repeats))


def decode_rate(model, prompts, new: int, repeats: int) -> float:
    """Steady-state decode tokens/s: common.decode_rates' paired timings of `new` and 1 new tokens (one
    compiled program: both are in the same new-token bucket), the best of `repeats` pairs."""
    import jaxgen

    run = lambda B, n: jaxgen.generate(model, prompts, max_new_tokens=n, stop_ids=[])
    return max(common.decode_rates(run, len(prompts), new, repeats))


def active_bytes(cfg, params, prompts, new, itemsize):
    """Bytes a decode step reads: the non-expert weights, plus per layer the distinct experts of the
    step's tokens (from the first layer's router on the prompts' last tokens: random-init routing is
    alike across layers), each expert 3 x D x Fe values."""
    import jax
    import jax.numpy as jnp

    from jaxgen import moe

    lp = params.layers[0] if isinstance(params.layers, tuple) else jax.tree.map(lambda a: a[0], params.layers)
    dense = sum(x.nbytes for x in jax.tree.leaves(params)) - sum(
        x.nbytes for layer in (params.layers if isinstance(params.layers, tuple) else [params.layers])
        for x in (layer.we_gate, layer.we_up, layer.we_down))
    if not cfg.tie_embeddings:  # the input table is only gathered (B rows): not read whole
        dense -= params.embed.nbytes
    emb = params.embed  # the tokens' hidden states: a random projection stands in (only the routing is used)
    h = jnp.take(jnp.asarray(emb), jnp.asarray([p[-1] for p in prompts]), axis=0)  # rows of [V, D]
    _, e = moe.route(cfg, h.astype(jnp.float32), lp.router)
    distinct = len(set(np.asarray(e).ravel().tolist()))
    expert = 3 * cfg.d_model * cfg.d_ff_expert * itemsize
    return dense + cfg.n_layers * distinct * expert, distinct


def rows_for(cfg, dtype_name, args, bw, paths=None, plan=None, deadline=float("inf"), catch=False):
    """Decode rows per expert computation and batch, plan = [(Paths.moe value, batches), ...] (default:
    "auto" at args.batches, plus "dense" in float32), and the prefill tokens/s of one
    `args.prefill`-token prompt, for random params in `dtype_name` under `paths` (None: this backend's;
    layers unstacked where paths.unroll). Rows not started by `deadline` (perf_counter) are skipped;
    catch: a row that raises records its error instead of ending the run (a device's first run)."""
    import jax
    import jax.numpy as jnp

    import jaxgen
    from jaxgen import backend, moe
    from jaxgen.model import unstack_layers

    paths = paths or backend.current()
    dtype = jnp.dtype(dtype_name)
    params = jax.jit(lambda k: jaxgen.init_params(cfg, k, dtype))(jax.random.key(0))
    if paths.unroll:  # the layout jaxgen.load gives for these paths
        params = unstack_layers(params)
    itemsize = dtype.itemsize
    rng = np.random.default_rng(0)
    out = []
    if plan is None:  # the dense reference in one dtype
        plan = [(impl, args.batches) for impl in (("auto", "dense") if dtype_name == "float32" else ("auto",))]
    for impl, batches in plan:
        model = jaxgen.Model(cfg, params, paths=paths.replace(moe=impl))
        for B in batches:
            if time.perf_counter() > deadline:
                out.append(dict(dtype=dtype_name, impl=impl, batch=B, skipped=True))
                continue
            prompts = np.random.default_rng(B).integers(1, cfg.vocab_size, (B, args.prompt)).tolist()  # both impls
            try:
                t = time.perf_counter()
                jaxgen.precompile(model, B, args.prompt, args.new)
                compile_s = time.perf_counter() - t
                tok_s = decode_rate(model, prompts, args.new, args.repeats if impl == "auto" else 1)
            except Exception as e:  # noqa: BLE001 - on a device a computation that fails is a row (catch=True)
                if not catch:
                    raise
                out.append(dict(dtype=dtype_name, impl=impl, batch=B, error=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            step, distinct = active_bytes(cfg, params, prompts, args.new, itemsize)
            out.append(dict(dtype=dtype_name, impl=impl, batch=B, decode_tok_s=tok_s, compile_s=compile_s,
                            computation=moe.choose(cfg, B) if impl == "auto" else impl,
                            experts_per_layer=distinct, active_bytes=step,
                            roofline_fraction=tok_s / (B * bw / step)))
            print(out[-1], file=sys.stderr, flush=True)
    if time.perf_counter() > deadline:
        return out, None
    model = jaxgen.Model(cfg, params, paths=paths)
    ids = [rng.integers(1, cfg.vocab_size, args.prefill).tolist()]
    jaxgen.precompile(model, 1, args.prefill, 1)
    prefill = args.prefill / fastest(lambda: jaxgen.generate(model, ids, max_new_tokens=1, stop_ids=[]), args.repeats)
    return out, prefill


def dense_reference(cfg, args, bw, dtype_name="float32", paths=None):
    """Batch-1 roofline fraction of a dense model with the same attention and the active MLP width."""
    import jax
    import jax.numpy as jnp

    import jaxgen
    from jaxgen import backend
    from jaxgen.model import unstack_layers

    paths = paths or backend.current()
    dcfg = dataclasses.replace(cfg, name=cfg.name + "-dense-active", d_ff=cfg.n_experts_per_tok * cfg.d_ff_expert,
                               n_experts=0, n_experts_per_tok=0, d_ff_expert=0, norm_topk_prob=False)
    params = jax.jit(lambda k: jaxgen.init_params(dcfg, k, jnp.dtype(dtype_name)))(jax.random.key(0))
    if paths.unroll:
        params = unstack_layers(params)
    model = jaxgen.Model(dcfg, params, paths=paths)
    prompts = [np.random.default_rng(0).integers(1, cfg.vocab_size, args.prompt).tolist()]
    jaxgen.precompile(model, 1, args.prompt, args.new)
    tok_s = decode_rate(model, prompts, args.new, args.repeats)
    step = sum(x.nbytes for x in jax.tree.leaves(params)) - (0 if dcfg.tie_embeddings else params.embed.nbytes)
    return dict(dtype=dtype_name, batch=1, decode_tok_s=tok_s, active_bytes=step, roofline_fraction=tok_s / (bw / step))


def table(res):
    rows = ["| dtype | batch | jaxgen decode tok/s | first call (compile) s | experts read / layer | "
            "active-bytes roofline fraction | all experts (dense) tok/s | jaxgen / dense |",
            "|---|---|---|---|---|---|---|---|"]
    by = {(r["dtype"], r["impl"], r["batch"]): r for r in res["rows"]}
    for (dt, impl, B), r in sorted(by.items()):
        if impl != "auto":
            continue
        d = by.get((dt, "dense", B))
        dense = ("| |" if d is None else
                 f"{d['decode_tok_s']:.1f} | {r['decode_tok_s'] / d['decode_tok_s']:.2f}x |")
        rows.append(f"| {dt} | {B} | {r['decode_tok_s']:.1f} | {r['compile_s']:.1f} | "
                    f"{r['experts_per_layer']} of {res['experts']} | "
                    f"{r['roofline_fraction']:.2f} | {dense}")
    ref = res["dense_reference"]
    moe1 = by[("float32", "auto", 1)]["roofline_fraction"]
    rows.append(f"| float32 | 1 | dense model of the active width: {ref['decode_tok_s']:.1f} | | | "
                f"{ref['roofline_fraction']:.2f} (MoE / dense: {moe1 / ref['roofline_fraction']:.2f}) | | |")
    rows.append(f"| prefill 2,048 tokens | | float32 {res['prefill_tok_s']['float32']:.0f} tok/s, bfloat16 "
                f"{res['prefill_tok_s']['bfloat16']:.0f} tok/s | | | | | |")
    rows.append(f"\nRead bandwidth in the same run: {res['bandwidth_gb_s']:.1f} GB/s (benchmarks.run's probes).")
    lp = res.get("layer_probe")
    if lp:
        rows.append("\nOne layer's experts for one token (batch-1 decode's expert work, float32 unless named): "
                    + "; ".join(f"{name} {r['ms']:.1f} ms ({r['gb_s']:.0f} GB/s, compiled in {r['compile_s']:.1f} s)"
                                for name, r in lp.items())
                    + ". Separate arrays is not a jaxgen path: the bound if each expert were its own array.")
    return "\n".join(rows)


def layer_probe(cfg, repeats: int = 20) -> dict:
    """Where batch-1 decode's expert time goes on this CPU: one layer's experts for one token (its k
    (token, expert) pairs, float32), milliseconds (fastest of `repeats`) and GB/s of expert bytes, for
    jaxgen's `gathered` and `picked`, and for a bound jaxgen does not use: the same pair loop with
    every expert a separate array, picked by `lax.switch` (each expert read in place, not copied out
    of the stacked [E, ...] array first; compile time is E branches per layer, reported too); and
    picked on bfloat16 experts (GB/s of bf16 bytes), compiled as jaxgen compiles its programs
    (backend.jit) and in a user's own jax.jit (XLA:CPU's bfloat16 normalization on: moe._expert's
    switch over the experts)."""
    import jax
    import jax.numpy as jnp

    from jaxgen import backend, moe

    E, D, F, k = cfg.n_experts, cfg.d_model, cfg.d_ff_expert, cfg.n_experts_per_tok
    ks = jax.random.split(jax.random.key(0), 5)
    wg, wu = (jax.random.normal(kk, (E, D, F), jnp.float32) * 0.02 for kk in ks[:2])
    wd = jax.random.normal(ks[2], (E, F, D), jnp.float32) * 0.02
    h = jax.random.normal(ks[3], (1, D), jnp.float32)
    w, e = moe.route(cfg, h, jax.random.normal(ks[4], (D, E), jnp.float32) * 0.02)  # (unscaled: one expert takes all)

    def switched(h, w, e, wg, wu, wd):  # wg / wu / wd: tuples of E arrays
        branches = [lambda x, i=i: (jax.nn.silu(x @ wg[i]) * (x @ wu[i])) @ wd[i] for i in range(E)]
        pair = lambda p, y: y + w[0, p] * jax.lax.switch(e[0, p], branches, h)
        return jax.lax.fori_loop(0, k, pair, jnp.zeros((1, D), jnp.float32))

    split = lambda a: tuple(a[i] for i in range(E))
    bf16 = lambda *a: tuple(x.astype(jnp.bfloat16) for x in a)
    cases = {"gathered": (lambda *a: moe.gathered(cfg, *a), (wg, wu, wd), h, backend.jit),
             "picked": (lambda *a: moe.picked(cfg, *a), (wg, wu, wd), h, backend.jit),
             "separate arrays (switch)": (switched, (split(wg), split(wu), split(wd)), h, jax.jit),
             "picked, bfloat16 experts": (lambda *a: moe.picked(cfg, *a), bf16(wg, wu, wd), *bf16(h), backend.jit),
             "picked, bfloat16 experts, a user's jax.jit": (lambda *a: moe.picked(cfg, *a), bf16(wg, wu, wd), *bf16(h),
                                                            jax.jit)}
    out, ref = {}, None
    for name, (fn, weights, x, jit) in cases.items():
        t = time.perf_counter()
        f = jit(fn)
        y = jax.block_until_ready(f(x, w, e, *weights))
        compile_s = time.perf_counter() - t
        ref = y if ref is None else ref
        ms = 1e3 * min(common.timed(lambda: jax.block_until_ready(f(x, w, e, *weights)), repeats))
        itemsize = jax.tree.leaves(weights)[0].dtype.itemsize
        out[name] = dict(ms=ms, gb_s=k * 3 * D * F * itemsize / ms / 1e6, compile_s=compile_s,
                         max_abs_diff=float(jnp.max(jnp.abs(y - ref))))
        print(name, out[name], file=sys.stderr, flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny config, batches 1 and 8, 8 new tokens")
    ap.add_argument("--layer", action="store_true", help="only `layer_probe` (one layer, one token), printed")
    a = ap.parse_args(argv)
    import jax

    if a.layer:
        print(json.dumps(layer_probe(config(a.quick)), indent=1))
        return 0
    a.batches = [1, 8] if a.quick else [1, 8, 32]
    a.prompt, a.new, a.repeats, a.prefill = (16, 8, 1, 256) if a.quick else (32, 16, 2, 2048)
    cfg = config(a.quick)
    probes = bandwidth_gbs(1 / 16 if a.quick else 1.0)
    bw = probes["best"] * 1e9
    res = {"config": dataclasses.asdict(cfg), "experts": cfg.n_experts, "bandwidth_gb_s": bw / 1e9,
           "bandwidth_probes_gb_s": probes,
           "jax": jax.__version__, "rows": [], "prefill_tok_s": {}}
    for dt in ("float32", "bfloat16"):
        rows, prefill = rows_for(cfg, dt, a, bw)
        res["rows"] += rows
        res["prefill_tok_s"][dt] = prefill
    res["dense_reference"] = dense_reference(cfg, a, bw)
    res["layer_probe"] = layer_probe(cfg, 3 if a.quick else 20)
    text = table(res)
    print(text)
    if not a.quick:
        publish("moe", res, text, "python -m benchmarks.moe")
    return 0


if __name__ == "__main__":
    sys.exit(main())
