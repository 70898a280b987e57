"""Shared by the peer scripts (each runs in its own virtualenv, so this imports nothing but stdlib).

Protocol: `python benchmarks/peer_<name>.py '<spec json>'` prints one JSON line of results. The spec:
  gguf: path of the model file (the same file for every system); dtype: float32 | bfloat16;
  prompt_ids: the decode prompt (token ids, BOS included); prefill_ids: a 512-token prompt;
  batches: batch sizes; new_tokens: tokens decoded per row (stop tokens ignored); inner: timed repeats.
Every system is timed the same way, with the device synchronized:
  first_call_s  load -> first batch-1 result (compilation / warm-up included), load excluded;
  prefill_tps   512 / (time to the first new token of the 512-token prompt), batch 1;
  decode_tps[B] B * (new_tokens - 1) / (t(new_tokens) - t(1)): steady-state decode, prefill excluded;
  peak_rss_mb   the process's peak resident memory.
"""
import json
import resource
import statistics
import sys
import time


def spec() -> dict:
    return json.loads(sys.argv[1])


def clock() -> float:
    return time.perf_counter()


def timed(fn, inner: int) -> list[float]:
    out = []
    for _ in range(inner):
        t = clock()
        fn()
        out.append(clock() - t)
    return out


def decode_rates(run, batch: int, new_tokens: int, inner: int) -> list[float]:
    """run(batch, n) generates n tokens per row; rates from paired timings of n and 1 tokens."""
    run(batch, new_tokens)  # warm-up (compiles this shape where the system compiles)
    run(batch, 1)
    rates = []
    for _ in range(inner):
        t1 = timed(lambda: run(batch, 1), 1)[0]
        tn = timed(lambda: run(batch, new_tokens), 1)[0]
        rates.append(batch * (new_tokens - 1) / max(tn - t1, 1e-9))
    return rates


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
    over fork + exec, so a peer started by a parent holding a model would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def first_and_prefill(run, s: dict) -> tuple[float, float]:
    """(first call s, prefill tok/s): the first batch-1 call of new_tokens, then a timed 512-token
    prefill (one new token) after a warm-up of the same shape."""
    t = clock()
    run(1, s["new_tokens"])
    first = clock() - t
    run(1, 1, s["prefill_ids"])
    t = clock()
    run(1, 1, s["prefill_ids"])
    return first, len(s["prefill_ids"]) / (clock() - t)


def report(system: str, s: dict, **fields):
    fields["peak_rss_mb"] = peak_rss_mb()
    fields.update(system=system, dtype=s["dtype"])
    print(json.dumps(fields), flush=True)


def median(xs):
    return statistics.median(xs)
