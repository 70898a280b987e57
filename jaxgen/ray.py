"""`jaxgen batch` as a Ray Data stage, for batch generation past one host group (many independent GPU
hosts, several TPU slices, preemptible machines). Ray schedules the actors, retries failed blocks and
streams results to storage; jaxgen runs the rows. Needs the optional extra: pip install "jaxgen[ray]".

    import ray, jaxgen.ray
    ds = ray.data.read_json("prompts.jsonl")           # rows as `jaxgen batch` lines: id, prompt | messages, ...
    out = ds.map_batches(jaxgen.ray.Generate, fn_constructor_kwargs=dict(model="gemma3-270m", max_new_tokens=64),
                         concurrency=4, batch_size=64, batch_format="pandas")
    out.write_json("results/")                         # or .write_parquet; jaxgen.ray.to_line(row) == the batch line

`Generate(**options)` loads the model once per actor; `options` are `jaxgen batch`'s flags by their
Python names (model, dtype, quant, kv_quant, mesh, max_new_tokens, temperature, ..., seed, stop,
prefix, chat, ignore_stop, batch_size, refill, chunk_steps, num_beams, ...), with the same defaults.
Each call takes a block of rows with the fields of a `jaxgen batch` input line and returns one output
row per input row, in order, with the fields of the batch's output line. A row's seed comes from
(seed, id) as in `jaxgen batch`, so its tokens do not depend on the actor or block that ran it. A bad
row gets an "error" field, as in `jaxgen batch --on-error skip`; it never fails the block.

Columns: Arrow needs one type per column, so the output columns are id, text, tokens, logprobs,
finish_reason, score, error (plain values or null) and stop_reason, top_logprobs, samples, beams,
timing (JSON text: a stop reason is an id or a string; samples and beams are lists of objects).
In the input, null (a field another row has) and NaN (pandas' null in a number column) mean absent,
and a whole float where an integer is expected (pandas turns an int column with nulls into floats)
is read as the integer.
"""
from __future__ import annotations

import argparse
import json
import math
import re

from jaxgen import knobs as kn

PLAIN = ("text", "tokens", "logprobs", "finish_reason", "score", "error")
AS_JSON = ("stop_reason", "top_logprobs", "samples", "beams", "timing")
INTEGERS = tuple(k.name for k in kn.KNOBS.values() if k.row and k.kind == "int")  # columns pandas may make floats


def _python(v):
    """A value from a Ray block (numpy scalars and arrays, pandas nulls) as plain Python."""
    if hasattr(v, "tolist"):  # numpy array or scalar
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_python(x) for x in v]
    if isinstance(v, dict):
        return {k: _python(x) for k, x in v.items()}
    return v


def _absent(v) -> bool:
    return v is None or isinstance(v, float) and math.isnan(v) or type(v).__name__ == "NAType"  # pandas.NA


def rows_of(batch) -> list[dict]:
    """The rows of a Ray batch (a pandas DataFrame, a pyarrow Table or a dict of columns) as dicts of
    plain values, without absent fields."""
    if hasattr(batch, "to_pylist"):  # pyarrow
        records = batch.to_pylist()
    elif hasattr(batch, "to_dict"):  # pandas
        records = batch.to_dict("records")
    else:
        cols = list(batch)
        n = len(batch[cols[0]]) if cols else 0
        records = [{c: batch[c][i] for c in cols} for i in range(n)]
    rows = []
    for rec in records:
        row = {}
        for k, v in rec.items():
            v = _python(v)
            if _absent(v):
                continue
            if k in INTEGERS and isinstance(v, float) and v.is_integer():
                v = int(v)
            row[k] = v
        rows.append(row)
    return rows


def to_line(row: dict) -> dict:
    """An output row (a dict of its columns) as the `jaxgen batch` output line it stands for."""
    line = {"id": _python(row["id"])}
    for k in PLAIN + AS_JSON:
        v = _python(row.get(k))
        if k in AS_JSON and isinstance(v, str):
            v = json.loads(v)
        elif _absent(v):
            continue
        if k == "stop_reason" or v is not None:
            line[k] = v
    if "samples" in line or "beams" in line or "error" in line:
        line.pop("stop_reason", None)
    return line


def _column_row(line: dict) -> dict:
    row = {"id": line["id"]}
    for k in PLAIN:
        row[k] = line.get(k)
    for k in AS_JSON:
        row[k] = json.dumps(line[k], ensure_ascii=False) if k in line else None
    return row


def batch_args(**options):
    """`jaxgen batch`'s flags with these options set (by their Python names), parsed and checked as the
    command parses and checks them: each option becomes its flag (a list: the flag repeated; True / False:
    the switch on or off), so the Ray stage and the command line cannot disagree. json_schema may also
    be the schema itself (a dict) instead of a file."""
    from jaxgen.flags import build_parser, check

    argv, schema = ["batch", "--input", "-", "--output", "-"], None
    parser = build_parser(raise_errors=True)
    flags = {a.dest: a for a in parser.commands["batch"]._actions if a.option_strings}
    for k, v in options.items():
        if k in ("input", "output", "dry_run", "on_error", "distributed", "help") or k not in flags:
            raise TypeError(f"jaxgen.ray.Generate got an unexpected option {k!r}")
        action, flag = flags[k], flags[k].option_strings[0]
        if v is None:
            continue  # the default
        if k == "json_schema" and isinstance(v, dict):
            schema = v
        elif action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
            if not isinstance(v, bool):
                raise ValueError(f"{k} must be true or false, got {v!r:.80}")
            argv += [flag if v else f"--no-{flag[2:]}"] if isinstance(action, argparse.BooleanOptionalAction) else (
                [flag] if v else [])
        elif k == "early_stopping" and isinstance(v, bool):  # a switch that also takes 'never'
            argv += [flag] if v else []
        elif isinstance(action, argparse._AppendAction):
            argv += [x for item in ([v] if isinstance(v, str) else v) for x in (flag, _text(k, item))]
        else:
            argv += [flag, _text(k, v)]
    try:
        args = parser.parse_args(argv)
    except ValueError as e:  # argparse's message names the flag: name the option instead
        raise ValueError(re.sub(r"argument --([\w-]+)", lambda m: "option " + m.group(1).replace("-", "_"),
                                str(e))) from None
    if schema is not None:
        args.json_schema = schema
    check(args, "batch", options=True)
    return args


def _text(option: str, v) -> str:
    """An option's value as its flag's text (numbers round-trip exactly through repr)."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"{option} must be a number or a string, got {v!r:.80}")
    return v if isinstance(v, str) else repr(v)


class Generate:
    """A Ray Data `map_batches` stage running jaxgen: see the module doc. The model loads in the
    constructor (once per actor), so pass the class, not an instance, with `concurrency=N`."""

    def __init__(self, **options):
        import time

        from jaxgen.batch_run import setup
        from jaxgen.checkpoint.registry import persistent_compile_cache

        self.args = batch_args(**options)
        # compiled programs on disk, as the jaxgen command keeps them: an actor restarted after a failure
        # or a preemption, and the other actors of a host, load them instead of compiling
        persistent_compile_cache()
        t = time.perf_counter()
        self.model, self.proposer = setup(self.args)
        self.startup_s = time.perf_counter() - t  # load (and mesh); programs compile on the first block

    def __call__(self, batch):
        import pandas as pd

        from jaxgen.batch_run import check_row, execute, plan_work, resolve

        rows, lines = rows_of(batch), {}
        good = []
        for i, r in enumerate(rows):
            rid = r.get("id")
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                lines[i] = {"id": rid, "error": f"each row needs an 'id' (a string or integer), got {rid!r:.40}"}
                continue
            problem = check_row(r, self.args.num_beams)
            if problem:
                lines[i] = {"id": rid, "error": problem}
            else:
                good.append(dict(r, line=i))
        if good:
            ok, errors, prefixes = resolve(self.args, self.model, good, self.proposer)
            where = {}  # lines come out in the order rows finish: back to their place by id (unique per dataset)
            for r in good:
                where.setdefault(_key(r["id"]), []).append(r["line"])

            def place(out):
                for line in out:
                    lines[where[_key(line["id"])].pop(0)] = line
            place(errors)
            execute(self.args, self.model, plan_work(self.args, self.model, ok, prefixes), prefixes, place,
                    self.proposer)
        return pd.DataFrame([_column_row(lines[i]) for i in range(len(rows))])


def _key(rid):
    return (type(rid).__name__, rid)
