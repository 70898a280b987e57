"""Where one decode step's time goes, from a jax.profiler trace:
    python -m benchmarks.step_profile [--model llama3.2-1b] [--batch 1] [--top 15] [--keep DIR]
    python -m benchmarks.step_profile --smoke       # a tiny preset (CPU, CI), no results file

Two calls of generate's compiled program are traced: the same prompts with N1 and N2 new tokens (one
NEW_TOKEN_BUCKETS bucket, so one program), greedy, no stop. Each trace is read back with
jax.profiler.ProfileData; their difference divided by N2 - N1 is one decode step with the prefill and
the call's fixed costs taken out. Per step:
- wall_ms: the call's wall time (untraced calls, the best of 3 each);
- busy_ms: the union of the program's op intervals (GPU: its kernels and copies on the device's streams;
  CPU: XLA's thunks on the host's threads), so wall - busy is time the device waited (launches, host
  syncs); busy comes from the traced calls, whose ops the profiler slows a little, so a step that never
  waits can show busy above wall;
- launches: op events (GPU kernels: launch-bound steps have many short ones);
- copies: device<->host copy events by name (inside the loop each is a host sync: XLA:GPU reads a
  while loop's and a lax.cond's predicate on the host unless command buffers take them over);
- top: the ops with the most self time (an event's duration less the events nested in it on its line),
  with their share of busy_ms, a kernel name and their source (`sources`: shape, jax op and the jaxgen
  line that made the op, from the compiled module's metadata).
The raw traces are deleted unless --keep names a folder (open them with xprof / TensorBoard). Writes
benchmarks/results/<device>-<date>-step-profile-<model>-b<batch>.json.
Random bf16 params from the preset's shapes, as benchmarks.accelerator's rows; no network, no packages.
"""
import argparse
import collections
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks import common

# Line names of a device plane that summarize other lines (counting them too would count work twice).
_SUMMARY_LINES = {"XLA Modules", "Steps", "XLA TraceMe", "Launch Stats", "Source code", "TensorFlow Name Scope",
                  "TensorFlow Ops", "Async XLA Ops", "SparseCore Steps"}


def _op_lines(plane):
    """The lines of a plane whose events are the program's leaf work: a device plane's "XLA Ops" line
    where it has one (TPU), else its stream lines (GPU, CUPTI), else every non-summary line; a host
    plane's thread lines (XLA:CPU runs thunks there: only events with an hlo_op stat are kept)."""
    lines = list(plane.lines)
    if not plane.name.startswith("/device:"):
        return lines
    named = {ln.name: ln for ln in lines}
    if "XLA Ops" in named:
        return [named["XLA Ops"]]
    streams = [ln for ln in lines if ln.name.startswith("Stream")]
    return streams or [ln for ln in lines if ln.name not in _SUMMARY_LINES]


def read_trace(path: str) -> dict:
    """The op events of one .xplane.pb, per module: {module: {"ops": {hlo_op: [self_ns, count, kernel]},
    "intervals": [(start_ns, end_ns)], "copies": Counter(name)}}. Module "" holds device events with
    no hlo_module stat (copies, mostly)."""
    from jax.profiler import ProfileData

    out = collections.defaultdict(lambda: {"ops": {}, "intervals": [], "copies": collections.Counter()})
    for plane in ProfileData.from_file(path).planes:
        device = plane.name.startswith("/device:")
        for line in _op_lines(plane):
            events = []
            for e in line.events:
                stats = dict(e.stats)
                if not device and "hlo_op" not in stats:
                    continue  # host threads: Python, PjRt bookkeeping, thread-pool markers
                events.append((e.start_ns, e.duration_ns, e.name, stats))
            events.sort(key=lambda x: (x[0], -x[1]))
            stack = []  # [end_ns, record] of the events still open on this line
            for start, dur, name, stats in events:
                while stack and stack[-1][0] <= start:
                    stack.pop()
                m = out[str(stats.get("hlo_module", ""))]
                if "memcpy" in name.lower() or "memcpy" in str(stats.get("hlo_op", "")).lower():
                    m["copies"][name] += 1
                op = str(stats.get("hlo_op", name))
                rec = m["ops"].setdefault(op, [0.0, 0, name])
                rec[0] += dur
                rec[1] += 1
                if stack:  # nested in the open event: not the parent's own time
                    stack[-1][1][0] -= dur
                stack.append([start + dur, rec])
                m["intervals"].append((start, start + dur))
    return dict(out)


def busy_ns(intervals) -> float:
    """The length of the union of (start, end) intervals."""
    total, end = 0.0, -np.inf
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def _program(trace: dict) -> str:
    """The module of the generate program: the one with the most busy time among those named after it
    (else among all)."""
    names = [m for m in trace if m and "generate" in m] or [m for m in trace if m] or [""]
    return max(names, key=lambda m: busy_ns(trace.get(m, {}).get("intervals", [])))


def per_step(short: dict, long: dict, wall_short: float, wall_long: float, steps: int, top: int) -> dict:
    """One decode step: (long trace - short trace) / steps, as the module docstring lists. A trace
    without op events (a profiler that saw no device: no CUPTI) gives zeros, not an error."""
    prog = _program(long)
    empty = {"ops": {}, "intervals": [], "copies": {}}
    a, b = short.get(prog, empty), long.get(prog, empty)
    busy = (busy_ns(b["intervals"]) - busy_ns(a["intervals"])) / steps / 1e6
    ops = []
    for op, (self_ns, count, kernel) in b["ops"].items():
        s0, c0, _ = a["ops"].get(op, (0.0, 0, ""))
        ms = (self_ns - s0) / steps / 1e6
        if ms > 0:
            ops.append(dict(op=op, ms=ms, launches=(count - c0) / steps, share=ms / busy if busy > 0 else None,
                            kernel=kernel[:120]))
    ops.sort(key=lambda r: -r["ms"])
    copies = {}
    for src in (prog, ""):  # copies may carry the program's module or none
        for name in set(long.get(src, {}).get("copies", {})) | set(short.get(src, {}).get("copies", {})):
            n = (long.get(src, {}).get("copies", {}).get(name, 0) - short.get(src, {}).get("copies", {}).get(name, 0))
            copies[name] = copies.get(name, 0) + n / steps
    launches = sum(c for _, c, _ in b["ops"].values()) - sum(c for _, c, _ in a["ops"].values())
    # every op the extra steps launched, by count (exact) where `top` ranks by time (noise on a busy host)
    launched = sorted(op for op, (_, count, _) in b["ops"].items() if count > a["ops"].get(op, (0, 0, ""))[1])
    wall = (wall_long - wall_short) / steps * 1e3
    return dict(program=prog, modules=sorted(m for m in long if m), wall_ms=wall, busy_ms=busy,
                busy_fraction=busy / wall if wall > 0 else None, launches=launches / steps,
                copies={k: v for k, v in copies.items() if v}, top=ops[:top], launched=launched)


def _traced(fn, folder: str):
    """Run fn under jax.profiler.trace into a new subfolder; returns the path of its .xplane.pb."""
    import jax

    sub = tempfile.mkdtemp(dir=folder)
    with jax.profiler.trace(sub):
        fn()
    (path,) = glob.glob(os.path.join(sub, "**", "*.xplane.pb"), recursive=True)
    return path


_TABLE = re.compile(r'^(\d+) (?:"(.*)"|\{(.*)\})$')
_INSTR = re.compile(r'^\s*(ROOT )?%(\S+) = (\S+) ([\w-]+)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) .*\{$')


def sources(hlo_text: str) -> dict:
    """{instruction name: "shape opcode: jax op @ file:line function"} from a compiled module's text.
    Profile events name the instruction (hlo_op); this says which line of jaxgen made it: the op_name
    of its metadata (the jax primitive: the last two parts of its name stack) and the innermost frame
    of its stack (resolved through the FileNames / FunctionNames / FileLocations / StackFrames tables
    XLA prints ahead of the module; only the innermost, as the printed parent links do not walk to
    the callers). A fusion without metadata of its own is described by its fused computation's root;
    the shape (layout dropped) tells which weight a matmul read."""
    tables, section, instrs, roots, computation = collections.defaultdict(dict), None, {}, {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        m = _TABLE.match(line)
        if section and m:
            value = m.group(2) if m.group(2) is not None else dict(kv.split("=", 1) for kv in m.group(3).split())
            tables[section][m.group(1)] = value
            continue
        section = None
        m = _COMPUTATION.match(line)
        if m:
            computation = m.group(1)
            continue
        m = _INSTR.match(line)
        if m:
            meta = re.search(r"metadata=\{([^}]*)\}", line)
            meta = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', meta.group(1))) if meta else {}
            calls = re.search(r"calls=%([^,\s]+)", line)
            instrs[m.group(2)] = dict(shape=re.sub(r"\{[^}]*\}", "", m.group(3)), opcode=m.group(4),
                                      op=meta.get("op_name", "").strip('"'), frame=meta.get("stack_frame_id"),
                                      calls=calls.group(1) if calls else None)
            if m.group(1):
                roots[computation] = m.group(2)

    def frame(fid):
        if fid not in tables["StackFrames"]:
            return ""
        loc = tables["FileLocations"].get(tables["StackFrames"][fid].get("file_location_id"), {})
        path = tables["FileNames"].get(loc.get("file_name_id"), "?")
        return f"{os.path.basename(path)}:{loc.get('line', '?')} {tables['FunctionNames'].get(loc.get('function_name_id'), '?')}"

    out = {}
    for name, i in instrs.items():
        what = i
        if not i["op"] and i["calls"] in roots:  # a fusion XLA made: its root says what it computes
            what = instrs.get(roots[i["calls"]], i)
        where = " @ ".join(filter(None, ["/".join(what["op"].split("/")[-2:]), frame(what["frame"])]))
        out[name] = f"{i['shape']} {what['opcode']}" + (f": {where}" if where else "")
    return out


def profile(model, prompts, n1: int, n2: int, *, top: int = 15, keep: str | None = None) -> dict:
    """Trace generate's program on prompts with n1 and n2 new tokens (one program: same bucket) and
    return per_step's summary, its top ops' sources, the compile time and the settings. The program is
    compiled (lower + compile, so its text names the ops) and run once before either trace."""
    import jax

    from jaxgen.generate import generate_jit, place, prepare, statics

    def request(n):
        _, args, p = prepare(model, prompts, max_new_tokens=n, stop_ids=[])
        return place(model, args), p

    (args1, p1), (args2, p2) = request(n1), request(n2)
    if p1 != p2 or n2 <= n1:
        raise ValueError(f"n1 {n1} < n2 {n2} must plan one program (one new-token bucket): {p1} != {p2}")
    t = time.perf_counter()
    compiled = generate_jit.lower(model.params, **args2, **statics(model, p2)).compile()
    compile_s = time.perf_counter() - t
    run = lambda args: jax.block_until_ready(compiled(model.params, **args))
    run(args2)  # warm the allocator and the caches
    folder = keep or tempfile.mkdtemp(prefix="jaxgen-profile-")
    os.makedirs(folder, exist_ok=True)
    # wall times from untraced calls, the best of 3 (a difference of two single timings is noise on a
    # tiny model or a busy machine); the traces give the ops
    wall = lambda args: min(common.timed(lambda: run(args), 3))
    wall_short, wall_long = wall(args1), wall(args2)
    try:
        short = _traced(lambda: run(args1), folder)
        long = _traced(lambda: run(args2), folder)
        summary = per_step(read_trace(short), read_trace(long), wall_short, wall_long, n2 - n1, top)
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    where = sources(compiled.as_text())
    for r in summary["top"]:
        r["source"] = where.get(r["op"], "")
    # the distinct source lines of every op a step launched (which jaxgen lines a step runs)
    summary["launched_sources"] = sorted({where.get(op, "") for op in summary["launched"]} - {""})
    return dict(model=model.cfg.name, batch=len(prompts), prompt=len(prompts[0]), new_tokens=[n1, n2],
                paths=str(model.paths), compile_s=compile_s, **summary)


def random_model(cfg, paths=None):
    """A bf16 model of cfg's shapes with random params, in the layout jaxgen.load gives its paths
    (default: the backend's)."""
    import jax
    import jax.numpy as jnp

    import jaxgen
    from jaxgen import backend

    params = jax.jit(lambda k: jaxgen.init_params(cfg, k, jnp.bfloat16))(jax.random.key(0))
    paths = paths or backend.current()
    return jaxgen.Model(cfg, jaxgen.model.unstack_layers(params) if paths.unroll else params, paths=paths)


def lines(p: dict) -> list[str]:
    """A profile as text lines (the accelerator run prints it; the results file has the numbers)."""
    out = [f"{p['model']} batch {p['batch']}: one decode step {p['wall_ms']:.3f} ms wall, {p['busy_ms']:.3f} ms "
           f"busy ({(p['busy_fraction'] or 0):.0%}), {p['launches']:.0f} launches, copies {p['copies']} "
           f"[{p['program']}]"]
    for r in p["top"]:
        out.append(f"  {r['ms']:8.4f} ms {(r['share'] or 0):6.1%} x{r['launches']:<5.1f} {r['op']}: {r.get('source', '')}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3.2-1b", help="a preset (random bf16 params of its shapes)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, nargs=2, default=[144, 256], metavar=("N1", "N2"),
                    help="new tokens of the two traced calls (one bucket)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--keep", default=None, help="keep the raw traces in this folder")
    ap.add_argument("--smoke", action="store_true", help="a tiny preset and few steps (CPU, CI)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)  # now, not after the traced runs
    import jaxgen
    from benchmarks.accelerator import results_stem, smoke_config

    cfg = smoke_config() if args.smoke else jaxgen.load_config(args.model)
    if args.smoke:
        args.steps, args.prompt = [17, 32], 8
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (args.batch, args.prompt)).tolist()
    p = profile(random_model(cfg), prompts, *args.steps, top=args.top, keep=args.keep)
    print("\n".join(lines(p)), file=sys.stderr)
    if not args.smoke:
        import datetime

        import jax

        kind = results_stem(jax.devices()[0].device_kind)
        p = dict(date=str(datetime.date.today()), device_kind=jax.devices()[0].device_kind, jax=jax.__version__, **p)
        path = os.path.join(args.out, f"{kind}-{datetime.date.today()}-step-profile-{cfg.name}-b{args.batch}.json")
        with open(path, "w") as f:
            json.dump(p, f, indent=1)
        print(f"wrote {path}", file=sys.stderr)
    return p


if __name__ == "__main__":
    main()
