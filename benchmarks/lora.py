"""LoRA at sampling time and weight sync, on Gemma 3 270M float32.  python -m benchmarks.lora [--quick]

1. A GRPO-shaped step (benchmarks/rollout.py's prompts: 8 of ~256 tokens x n=8 samples, temperature
   0.9, top-k 50, 128 new tokens; no stop, so every variant decodes the same 128 steps for all 64 rows:
   an adapter changes what the model writes, and with a stop string the rows would end at other
   steps) with a rank-16 adapter on every projection (q/k/v/o/gate/up/down), new adapter values every
   step, as RL training makes them:
   - plain: the base model, no adapter (the floor);
   - unmerged: `generate(..., lora=adapter)`, the adapter applied in the compiled loop;
   - merged every step: `merge_lora(params, adapter)` then the plain program (merge time included).
   Each step's rollout time is the compiled prefill + decode loop (`stream(timings=)`), compilation
   timed apart; step 2's compile shows that new adapter values reuse step 1's program.
2. Eight adapters: 8 prompts, each with its own rank-16 adapter, n=8 samples each: one mixed batch of
   64 rows (the adapters gathered per row) against 8 separate batches of 8 rows, with the same seeds:
   the rows whose tokens are identical and the largest log-prob difference before a row's first
   different token (a batch of 64 and one of 8 sum in other orders: float rounding, which a sampled
   token can amplify; tests/test_lora.py checks mixed == alone exactly on the tiny models).
3. Weight sync (`jaxgen.reshard`), in a process with 8 host devices: the params from an FSDP layout
   (every leaf split over 8 devices on its first axis, stacked layers, as a trainer holds them) into a
   data=2, model=4 sampling mesh with per-layer layout; float32 -> float32 and bfloat16 -> float32.
   Median of 5 after a warm-up.

Writes benchmarks/results/<machine>-<date>-lora.json and the README's bench-lora table.
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def rollout_step(model, prompts, spec, lora=None):
    """One GRPO rollout: (timings, completions), compilation timed apart by `stream`."""
    from jaxgen.generate import stream, to_completions

    timings = {}
    kw = dict(max_new_tokens=spec["max_new"], temperature=0.9, top_k=50, seed=0, stop_ids=[])
    *_, last = stream(model, prompts, n=spec["G"], chunk_steps=1 << 30, timings=timings, lora=lora, **kw)
    out = to_completions(model, prompts, last, len(prompts) * spec["G"], spec["G"])
    return timings, out


def run_rollouts(spec):
    import dataclasses

    import jax

    import numpy as np

    import jaxgen
    from jaxgen import lora as L

    from rollout import grpo_prompts

    model = jaxgen.load(spec["model"], "float32")
    prompts = grpo_prompts(model.tokenizer)[:spec["P"]]
    adapter = lambda step, k=0: L.random_adapter(model.cfg, jax.random.key(1000 * k + step), rank=spec["rank"],
                                                 scale=0.5, name=f"a{k}")
    res = {"plain": [], "unmerged": [], "merged": []}
    for step in range(spec["steps"]):
        t, out = rollout_step(model, prompts, spec)
        res["plain"].append(dict(t, new_tokens=sum(len(c.tokens) for c in out)))
        t, out = rollout_step(model, prompts, spec, lora=adapter(step))
        res["unmerged"].append(dict(t, new_tokens=sum(len(c.tokens) for c in out)))
        t0 = time.perf_counter()
        merged = dataclasses.replace(model, params=jax.block_until_ready(L.merge_lora(model.params, adapter(step))))
        merge_s = time.perf_counter() - t0
        t, out = rollout_step(merged, prompts, spec)
        res["merged"].append(dict(t, merge_s=merge_s, new_tokens=sum(len(c.tokens) for c in out)))
        print(json.dumps({k: v[-1] for k, v in res.items()}), file=sys.stderr, flush=True)
    # eight adapters: one mixed batch against a batch per adapter
    ads = [adapter(0, k + 1) for k in range(spec["P"])]
    seeds = list(range(len(prompts)))
    mixed, separate = {}, {"prefill_s": 0.0, "decode_s": 0.0, "compile_s": 0.0}
    from jaxgen.generate import stream, to_completions

    kw = dict(max_new_tokens=spec["max_new"], temperature=0.9, top_k=50, stop_ids=[], n=spec["G"],
              chunk_steps=1 << 30)
    *_, last = stream(model, prompts, seed=seeds, lora=ads, timings=mixed, **kw)
    mixed_out = to_completions(model, prompts, last, len(prompts) * spec["G"], spec["G"])
    sep_out = []
    for i, (p, a) in enumerate(zip(prompts, ads)):
        t = {}
        *_, last = stream(model, [p], seed=[seeds[i]], lora=a, timings=t, **kw)
        sep_out += to_completions(model, [p], last, spec["G"], spec["G"])
        for k in separate:
            separate[k] += t[k]
    res["mixed8"] = dict(mixed, adapters=len(ads), rows=len(mixed_out))
    res["separate8"] = dict(separate, adapters=len(ads), rows=len(sep_out))
    first = [next((j for j, (x, y) in enumerate(zip(m.tokens, s.tokens)) if x != y), len(m.tokens))
             for m, s in zip(mixed_out, sep_out)]
    res["mixed_vs_separate"] = {
        "rows_identical": sum(m.tokens == s.tokens for m, s in zip(mixed_out, sep_out)), "rows": len(mixed_out),
        "first_difference": first,
        "max_logprob_diff_before": max(float(np.max(np.abs(np.subtract(m.logprobs[:k], s.logprobs[:k])), initial=0.0))
                                       for m, s, k in zip(mixed_out, sep_out, first))}
    res["versions"] = {"jax": jax.__version__, "jaxgen": jaxgen.__version__}
    return res


def run_reshard(spec):
    import dataclasses

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jaxgen
    from jaxgen.model import Model, stack_layers, unstack_layers
    from jaxgen.sharding import make_mesh, shard_params

    model = jaxgen.load(spec["model"], "float32")
    stacked = stack_layers(model.params)
    target_mesh = make_mesh("data=2,model=4")
    target = Model(model.cfg, unstack_layers(shard_params(stacked, model.cfg, target_mesh)), mesh=target_mesh)
    fsdp = make_mesh("data=8")
    nbytes = sum(x.nbytes for x in jax.tree.leaves(stacked))
    res = {"param_bytes": nbytes, "devices": jax.device_count()}
    for name, dtype in (("f32_to_f32", jnp.float32), ("bf16_to_f32", jnp.bfloat16)):
        train = jax.tree.map(lambda a: jax.device_put(a.astype(dtype), NamedSharding(
            fsdp, P("data") if a.shape[0] % 8 == 0 else P())), stacked)
        jax.block_until_ready(jaxgen.reshard(train, target))  # warm-up (the casts compile)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            jax.block_until_ready(jaxgen.reshard(train, target))
            ts.append(time.perf_counter() - t)
        res[name] = {"median_s": statistics.median(ts), "all_s": ts}
    synced = jaxgen.reshard(train, target)
    res["shardings_match"] = all(x.sharding == y.sharding for x, y in zip(jax.tree.leaves(synced),
                                                                             jax.tree.leaves(target.params)))
    del dataclasses
    return res


SYSTEMS = {"rollouts": run_rollouts, "reshard": run_reshard}


def table(res, spec):
    rows = ["| workload | variant | rollout s (prefill + decode) | vs plain | merge s | compile s (step 1 / 2) | new tokens |",
            "|---|---|---|---|---|---|---|"]
    plain = res.get("plain")
    if plain:
        base = statistics.median(r["prefill_s"] + r["decode_s"] for r in plain)
        for key, label in (("plain", "base model, no adapter"), ("unmerged", f"unmerged rank-{spec['rank']} (lora=)"),
                           ("merged", "merge_lora every step, then the base program")):
            rs = res[key]
            wall = statistics.median(r["prefill_s"] + r["decode_s"] for r in rs)
            merge = statistics.median(r["merge_s"] for r in rs) if key == "merged" else None
            total = wall + (merge or 0.0)
            comp = " / ".join(f"{r['compile_s']:.1f}" for r in rs)
            rows.append(f"| GRPO {spec['P']}x{spec['G']} | {label} | {wall:.1f} | {total / base:.2f}x | "
                        f"{'' if merge is None else f'{merge:.2f}'} | {comp} | "
                        f"{' / '.join(str(r['new_tokens']) for r in rs)} |")
    m, s = res.get("mixed8"), res.get("separate8")
    if m and s:
        mw, sw = m["prefill_s"] + m["decode_s"], s["prefill_s"] + s["decode_s"]
        c = res["mixed_vs_separate"]
        same = (f"{c['rows_identical']}/{c['rows']} rows identical; log-probs within "
                f"{c['max_logprob_diff_before']:.1e} up to a row's first different token")
        k, g = m["adapters"], spec["G"]
        rows.append(f"| {k} adapters x {g} samples | one mixed batch of {k * g} rows | {mw:.1f} | | | "
                    f"{m['compile_s']:.1f} | {same} |")
        rows.append(f"| {k} adapters x {g} samples | {k} batches of {g} rows | {sw:.1f} | {sw / mw:.2f}x the mixed "
                    f"batch | | {s['compile_s']:.1f} | |")
    r = res.get("reshard")
    if r:
        gb = r["param_bytes"] / 1e9
        for key, label in (("f32_to_f32", "f32 FSDP x8 -> f32 data=2,model=4"), ("bf16_to_f32", "bf16 FSDP x8 -> f32 data=2,model=4")):
            t = r[key]["median_s"]
            rows.append(f"| reshard {gb:.2f} GB of params | {label} | {t:.3f} | {gb / t:.1f} GB/s | | | |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 prompts x n=2, 16 new tokens, 1 step")
    ap.add_argument("--timeout", type=int, default=2400, help="seconds per worker")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(SYSTEMS[a.worker](json.loads(a.spec))), flush=True)
        return 0
    from run import publish, run_worker

    spec = {"model": "gemma3-270m", "P": 2 if a.quick else 8, "G": 2 if a.quick else 8,
            "max_new": 16 if a.quick else 128, "rank": 16, "steps": 1 if a.quick else 2}
    res = {}
    for w in ("rollouts", "reshard"):
        env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
        if w == "reshard":  # 8 host devices for the two meshes (only in this process: they split the CPU)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
        try:
            out = run_worker(pathlib.Path(__file__).resolve(), w, spec, env=env, timeout=a.timeout)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            continue
        res.update(out if w == "rollouts" else {"reshard": out})
        print(w, "done", file=sys.stderr, flush=True)
    text = table(res, spec)
    print(text)
    if not a.quick:
        publish("lora", {"spec": spec, "results": res}, text, "python -m benchmarks.lora")
    return 0


if __name__ == "__main__":
    sys.exit(main())
