"""`jaxgen batch`: generate for a JSONL file of prompts, resumably and losslessly.

Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]} (chat template), with
optional per-row overrides of max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
presence_penalty, frequency_penalty and seed, and "n" (samples of the row, from one prefill), "stop"
(a stop string or a list of them), "prefix" (text the prompt continues; rows sharing one are
prefilled on one copy of it), one of "regex", "json_schema", "choices" (structured output), and
"num_beams", "length_penalty", "early_stopping", "return_beams" (beam search, `jaxgen.beam`). Output:
one JSON line per input id, appended and flushed (fsync) as each batch finishes: {"id", "text",
"tokens", "finish_reason", "stop_reason", "logprobs", "timing"} (beam search adds "score"), with n > 1
{"id", "samples": [{"sample", "text", ...} x n], "timing"}, with return_beams {"id", "beams": [{"beam",
"text", ..., "score"} x num_beams], "timing"}, or {"id", "error"} for a row that cannot run (e.g. too
long, or beam search with a sampling field of its own: the flags' sampling defaults apply to sampled
rows only), which never stops the others.

Restarting with the same output file skips ids already written; a torn last line (the process was
killed mid-write) is cut off first, so a run killed at any moment and restarted ends with exactly one
complete line per id. A row's seed is derived from (--seed, id), so its tokens do not depend on batch
size, order, refilling or mesh. Rows are sorted by prompt length so each batch pads little and few
programs compile (`--dry-run` lists them). With `--refill`, finished rows are replaced by waiting
prompts between chunks of decode steps (continuous batching) instead of waiting for the longest row;
rows run in one running state per length class (`length_classes`), so a few long prompts do not size
every slot's cache.

Multi-host: after `jax.distributed.initialize()`, each process takes every process_count-th row and
writes OUTPUT.process-<i>-of-<n> over its local devices.
"""
from __future__ import annotations

import json
import os
import sys
import time

from jaxgen import knobs as kn
from jaxgen.batch_run import check_flags, check_lora, check_row, describe, execute, plan_work, resolve, setup
from jaxgen.batch_run import row_seed  # noqa: F401  (part of this module's interface: a row's seed)

class InputError(ValueError):
    pass


def read_requests(path: str, on_error: str = "fail", num_beams: int = 1) -> tuple[list[dict], list[dict]]:
    """(requests, errors). Each request: {"id", "text"|"messages", "line", overrides...}. Every
    problem is reported as `PATH:LINE: id X: what is wrong` (without the id where the line has none):
    under on_error "fail" the first one raises InputError, under "skip" each is printed, a row with an
    id gets an {"id", "error"} line, and the rest run. Lines are decoded one by one (a line that is
    not UTF-8 is one bad line). num_beams: the flags' default for rows without their own."""
    rows, errors, seen = [], [], set()

    def bad(n, msg, rid=None):
        where = f"{path}:{n}: " + (f"id {rid!r}: " if rid is not None else "")
        if on_error == "fail":
            raise InputError(where + msg)
        print(f"jaxgen batch: skipping {where}{msg}", file=sys.stderr)
        if rid is not None and rid not in seen:
            errors.append({"id": rid, "error": msg})
            seen.add(rid)

    if os.path.isdir(path):
        raise InputError(f"--input {path} is a directory; give the path of a JSONL file")
    n = lines = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            lines += bool(raw.strip())
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(n, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:  # ValueError: also a number of over 4300 digits
                why = e.msg if isinstance(e, json.JSONDecodeError) else (
                    "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0][:100])
                bad(n, f"not valid JSON ({why})")
                continue
            if not isinstance(obj, dict) or "id" not in obj:
                bad(n, "each line must be a JSON object with an 'id'")
                continue
            rid = obj["id"]
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                bad(n, f"id must be a string or integer, got {rid!r}")
                continue
            if problem := kn.text_problem(rid, "id"):  # (no UTF-8 form: the output line could not hold it)
                bad(n, problem)
                continue
            if rid in seen:
                bad(n, "duplicate id (the first line with it runs)", rid)
                continue
            problem = check_row(obj, num_beams)
            if problem:
                bad(n, problem, rid)
                continue
            seen.add(rid)
            rows.append({**obj, "line": n})
    if not lines:
        raise InputError(f"--input {path} has no rows (" + (f"{n} blank lines)" if n else "an empty file)"))
    return rows, errors


def done_ids(path: str) -> set:
    """Ids already in the output; a torn last line is truncated away first."""
    if not os.path.exists(path):
        return set()
    ids, good = set(), 0
    with open(path, "rb") as f:
        data = f.read()
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        try:
            ids.add(json.loads(raw)["id"])
        except (ValueError, KeyError, TypeError):
            break  # a corrupt line: everything from here is rewritten
        good += len(raw)
    if good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return ids


class OutputError(OSError):
    """The output could not be written (a full disk, a lost mount): what was written stays whole."""


def _write(fd: int, data: bytes) -> int:
    return os.write(fd, data)


def append(fd: int, objs: list[dict]):
    """Append these lines to the output file (an O_APPEND descriptor) and fsync. A kill leaves at most
    a torn last line (`done_ids` cuts it); a failed write (ENOSPC, EIO) is rolled back to the size
    before this call, so the file holds only whole lines, and raises OutputError."""
    if not objs:
        return
    data = b"".join((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8") for obj in objs)
    size = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[_write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass  # `done_ids` cuts a torn line on the next run
        raise OutputError(e.errno, f"writing the output failed: {e.strerror or e}") from None


def lock_output(path: str) -> int:
    """An exclusive flock on PATH.lock, held while the descriptor stays open. The kernel releases it
    when the process dies (a killed run never blocks its resume); a second run on the same output
    fails at once, naming the process that holds it (its pid is written in the lock file)."""
    import fcntl

    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"{path} is being written by another jaxgen batch (pid {other}); wait for it to end "
                         f"or give another --output") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def main(args) -> int:
    import jax

    rows, errors = read_requests(args.input, args.on_error, args.num_beams)
    check_flags(args, rows)  # flags no row would use, before the model loads
    check_lora(args, rows)  # the --lora adapters the rows name, read before the model loads
    output = args.output
    if jax.process_count() > 1:
        rows = rows[jax.process_index()::jax.process_count()]
        errors = errors[jax.process_index()::jax.process_count()]
        output = f"{output}.process-{jax.process_index()}-of-{jax.process_count()}"
    if os.path.isdir(output):
        raise ValueError(f"--output {output} is a directory; give the path of a JSONL file")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ValueError(f"--output {args.output}: the directory {folder} does not exist")
    lock = None if args.dry_run else lock_output(output)  # before reading what is done: one writer
    try:
        return _run(args, rows, errors, output)
    finally:
        if lock is not None:
            os.close(lock)


def _run(args, rows: list[dict], errors: list[dict], output: str) -> int:
    done = done_ids(output)
    todo = [r for r in rows if r["id"] not in done]
    errors = [e for e in errors if e["id"] not in done]
    timings: dict = {}
    model, proposer = setup(args, timings)
    ok, too_long, prefixes = resolve(args, model, todo, proposer)
    errors += too_long
    work = plan_work(args, model, ok, prefixes)
    if args.dry_run:
        print(json.dumps({"rows": len(ok), "skipped_done": len(done), "errors": len(errors), **describe(model, work)}))
        return 0
    from tqdm import tqdm

    t0, n_done, n_tok = time.perf_counter(), 0, 0
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # rows done, tokens/s and ETA while stderr is a terminal; the summary line below either way
    bar = tqdm(total=len(ok), unit="row", dynamic_ncols=True, disable=None, file=sys.stderr)
    try:
        append(fd, errors)

        def emit(lines):
            nonlocal n_done, n_tok
            append(fd, lines)
            n_done += len(lines)
            n_tok += sum(len(s["tokens"]) for x in lines for s in x.get("samples", x.get("beams", [x])) if "tokens" in s)
            bar.set_postfix_str(f"{n_tok / max(time.perf_counter() - t0, 1e-9):.1f} tok/s", refresh=False)
            bar.update(len(lines))

        execute(args, model, work, prefixes, emit, proposer)
    except OutputError as e:
        raise OutputError(e.errno, f"{output}: {e.strerror}; {n_done} rows written, all of them whole: rerun the "
                                   f"same command to resume") from None
    finally:
        bar.close()
        os.close(fd)
    el = time.perf_counter() - t0
    print(f"done: {n_done} rows, {n_tok} tokens in {el:.1f}s ({n_tok / max(el, 1e-9):.1f} tok/s); "
          f"{len(errors)} errors; {len(done)} already done; load {timings.get('load_s', 0):.1f}s",
          file=sys.stderr)
    return 0
