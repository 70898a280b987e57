"""Loading checkpoints: time and peak memory of Gemma 3 270M from its HF directory, its GGUF file and
jaxgen's Orbax cache, and of a generated 1B-parameter bf16 HF checkpoint on one device and on an 8-device mesh.
    python -m benchmarks.load [--no-readme]

Every load runs in a fresh process (`jaxgen.load(...)` then block_until_ready) that reports its wall
time and its peak resident memory (VmHWM, which exec resets, unlike ru_maxrss); the same process's peak after `import jaxgen` and one
tiny jitted op is subtracted (the runtime's own memory). On CPU the "devices" are host memory, so the
mesh row also reports the bytes its device buffers hold: peak minus runtime minus those buffers is
what the load held on the host beyond them (the safetensors slices in flight).
Setup (not timed): the HF directory is written with jaxgen.checkpoint.hf_save.save from the GGUF load (the
test suite checks that directory against HF's tokens), the 1B checkpoint from random bf16 params of
a Llama-shaped config (18 layers of d_model 2048, untied: 981M params, 2.0 GB).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks.run import ROOT, publish

CHILD = r"""
import json, re, sys, threading, time
import jax, jax.numpy as jnp
import jaxgen
status = lambda key: int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024  # MB
jax.block_until_ready(jnp.ones(4) + 1)
base, base_anon = status("VmHWM"), status("RssAnon")
anon_peak, done = [base_anon], []
def sample():  # the kernel keeps no high-water mark of anonymous memory alone: sample it every 2 ms
    while not done:
        anon_peak[0] = max(anon_peak[0], status("RssAnon"))
        time.sleep(0.002)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
mesh = None
if sys.argv[3] != "none":
    from jaxgen.sharding import make_mesh
    mesh = make_mesh(sys.argv[3])
t = time.perf_counter()
m = jaxgen.load(sys.argv[1], sys.argv[2], mesh=mesh)
jax.block_until_ready(m.params)
dt = time.perf_counter() - t
done.append(1)
sampler.join()
peak = status("VmHWM")
held = sum(s.data.nbytes for a in jax.tree.leaves(m.params) for s in a.addressable_shards) / 2**20
model = sum(a.nbytes for a in jax.tree.leaves(m.params)) / 2**20
print(json.dumps({"load_s": dt, "peak_mb": peak, "runtime_mb": base, "device_mb": held, "model_mb": model,
                  "anon_peak_mb": anon_peak[0], "runtime_anon_mb": base_anon}))
"""

BIG = dict(name="llama-1b", vocab_size=32000, d_model=2048, n_layers=18, n_heads=16, n_kv_heads=8, head_dim=128,
           d_ff=5632, max_seq_len=4096, tie_embeddings=False)  # 981M params: 2.0 GB in bf16


def child(model: str, dtype: str, mesh: str, cache: str, devices: int = 1) -> dict:
    env = dict(os.environ, JAXGEN_CACHE=cache,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}" if devices > 1 else "")
    p = subprocess.run([sys.executable, "-c", CHILD, model, dtype, mesh], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def best(runs: list[dict]) -> dict:
    """The fastest of the runs (its memory figures are every run's, within a few MB)."""
    return min(runs, key=lambda r: r["load_s"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    import jaxgen
    from jaxgen.checkpoint import hf_save

    res = {}
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as work:
        os.environ["JAXGEN_CACHE"] = cache
        gemma = jaxgen.load("gemma3-270m", "float32")  # also writes the Orbax cache the cached rows restore
        hf_save.save(gemma, f"{work}/gemma3-270m")
        del gemma
        rows = {"gemma3-270m HF directory (safetensors, float32)": (f"{work}/gemma3-270m", "float32"),
                "gemma3-270m Orbax cache (jaxgen's conversion)": ("gemma3-270m", "float32")}
        for label, (model, dtype) in rows.items():
            res[label] = best([child(model, dtype, "none", cache) for _ in range(a.repeats)])
        with tempfile.TemporaryDirectory() as empty:  # GGUF: a fresh cache every time (parse + convert)
            label = "gemma3-270m GGUF (parse, dequantize; first load)"
            res[label] = best([child("gemma3-270m", "float32", "none", tempfile.mkdtemp(dir=empty))
                               for _ in range(a.repeats)])
        cfg = jaxgen.ModelConfig(**BIG)
        params = jaxgen.init_params(cfg, jax.random.key(0), jnp.bfloat16)
        hf_save.save(jaxgen.Model(cfg, params), f"{work}/llama-1b", max_shard_bytes=400 * 2**20)
        del params
        res["1B bf16 HF directory (2.0 GB), one device"] = best(
            [child(f"{work}/llama-1b", "auto", "none", cache) for _ in range(a.repeats)])
        res["1B bf16 HF directory, 8-device mesh (data=2, model=4)"] = best(
            [child(f"{work}/llama-1b", "auto", "data=2,model=4", cache, devices=8) for _ in range(a.repeats)])
    print(json.dumps(res, indent=1), file=sys.stderr)
    lines = ["| load | wall | params | device buffers | peak RSS | peak anonymous | held beyond the buffers |",
             "|---|---|---|---|---|---|---|"]
    for label, r in res.items():
        anon = r["anon_peak_mb"] - r["runtime_anon_mb"]
        lines.append(f"| {label} | {r['load_s']:.2f} s | {r['model_mb']:.0f} MB | {r['device_mb']:.0f} MB | "
                     f"{r['peak_mb'] - r['runtime_mb']:.0f} MB | {anon:.0f} MB | {anon - r['device_mb']:.0f} MB |")
    text = "\n".join(lines) + (
        "\n\nBest of %d runs, each in a fresh process; memory above what the process held after `import jaxgen`. "
        "Peak RSS counts the memory-mapped checkpoint pages read (page cache, reclaimable); peak anonymous "
        "memory (sampled every 2 ms) is what the process allocated: the device buffers (on this CPU the mesh's "
        "8 devices are host memory, every param replicated over data=2) plus what the load held beyond "
        "them, the last column: the tensors in flight." % a.repeats)
    if a.no_readme:
        print(text)
        return
    path = publish("load", {"repeats": a.repeats, "results": res}, text, "python -m benchmarks.load")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
