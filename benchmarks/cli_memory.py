"""Peak resident memory of `jaxgen generate` per weight / KV-cache format, each in a fresh process.
python -m benchmarks.cli_memory [--model gemma3-270m]

Each variant runs once unmeasured (the first load converts the GGUF into $JAXGEN_CACHE), then once
measured: the child's VmHWM (peak resident set) after `jaxgen generate --json` of 32 new tokens.
Writes benchmarks/results/<machine>-<date>-cli-memory.json and the README table (cli-memory markers)."""
import argparse
import datetime
import json
import os
import subprocess
import sys

from benchmarks.run import ROOT, cpu, machine, update_readme, where

VARIANTS = {"float32": [], "bfloat16": ["--dtype", "bfloat16"], "int8": ["--quant", "int8"],
            "int4": ["--quant", "int4"], "int8 + int8 KV": ["--quant", "int8", "--kv-quant", "int8"]}
CHILD = ("import sys\nfrom jaxgen import cli\nfrom benchmarks.common import peak_rss_mb\n"
         "rc = cli.main(sys.argv[1:])\nprint('PEAK_MB', peak_rss_mb(), file=sys.stderr)\nsys.exit(rc)")


def peak(argv: list[str]) -> float:
    p = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, JAXGEN_COMPILE_CACHE="0"), check=True)
    return float(p.stderr.split("PEAK_MB")[-1].split()[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--no-readme", action="store_true")
    a = ap.parse_args(argv)
    rows = []
    for name, flags in VARIANTS.items():
        cmd = ["generate", "The capital of France is", "--model", a.model, "--json", "--max-new-tokens", "32", *flags]
        peak(cmd)  # converts / quantizes into the cache on a first run
        rows.append({"variant": name, "flags": " ".join(flags), "peak_rss_mb": round(peak(cmd), 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    stem = f"{machine()}-{datetime.date.today()}-cli-memory"
    (ROOT / "benchmarks" / "results" / f"{stem}.json").write_text(
        json.dumps({"cpu": cpu(), "model": a.model, "rows": rows}, indent=1))
    lines = ["| `jaxgen generate` flags | peak RSS MB |", "|---|---|"]
    lines += [f"| {r['flags'] or '(float32)'} | {r['peak_rss_mb']:.0f} |" for r in rows]
    text = "\n".join(lines) + (f"\n\n{a.model}, 32 new tokens, peak resident memory (VmHWM) of a fresh process after "
                               f"the conversion cache is warm, measured {datetime.date.today()} on {where()} "
                               f"(`python -m benchmarks.cli_memory`; "
                               f"`benchmarks/results/{stem}.json`).")
    print(text)
    if not a.no_readme:
        update_readme(text, "cli-memory")


if __name__ == "__main__":
    main()
