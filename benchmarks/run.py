"""Side-by-side benchmark: jaxgen and its peers on the same GGUF file, prompts and settings, in one run,
alternating the systems round by round.  python -m benchmarks.run [--quick] [--systems ...]

Each system runs as a subprocess in its own virtualenv (benchmarks/setup_peers.sh makes them under
.benchmarks/); jaxgen runs in this interpreter's environment. Before each round the machine's memory
read bandwidth is measured (the fastest of a few numpy read probes, see PROBES), so every figure comes
with its roofline:
decode at batch 1 reads every weight once per token, so tokens/s <= bandwidth / weight bytes.
Writes benchmarks/results/<machine>-<date>.json, a PNG plot beside it and the README table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEERS = {"jaxgen": "peer_jaxgen.py", "hf": "peer_hf.py", "gemma": "peer_gemma.py", "llamacpp": "peer_llamacpp.py"}
PROMPT = "The capital of France is"
LONG = ("The history of the city begins with a small settlement on an island in the river, where fishermen "
        "and traders met to exchange goods. Over the centuries the settlement grew into a town, then a city, "
        "with walls, bridges, markets, churches and palaces. ")
FLOAT_DTYPES = ("float32", "bfloat16")


# Read-bandwidth probes over one buffer (each a reduction numpy runs at memory speed, GIL released). The
# machine's read bandwidth is the fastest of them: a float32 sum alone is compute-bound on some CPUs
# (it read 29-35 GB/s on this project's machine, where an int32 OR-reduce read 44-48 GB/s), which made
# every "% of roofline" ~1.5x too high before 2026-12-04.
PROBES = {"sum float32": lambda a: a.view(np.float32).sum(), "or-reduce int32": lambda a: np.bitwise_or.reduce(a.view(np.int32)),
          "max uint8": lambda a: a.view(np.uint8).max(), "or-reduce int64": lambda a: np.bitwise_or.reduce(a.view(np.int64))}


def bandwidth_gbs(gib: float = 1.0, threads: int = 2, reps: int = 5) -> dict:
    """{probe: best GB/s over `reps` runs of `threads` threads each reducing its share of `gib` GiB},
    and "best": the fastest probe's figure, the machine's read bandwidth."""
    a = np.ones(int(gib * (1 << 30)) // 8, np.int64).view(np.uint8)
    parts = np.array_split(a, threads)
    out = {}
    for name, probe in PROBES.items():
        runs = []
        for _ in range(reps + 1):
            ts = [threading.Thread(target=probe, args=(p,)) for p in parts]
            t = time.perf_counter()
            [x.start() for x in ts], [x.join() for x in ts]
            runs.append(a.nbytes / (time.perf_counter() - t) / 1e9)
        out[name] = max(runs[1:])  # the first pass faults pages in; the best run is the least disturbed
    out["best"] = max(out.values())
    return out


def python_for(system: str) -> str | None:
    if system == "jaxgen":
        return sys.executable
    py = ROOT / ".benchmarks" / system / "bin" / "python"
    return str(py) if (py.parent.parent / ".ok").exists() else None


def run_worker(script, name: str, spec: dict, python: str | None = None, env: dict | None = None,
               timeout: int = 1800) -> dict:
    """The harnesses' worker protocol: `python SCRIPT --worker NAME --spec JSON`, run in the repository
    with `env`, prints its result as the last line of JSON. That result, or a RuntimeError carrying the
    worker's stderr tail (benchmarks.evals, benchmarks.lora)."""
    p = subprocess.run([python or sys.executable, str(script), "--worker", name, "--spec", json.dumps(spec)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_peer(system: str, spec: dict, timeout: int) -> dict:
    py = python_for(system)
    cmd = [py, str(ROOT / "benchmarks" / PEERS[system]), json.dumps(spec)]
    # jaxgen and the gemma peer (which borrows jaxgen's GGUF reader) see the repository.
    env = dict(os.environ, PYTHONPATH=str(ROOT) if system in ("jaxgen", "gemma") else "", TF_CPP_MIN_LOG_LEVEL="3")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{system} {spec['dtype']} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    return res


def weight_bytes(dtype: str, gguf_path: str) -> dict:
    """Bytes read per decode step: every parameter once (the tied embedding as the unembedding)."""
    import jax

    from jaxgen.checkpoint import gguf
    from jaxgen.config import load_config
    from jaxgen.model import param_shapes

    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(load_config("gemma3-270m"))))
    r = gguf.open_gguf(gguf_path)
    q_bytes = sum(int(t.n_bytes) for t in r.tensors)
    return {"params": n, "float32": 4 * n, "bfloat16": 2 * n, "gguf": q_bytes}


def summarize(rows: list[dict], bw: float, wb: dict) -> dict:
    """Per system and dtype: medians over rounds x repeats, and the batch-1 roofline at read bandwidth bw."""
    out = {}
    for r in rows:
        key = f"{r['system']}/{r['dtype']}"
        s = out.setdefault(key, {"system": r["system"], "dtype": r["dtype"], "first_call_s": [], "prefill_tps": [],
                                 "peak_rss_mb": [], "decode_tps": {}})
        for f in ("first_call_s", "prefill_tps", "peak_rss_mb"):
            s[f].append(r[f])
        for b, v in r["decode_tps"].items():
            s["decode_tps"].setdefault(str(b), []).extend(v)
        for b, v in r.get("sampled_tps", {}).items():  # jaxgen: top-k + top-p decode at the largest batch
            s.setdefault("sampled_tps", {}).setdefault(str(b), []).extend(v)
    byts = {f"{r['system']}/{r['dtype']}": r.get("weight_bytes") for r in rows}
    for key, s in out.items():
        nbytes = wb["gguf"] if s["system"] == "llamacpp" else (byts.get(key) or wb[s["dtype"]])
        roof = bw * 1e9 / nbytes
        stat = lambda xs: {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
        for f in ("first_call_s", "prefill_tps", "peak_rss_mb"):
            s[f] = stat(s[f])
        s["decode_tps"] = {b: stat(v) for b, v in s["decode_tps"].items()}
        if "sampled_tps" in s:
            s["sampled_tps"] = {b: stat(v) for b, v in s["sampled_tps"].items()}
            # extra time per step of sampling over greedy, as a fraction of the greedy step
            s["sampling_cost"] = {b: s["decode_tps"][b]["median"] / v["median"] - 1 for b, v in s["sampled_tps"].items()}
        s["roofline_tps_b1"] = roof
        s["weight_bytes"] = nbytes
        if "1" in s["decode_tps"]:
            s["roofline_fraction_b1"] = s["decode_tps"]["1"]["median"] / roof
    return out


def ratios(rows: list[dict]) -> dict:
    """jaxgen / peer, computed pair by pair: per round, same dtype, the medians of that round."""
    by = {}
    for r in rows:
        by.setdefault((r["round"], r["dtype"]), {})[r["system"]] = r
    out = {}
    for (rnd, dtype), systems in by.items():
        j = systems.get("jaxgen")
        if j is None:
            continue
        peers = dict(systems)
        if (rnd, "q4_k_m") in by:  # llama.cpp runs its own format: compare every jaxgen variant with it
            peers.update(by[(rnd, "q4_k_m")])
        for name, p in peers.items():
            if name == "jaxgen":
                continue
            key = f"jaxgen/{name}/{dtype}"
            d = out.setdefault(key, {})
            for b in j["decode_tps"]:
                if b in p["decode_tps"]:
                    d.setdefault(f"decode_b{b}", []).append(
                        statistics.median(j["decode_tps"][b]) / statistics.median(p["decode_tps"][b]))
            d.setdefault("prefill", []).append(j["prefill_tps"] / p["prefill_tps"])
            d.setdefault("first_call", []).append(j["first_call_s"] / p["first_call_s"])
    return {k: {m: statistics.median(v) for m, v in d.items()} for k, d in out.items()}


def table(summary: dict, bw: float) -> str:
    batches = sorted({int(b) for s in summary.values() for b in s["decode_tps"]})
    head = ["system", "dtype"] + [f"decode tok/s B={b}" for b in batches] + [
        "% of roofline (B=1)", "prefill tok/s (512)", "first call s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sorted(summary.values(), key=lambda s: (s["dtype"], s["system"] != "jaxgen", s["system"])):
        cells = [s["system"], s["dtype"]]
        for b in batches:
            d = s["decode_tps"].get(str(b))
            cells.append(f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})" if d else "-")
        frac = s.get("roofline_fraction_b1")
        cells += [f"{100 * frac:.0f}%" if frac is not None else "-", f"{s['prefill_tps']['median']:.0f}",
                  f"{s['first_call_s']['median']:.1f}", f"{s['peak_rss_mb']['median']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nMemory read bandwidth in the same run: {bw:.1f} GB/s (the fastest of {len(PROBES)} read probes, "
                 "two numpy threads over 1 GiB, best of 5 runs, over every round). Medians with min-max over rounds x repeats.")
    for s in summary.values():
        for b, c in sorted(s.get("sampling_cost", {}).items()):
            lines.append(f"{s['system']} {s['dtype']}: sampling (temperature 0.8, top-k 50, top-p 0.9) at batch {b} "
                         f"costs {100 * c:+.1f}% of a greedy decode step ({s['sampled_tps'][b]['median']:.1f} tok/s).")
    return "\n".join(lines)


def plot(summary: dict, bw: float, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary.values():
        bs = sorted(int(b) for b in s["decode_tps"])
        ys = [s["decode_tps"][str(b)]["median"] for b in bs]
        ax.plot(bs, ys, marker="o", label=f"{s['system']} {s['dtype']}")
    styles = iter([":", "--", "-.", (0, (1, 3)), (0, (5, 5))])
    for dtype in dict.fromkeys(s["dtype"] for s in summary.values() if s["system"] != "llamacpp"):
        roof = next(s["roofline_tps_b1"] for s in summary.values() if s["dtype"] == dtype and s["system"] != "llamacpp")
        ax.axhline(roof, color="gray", linestyle=next(styles, ":"), linewidth=1, label=f"B=1 roofline {dtype} ({roof:.0f})")
    ax.set_xscale("log", base=2), ax.set_yscale("log")
    ax.set_xlabel("batch size"), ax.set_ylabel("decode tokens/s (all rows)")
    ax.set_title(f"Gemma 3 270M decode on {cpu()} x{os.cpu_count()} ({bw:.0f} GB/s)", fontsize=9)
    ax.legend(fontsize=7), ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout(), fig.savefig(path, dpi=120)


def update_readme(text: str, name: str = "bench"):
    """Replace what stands between <!-- NAME:start --> and <!-- NAME:end --> in README.md."""
    readme = ROOT / "README.md"
    s = readme.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in s or end not in s:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    a, b = s.index(start) + len(start), s.index(end)
    readme.write_text(s[:a] + "\n" + text + "\n" + s[b:])


def machine() -> str:
    """The results files' machine name: architecture and core count ("x86_64-2cpu")."""
    return f"{platform.machine()}-{os.cpu_count()}cpu"


def cpu(cpuinfo: str | None = None) -> str:
    """The CPU behind that name, which is not one host: the hosts lent as "x86_64-2cpu" have been an
    Intel Xeon with AMX and an AMD EPYC without it, and which dot layout XLA:CPU reads fastest (and whether
    HF's oneDNN has AMX) differs between them (2026-12-07: the float32 unembedding at batch 1 read [D, V]
    in 19.8 ms and [V, D] in 23.2 on the EPYC, the reverse of the Xeon's ranking). Model name plus the
    matrix extensions present, e.g. "AMD EPYC with AVX-512, AVX-512 BF16"."""
    name, flags = platform.processor() or platform.machine(), set()
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: the processor string alone
            cpuinfo = ""
    for line in cpuinfo.splitlines():  # the first processor's block names them all
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    units = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"),
                                       ("amx_tile", "AMX")) if flag in flags]
    return name + (f" with {', '.join(units)}" if units else "")


def where() -> str:
    """The README's "on this machine (...)" for a measurement."""
    return f"this machine ({platform.machine()}, {os.cpu_count()} CPUs: {cpu()})"


def publish(tag: str, results: dict, text: str, command: str) -> pathlib.Path:
    """Write results/<machine>-<date>-<tag>.json (with the CPU) and put `text` between the README's
    bench-<tag> markers, with the date, the machine and the command that measured it."""
    day = datetime.date.today().isoformat()
    path = ROOT / "benchmarks" / "results" / f"{machine()}-{day}-{tag}.json"
    path.write_text(json.dumps({"cpu": cpu(), **results}, indent=1))
    update_readme(f"Measured {day} on {where()}, `{command}`; results: `{path.relative_to(ROOT)}`.\n\n{text}",
                  f"bench-{tag}")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="jaxgen alone, small settings (CI keeps the harness working)")
    ap.add_argument("--systems", default="jaxgen,hf,gemma")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="float32, bfloat16, and for jaxgen also int8, int4, int8kv (float32 + int8 KV cache); "
                         "hf and gemma run the float ones, llamacpp its GGUF as is (once per round)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--inner", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result files and README markers (bench-TAG), so "
                                              "a run of other variants does not replace the main table")
    a = ap.parse_args(argv)
    if a.quick:
        a.systems, a.dtypes, a.batches, a.new_tokens, a.rounds, a.inner = "jaxgen", "float32", "1,2", 9, 1, 1
    systems, dtypes = a.systems.split(","), a.dtypes.split(",")
    for s in systems:
        if s not in PEERS:
            raise SystemExit(f"unknown system {s!r}; known: {sorted(PEERS)}")
        if python_for(s) is None:
            raise SystemExit(f"{s}: no environment; run `bash benchmarks/setup_peers.sh {s}` first")

    import jaxgen
    from jaxgen.checkpoint import gguf_path

    path = str(gguf_path("gemma3-270m"))
    tok = jaxgen.load("gemma3-270m").tokenizer
    # (--quick only checks the harness: a 16-token "prefill" runs the decode prompt's compiled program)
    prefill = tok.encode(LONG * 40)[:16 if a.quick else 512]
    sp_model = pathlib.Path(a.out) / ".gemma3-270m.spm"  # the SentencePiece model built from the GGUF
    sp_model.parent.mkdir(parents=True, exist_ok=True)
    sp_model.write_bytes(tok.proto)
    spec = {"gguf": path, "sp_model": str(sp_model), "jaxgen_model": "gemma3-270m", "prompt_ids": tok.encode(PROMPT), "prefill_ids": prefill,
            "batches": [int(b) for b in a.batches.split(",")], "new_tokens": a.new_tokens, "inner": a.inner}
    rows, bws = [], []
    for rnd in range(a.rounds):
        bws.append(bandwidth_gbs())
        order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]  # alternate who goes first
        for system in order:
            mine = [d for d in dtypes if system == "jaxgen" or d in FLOAT_DTYPES]
            if system == "llamacpp":
                mine = mine[:1] or ["float32"]  # one run: it uses the file's own quantization
            for dtype in mine:
                r = run_peer(system, dict(spec, dtype=dtype), a.timeout)
                r["round"] = rnd
                rows.append(r)
                print(f"round {rnd} {system} {dtype}: decode {({b: round(statistics.median(v), 1) for b, v in r['decode_tps'].items()})} "
                      f"prefill {r['prefill_tps']:.0f} first {r['first_call_s']:.1f}s rss {r['peak_rss_mb']:.0f}MB "
                      f"(bw {bws[-1]['best']:.1f} GB/s)", file=sys.stderr, flush=True)
    bws.append(bandwidth_gbs())
    wb = weight_bytes("float32", path)
    bw = max(b["best"] for b in bws)  # the machine's read bandwidth: its fastest probe in any round
    summary = summarize(rows, bw, wb)
    result = {"machine": machine(), "cpu": cpu(), "date": datetime.date.today().isoformat(),
              "model": "gemma3-270m", "gguf": pathlib.Path(path).name, "settings": {k: v for k, v in vars(a).items()},
              "prompt_tokens": len(spec["prompt_ids"]), "bandwidth_gbs": bws, "weight_bytes": wb,
              "summary": summary, "ratios": ratios(rows), "runs": rows}
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['machine']}-{result['date']}" + ("-quick" if a.quick else "") + (f"-{a.tag}" if a.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = table(summary, bw)
    print(text)
    if not a.quick:
        plot(summary, bw, out / f"{stem}.png")
        if not a.no_readme:
            update_readme(text + f"\n\n![decode tokens/s](benchmarks/results/{stem}.png)\n"
                          f"Raw figures: `benchmarks/results/{stem}.json`.", f"bench-{a.tag}" if a.tag else "bench")
    return result


if __name__ == "__main__":
    main()
