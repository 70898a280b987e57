"""Running `jaxgen batch` rows, with no files: the row format (fields, checks, the per-row seed),
resolving each row's fields from the flags' defaults, grouping rows into static batches and refill
runs, and running them into output lines (`execute(..., emit)`). `jaxgen.batch` reads and writes the
JSONL files around it; `jaxgen.ray` runs it inside Ray Data actors.
"""
from __future__ import annotations

import dataclasses
import time
import zlib

from jaxgen import knobs as kn
from jaxgen.tokenizer import writable_bytes

ROW_FIELDS = tuple(k.name for k in kn.KNOBS.values() if k.row)  # a line's fields besides id, prompt | messages
# the sampling transforms' knobs, which a static batch passes to `generate` one value per row
SAMPLING = tuple(k.name for k in kn.KNOBS.values() if k.row and k.per_row and k.beam == "no" and k.name != "seed")
BEAM_FIELDS = kn.BEAM_KNOBS  # (every one a row field too)


def check_fields(obj: dict, num_beams: int = 1) -> str | None:
    """The problem with a row's knob fields (each value by `jaxgen.knobs`, then how they combine), or
    None. num_beams: the flags' default for rows without their own. Checked while reading the file,
    so a bad value stops the run (or is skipped) with its line number before anything runs."""
    for name in ROW_FIELDS:
        if name in obj:
            problem = kn.problem(name, obj[name])
            if problem:
                return problem
    kinds = [k for k in kn.CONSTRAINTS if k in obj]
    if len(kinds) > 1:
        return f"give at most one of regex, json_schema, choices (got {', '.join(kinds)})"
    if obj.get("num_beams", num_beams) > 1:
        refused = [k for k in obj if k in ROW_FIELDS and kn.KNOBS[k].beam == "no"]
        if refused:
            return f"num_beams > 1 is deterministic beam search: it does not take {', '.join(refused)}"
    else:
        if only := [k for k in obj if k in ROW_FIELDS and kn.KNOBS[k].beam == "only"]:
            return f"{kn.only_for_beams(only)} (num_beams > 1)"
    return None


def speculative_problem(args, rows: list[dict]) -> str | None:
    """What speculative decoding cannot run among these rows (with the flags' defaults), or None."""
    if args.prefix is not None or any("prefix" in r or r.get("n", 1) > 1 for r in rows):
        return "--speculative takes neither a prefix nor n > 1 samples yet"
    if any(getattr(args, k) is not None for k in ("regex", "json_schema", "choice")) or any(
            k in r for r in rows for k in kn.CONSTRAINTS):
        return "--speculative does not take a constraint (regex / json_schema / choices) yet"
    return None


def check_flags(args, rows: list[dict]):
    """Refuse the batch flags that no row of the file would use (the flags are defaults for rows); their
    values were checked already (`flags.check`, before the file was read)."""
    from jaxgen.flags import given

    if not any(r.get("num_beams", args.num_beams) > 1 for r in rows):
        if only := [kn.KNOBS[k].flag for k in given(args, "batch") if kn.KNOBS[k].beam == "only"]:
            raise ValueError(f"{kn.only_for_beams(only)}, and no row has num_beams > 1")
    if args.json_whitespace is not None and args.json_schema is None and not any("json_schema" in r for r in rows):
        raise ValueError("--json-whitespace only applies with --json-schema or rows with a json_schema, and there "
                         "are none")
    if args.chat and not any("prompt" in r for r in rows):
        raise ValueError("--chat only applies to rows with a \"prompt\" (\"messages\" rows are formatted by the chat "
                         "template anyway), and there are none")
    if args.include_stop and not args.stop and not any(r.get("stop") for r in rows):
        raise ValueError("--include-stop only applies with --stop or rows with a stop field, and there are none")
    if args.speculative:
        from jaxgen import speculative

        speculative.parse(args.speculative, mesh=args.mesh, top_logprobs=args.top_logprobs)
        if problem := speculative_problem(args, rows):
            raise ValueError(problem)


def check_lora(args, rows: list[dict]):
    """Before the model loads: refuse a row naming an adapter no --lora gives and a --lora no row names,
    and read every adapter directory (jaxgen.lora.load_lora: a bad one is one line now). Sets
    args.adapters {name: Adapter} (`setup` checks them against the model)."""
    from jaxgen.flags import lora_specs
    from jaxgen.lora import load_lora

    specs = lora_specs(args)
    used = {r["lora"] for r in rows if r.get("lora") is not None}
    if unknown := sorted(used - set(specs)):
        raise ValueError(f"rows name LoRA adapters that no --lora NAME=DIR gives: {', '.join(unknown)}")
    if unused := sorted(set(specs) - used):
        raise ValueError(f"--lora {', '.join(unused)}: no row names it (a row picks an adapter by its \"lora\" field)")
    args.adapters = {name: load_lora(path, name=name) for name, path in specs.items()}


def check_messages(messages) -> str | None:
    """The problem with a row's chat messages, or None."""
    if not isinstance(messages, list) or not messages:
        return f"messages must be a non-empty list of {{role, content}} objects, got {messages!r:.80}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            return f"messages[{i}] must be an object with exactly 'role' and 'content', got {m!r:.80}"
        if m["role"] not in ("system", "user", "assistant"):
            return f"messages[{i}].role must be system, user or assistant, got {m['role']!r:.40}"
        if not isinstance(m["content"], str):
            return f"messages[{i}].content must be a string, got {m['content']!r:.40}"
        if problem := kn.text_problem(m["content"], f"messages[{i}].content"):
            return problem
    return None


def row_seed(seed: int, rid) -> int:
    return zlib.crc32(f"{seed}:{rid}".encode()) & 0x7FFFFFFF


def longest_row(rows: list[dict]) -> int:
    """The most tokens one row holds: its prompt + its own max_new_tokens (`generate.plan` checks the
    context against it, so a long prompt with a small budget batches with a short one with a large one)."""
    return max(len(r["ids"]) + r["max_new"] for r in rows)


def stop_strings(rows: list[dict]) -> set:
    """The distinct stop strings of these rows."""
    return {x for r in rows for x in r.get("stop", [])}


def end_ids(model, defaults: dict) -> list[int]:
    """The stop ids a call's constraint tables are built with (as `generate.prepare` builds them)."""
    stops = defaults["stop_ids"] if defaults["stop_ids"] is not None else model.tokenizer.stop_ids
    return sorted(set(stops))


def one_call(model, ends: list[int]):
    """fits(rows): whether these rows can share one call (a static batch, a refill run): at most
    knobs.MAX_STOP_STRINGS distinct stop strings (the bits of a row mask) and their constraints' tables
    together within jaxgen.constraints' limits (each row's alone is checked by `resolve`)."""
    from jaxgen import constraints as con

    memo: dict = {}

    def fits(rows: list[dict]) -> bool:
        if len(stop_strings(rows)) > kn.MAX_STOP_STRINGS:
            return False
        regexes = frozenset(r["constraint"] for r in rows if r.get("constraint"))
        if len(regexes) > 1 and regexes not in memo:
            memo[regexes] = con.problem(sorted(regexes), writable_bytes(model.tokenizer), model.cfg.vocab_size,
                                        ends) is None
        return len(regexes) <= 1 or memo[regexes]
    return fits


def call_groups(rows: list[dict], fits) -> list[list[dict]]:
    """Rows split, in order, into groups that each fit one call (`one_call`): a row joins the first
    group it fits; one group when they all fit together."""
    groups: list[list[dict]] = []
    for r in rows:
        g = next((g for g in groups if fits(g + [r])), None)
        if g is None:
            groups.append([r])
        else:
            g.append(r)
    return groups


def plan_batches(model, rows: list[dict], batch_size: int, memory_bytes: int | None, prefix=None, n: int = 1,
                 fits=None):
    """Sort by length; cut into batches of <= batch_size decode rows (rows x n samples) whose cache
    fits memory_bytes and whose rows fit one call (fits(rows): `one_call`; None: any rows do)."""
    from jaxgen.cache import cache_bytes
    from jaxgen.generate import plan, prefix_slots

    lp = len(prefix) if prefix is not None else 0
    Tp = prefix_slots(model.cfg, lp)
    rows = sorted(rows, key=lambda r: (len(r["ids"]), str(r["id"])))
    batches, cur = [], []
    for r in rows:
        trial = cur + [r]
        p = plan(model.cfg, len(trial), max(len(x["ids"]) for x in trial), max(x["max_new"] for x in trial), n=n,
                 prefix=Tp, prefix_len=lp, longest_row=longest_row(trial))
        need = cache_bytes(model.cfg, p.rows, p.cache_len, model.params.embed.dtype, kv_quant=model.kv_quant)
        room = (memory_bytes is None or need <= memory_bytes) and (fits is None or fits(trial))
        if cur and (len(trial) * n > batch_size or not room):
            batches.append(cur)
            cur = [r]
        else:
            cur = trial
    if cur:
        batches.append(cur)
    return batches


def run_batch(model, rows: list[dict], defaults: dict, top_logprobs: int, proposer=None, prefix=None,
              n: int = 1) -> list[dict]:
    import jaxgen
    from jaxgen import speculative

    size = len(rows)
    knobs = {}
    beams = rows[0].get("num_beams", 1) > 1  # a batch is all beam search or none (grouped by its beam bucket)
    for k in BEAM_FIELDS[1:3] if beams else SAMPLING:  # beam search takes no sampling knobs (nor a seed)
        vals = [r.get(k, defaults[k]) for r in rows]
        knobs[k] = vals[0] if len(set(vals)) == 1 else vals
    if beams:
        knobs.update(num_beams=[r["num_beams"] for r in rows], return_beams=True)
    else:
        knobs["seed"] = [r["seed"] for r in rows]
    t = time.perf_counter()
    request = dict(max_new_tokens=[r["max_new"] for r in rows],
                   stop_ids=defaults["stop_ids"], stop=[r.get("stop", []) for r in rows],
                   include_stop=defaults.get("include_stop", False), **knobs)
    if any(r.get("constraint") for r in rows):
        request["regex"] = [r.get("constraint") for r in rows]
    if any(r.get("adapter") is not None for r in rows):
        request["lora"] = [r.get("adapter") for r in rows]
    timing = {}
    if proposer is not None:
        out, stats = speculative.generate(model, [r["ids"] for r in rows], proposer, **request)
        timing = {"tokens_per_target_pass": round(stats.tokens_per_pass, 3),
                  "acceptance_rate": round(stats.acceptance_rate, 3)}
    elif beams:
        out = jaxgen.generate(model, [r["ids"] for r in rows], prefix=prefix, **request)
        timing.update(batch_s=round(time.perf_counter() - t, 4), batch_size=size)
        lines, at = [], 0
        for r in rows:  # each row's beams, best first
            cs, at = out[at:at + r["num_beams"]], at + r["num_beams"]
            if r.get("return_beams", defaults["return_beams"]):
                lines.append({"id": r["id"], "beams": [{"beam": c.sample, **c.fields()} for c in cs], "timing": timing})
            else:
                lines.append(_line(r, cs[:1], timing))
        return lines
    else:
        out = jaxgen.generate(model, [r["ids"] for r in rows], top_logprobs=top_logprobs, n=n, prefix=prefix,
                              **request)
    timing.update(batch_s=round(time.perf_counter() - t, 4), batch_size=size)
    return [_line(r, out[i * n:(i + 1) * n], timing) for i, r in enumerate(rows)]


def _line(r: dict, cs: list, timing: dict) -> dict:
    """The output line of input row r from its generate.Completions (n of them)."""
    if len(cs) == 1:
        return {"id": r["id"], **cs[0].fields(), "timing": timing}
    return {"id": r["id"], "samples": [{"sample": c.sample, **c.fields()} for c in cs], "timing": timing}


def _data_multiple(model, n: int) -> int:
    """n rounded up to a multiple of the mesh's data axis (rows split evenly over it)."""
    d = model.mesh.shape["data"] if model.mesh is not None else 1
    return -(-n // d) * d


def length_classes(model, rows: list[dict], slots: int, prefix=None) -> list[list[dict]]:
    """Rows split into refill runs by cache length (prompt bucket + new-token bucket), shortest first.
    Why: one running state sizes every slot's KV cache for its longest row, and every decode step
    attends all of a global layer's slots, so a few 8k-token rows among 100-token ones would make
    every slot 8k long. A class with fewer rows than `slots` joins the next longer one (it cannot
    fill a state of its own, and each state compiles its own programs); the longest stays."""
    from jaxgen.generate import plan, prefix_slots

    lp = len(prefix) if prefix is not None else 0
    Tp = prefix_slots(model.cfg, lp)
    slots = _data_multiple(model, slots)  # as refill_plan rounds them
    by_len: dict = {}
    for r in rows:
        by_len.setdefault(plan(model.cfg, 1, len(r["ids"]), r["max_new"], prefix=Tp, prefix_len=lp).cache_len,
                          []).append(r)
    classes, carry = [], []
    for size in sorted(by_len):
        carry += by_len[size]
        if len(carry) >= slots:
            classes.append(carry)
            carry = []
    if carry:  # the longest rows (fewer than the slots, or none shorter)
        classes.append(carry)
    return classes


def refill_plan(model, rows: list[dict], slots: int, memory_bytes: int | None, defaults: dict, prefix=None):
    """The Plan of the one running state a refill run uses: `slots` rows (fewer if their KV cache
    would pass memory_bytes; a multiple of the mesh's data axis), a cache for the longest prompt +
    the largest max_new_tokens, and the stop-id / penalty layout every row's request needs."""
    import dataclasses

    from jaxgen.cache import cache_bytes
    from jaxgen.generate import plan
    from jaxgen.sampling import make_sampling_params, uses_penalties

    from jaxgen.generate import BATCH_BUCKETS, bucket

    d = model.mesh.shape["data"] if model.mesh is not None else 1
    slots = min(slots, bucket(len(rows), BATCH_BUCKETS, "rows"))  # no more slots than rows (rounded)
    stops = defaults["stop_ids"]
    n_stops = len(getattr(model.tokenizer, "stop_ids", ()) or ()) if stops is None else len(stops)
    # whether any row uses a penalty (then the running state carries the [B, V] token history)
    penalty_knobs = {k: [r.get(k, defaults[k]) for r in rows]
                     for k in ("repetition_penalty", "presence_penalty", "frequency_penalty")}
    penalties = uses_penalties(make_sampling_params(len(rows), **penalty_knobs))
    lp = len(prefix) if prefix is not None else 0
    p = plan(model.cfg, 1, max(len(r["ids"]) for r in rows), max(r["max_new"] for r in rows), stop_slots=n_stops,
             penalties=penalties, prefix=prefix.bucket if prefix is not None else 0, prefix_len=lp,
             longest_row=longest_row(rows))
    need = lambda b: cache_bytes(model.cfg, b, p.cache_len, model.params.embed.dtype, kv_quant=model.kv_quant)
    b = _data_multiple(model, slots)
    while memory_bytes is not None and b > d and need(b) > memory_bytes:
        b -= d
    if memory_bytes is not None and need(b) > memory_bytes:
        raise ValueError(f"--memory-gb {memory_bytes / (1 << 30):g}: the KV cache of {b} row(s) of "
                         f"{p.cache_len} tokens needs {need(b) / (1 << 30):.3g} GB")
    return dataclasses.replace(p, batch=b)


def run_refill(model, rows: list[dict], defaults: dict, p, chunk: int, top_logprobs: int, emit, prefix=None):
    """Continuous batching: p.batch rows decode together; when rows finish, waiting prompts are
    prefilled and inserted into their slots between chunks of `chunk` decode steps, instead of the
    batch waiting for its longest row. One running-state shape for the whole run (`refill_plan`), so
    the programs are: decode, insert, and one prefill per (new-row bucket, prompt bucket). The stop
    strings of all rows form one table (the running state's); a prefix is prefilled once."""
    import jax
    import numpy as np

    from jaxgen import sampling as smp
    from jaxgen import stops as sst
    from jaxgen.engine import decode_jit, insert_jit, output, prefill_jit
    from jaxgen.generate import fetch, place, prepare, statics, to_completions

    cfg = model.cfg
    B, NS = p.batch, p.stop_slots
    prefill_statics = statics(model, p, top_logprobs)  # generate's prefill program, as `stream` calls it

    # LoRA: one table of the run's adapters for every prefill and the running state
    adapters = list(defaults.get("adapters") or [])
    if adapters:
        from jaxgen.lora import attach

        model = attach(model, None, 0, universe=adapters)
    universe = sorted({s for r in rows for s in r.get("stop", [])})
    constrained = sorted({r["constraint"] for r in rows if r.get("constraint")})  # one table for the run
    if len(universe) > sst.MAX_STRINGS:
        raise ValueError(f"the rows use {len(universe)} distinct stop strings; a --refill run takes at most "
                         f"{sst.MAX_STRINGS} (run with --no-refill: each static batch has its own)")

    def request(batch_rows):
        knobs = {k: [r.get(k, defaults[k]) for r in batch_rows] for k in SAMPLING}
        _, args, q = prepare(model, [r["ids"] for r in batch_rows], max_new_tokens=[r["max_new"] for r in batch_rows],
                             seed=[r["seed"] for r in batch_rows], stop_ids=defaults["stop_ids"],
                             stop=[r.get("stop", []) for r in batch_rows], stop_universe=universe, prefix=prefix,
                             **({"regex": [r.get("constraint") for r in batch_rows],
                                 "constraint_universe": constrained} if constrained else {}),
                             **({"lora": [r.get("adapter") for r in batch_rows], "lora_universe": adapters}
                                if adapters else {}), **knobs)
        assert q.stop_slots == NS and q.bias_slots == p.bias_slots, (q, p)  # every row shares the stop ids
        return args

    # The running batch starts as all-padding rows (done); host copies of its per-row arguments.
    empty = dict(prompts=np.zeros((B, 16), np.int32), prompt_lengths=np.zeros((B,), np.int32),
                 sp=smp.make_sampling_params(B, bias_slots=p.bias_slots), max_new_tokens=np.zeros((B,), np.int32),
                 stop_ids=np.full((B, NS), -1, np.int32), seeds=np.zeros((B,), np.uint32),
                 stop_strings=sst.build([], model.tokenizer.token_bytes() if universe else [], cfg.vocab_size, rows=B,
                                        universe=universe))
    if constrained:  # the running state's tables: every prefill of the run builds these same ones
        from jaxgen import constraints as con

        empty["constraints"], empty["constraint_start"] = con.build(
            [], writable_bytes(model.tokenizer), cfg.vocab_size, end_ids(model, defaults), rows=B, universe=constrained)
    if adapters:
        empty["adapters"] = np.zeros((B,), np.int32)
    state = prefill_jit(model.params, **place(model, empty), **prefill_statics)
    host = {k: empty[k] for k in ("sp", "max_new_tokens", "stop_ids", "seeds")}
    slot_row = [None] * B
    pending = list(rows)
    t0 = time.perf_counter()
    while pending or any(r is not None for r in slot_row):
        free = [i for i, r in enumerate(slot_row) if r is None]
        take, pending = pending[:len(free)], pending[len(free):]
        if take:
            args = request(take)
            new = prefill_jit(model.params, **place(model, args), **prefill_statics)
            b = args["prompts"].shape[0]
            dest = np.array(free[:len(take)] + [B] * (b - len(take)), np.int32)  # padding rows dropped
            state = insert_jit(state, new, dest)
            for key in host:
                src = args[key]
                host[key] = jax.tree.map(lambda h, a: _set_rows(h, dest[:len(take)], a[:len(take)]), host[key], src)
            for i, r in zip(dest, take):
                slot_row[int(i)] = r
        state = decode_jit(model.params, state, **place(model, host), until=np.int32(int(state.step) + chunk),
                           cfg=cfg, mesh=model.mesh, paths=model.paths)
        done = fetch(state.done)
        finished = [i for i, r in enumerate(slot_row) if r is not None and bool(done[i])]
        if finished:
            out = fetch(output(state))
            out = out.replace(**{f: getattr(out, f)[finished] for f in
                                 ("tokens", "num_new", "finish", "logprobs", "top_ids", "top_logprobs")})
            timing = {"elapsed_s": round(time.perf_counter() - t0, 4), "slots": B}
            cs = to_completions(model, [None] * len(finished), out, len(finished), 1,
                                [slot_row[i].get("stop", []) for i in finished], defaults.get("include_stop", False))
            emit([_line(slot_row[i], [c], timing) for i, c in zip(finished, cs)])
            for i in finished:
                slot_row[i] = None


def _planning_prefix(model, ids):
    """A SharedPrefix with its sizes only (no device state), to plan shapes before anything runs."""
    from jaxgen.generate import SharedPrefix, prefix_slots

    return SharedPrefix(ids=tuple(ids), bucket=prefix_slots(model.cfg, len(ids)), state=None, model=model.cfg.name,
                        kv_quant=model.kv_quant)


def _set_rows(h, dest, a):
    h = h.copy()
    h[dest] = a
    return h




def check_row(obj: dict, num_beams: int = 1) -> str | None:
    """The problem with a row (a JSON object with an id), or None: exactly one of prompt / messages,
    known fields only, valid values (num_beams: the flags' default for rows without their own)."""
    if ("prompt" in obj) == ("messages" in obj):
        return "give exactly one of 'prompt' or 'messages'"
    problem = (check_messages(obj["messages"]) if "messages" in obj else
               kn.text_problem(obj["prompt"], "prompt") if isinstance(obj["prompt"], str) and obj["prompt"] else
               f"prompt must be a non-empty string, got {obj['prompt']!r:.80}")
    if problem:
        return problem
    unknown = set(obj) - {"id", "prompt", "messages", *ROW_FIELDS}
    if unknown:
        return f"unknown fields {sorted(unknown)}"
    return check_fields(obj, num_beams)


def defaults_of(args) -> dict:
    """The per-row defaults the flags give (sampling knobs, stop ids, beam fields)."""
    defaults = {k: getattr(args, k) for k in SAMPLING + BEAM_FIELDS + ("max_new_tokens", "seed")}
    defaults["stop_ids"] = [] if args.ignore_stop else None
    defaults["include_stop"] = args.include_stop
    defaults["adapters"] = list((getattr(args, "adapters", None) or {}).values())  # the run's LoRA table
    return defaults


def setup(args, timings: dict | None = None):
    """Load the model of checked flags (on a mesh of the local devices when there are several, or
    --mesh): (model, speculative proposer or None)."""
    import jax

    from jaxgen.checkpoint import load
    from jaxgen.sharding import make_mesh

    proposer = None
    if args.speculative:  # static batches on one device (refill and meshes are not speculative yet)
        from jaxgen import speculative

        proposer = speculative.parse(args.speculative, mesh=args.mesh, top_logprobs=args.top_logprobs)
        args.refill = False
    mesh = None
    if not proposer and (args.mesh or jax.local_device_count() > 1):
        mesh = make_mesh(args.mesh, jax.local_devices())
    model = load(args.model, args.dtype, mesh=mesh, timings=timings, quant=args.quant, kv_quant=args.kv_quant,
                 need_tokenizer=True)
    model = dataclasses.replace(model, prefill_chunk=args.prefill_chunk)
    if proposer is not None:
        proposer = speculative.with_draft(proposer, lambda name: load(name, args.dtype, quant=args.quant))
    from jaxgen.flags import lora_specs
    from jaxgen.lora import check as check_adapter, load_lora

    if getattr(args, "adapters", None) is None:  # (the Ray stage: read here; `jaxgen batch`: by check_lora)
        args.adapters = {name: load_lora(path, name=name) for name, path in lora_specs(args).items()}
    for name, adapter in args.adapters.items():
        check_adapter(adapter, model.cfg, f"--lora {name}")
    return model, proposer


def resolve(args, model, rows: list[dict], proposer=None) -> tuple[list[dict], list[dict], dict]:
    """Each checked row's fields from the row or the flags: ids (chat template, prefix), budget, seed,
    n, beams, stop strings, constraint. Returns (runnable rows, {"id", "error"} lines for rows that
    cannot run, {prefix text: its ids})."""
    from jaxgen.constraints import to_regex
    from jaxgen.flags import constraint_regex, unescape

    default_stop = [unescape(s) for s in args.stop or ()]
    default_constraint = constraint_regex(args)
    for r in rows:  # each row's constraint as one regex (validated while reading), or the flags' default
        kind = next((k for k in kn.CONSTRAINTS if k in r), None)
        r["constraint"] = to_regex(kind, r[kind], args.json_whitespace) if kind else default_constraint
    if proposer is not None and (problem := speculative_problem(args, rows)):
        raise ValueError(problem)
    tok = model.tokenizer
    prefixes = {}  # prefix text -> its ids (encoded with BOS, as a prompt)
    ok, errors = [], []
    for r in rows:
        text = r.get("prompt")
        try:
            if "messages" in r:
                text = tok.apply_chat_template(r["messages"])
            elif args.chat:
                text = tok.apply_chat_template([{"role": "user", "content": text}])
        except ValueError as e:  # e.g. a base model without a template: this row cannot run, the others can
            errors.append({"id": r["id"], "error": str(e)})
            r["ids"] = None
            continue
        r["adapter"] = None
        if r.get("lora") is not None:
            if r["lora"] not in args.adapters:
                errors.append({"id": r["id"], "error": f"lora {r['lora']!r} is not one of the adapters given "
                               f"(--lora: {', '.join(sorted(args.adapters)) or 'none'})"})
                r["ids"] = None
                continue
            r["adapter"] = args.adapters[r["lora"]]
        r["prefix"] = r.get("prefix", args.prefix)
        if r["prefix"] is not None and r["prefix"] not in prefixes:
            prefixes[r["prefix"]] = tok.encode(r["prefix"])
        r["ids"] = tok.encode(text, add_bos=False if r["prefix"] is not None else None)
        r["max_new"] = int(r.get("max_new_tokens", args.max_new_tokens))
        r["seed"] = row_seed(int(r.get("seed", args.seed)), r["id"])
        r["n"] = int(r.get("n", 1))
        r["num_beams"] = int(r.get("num_beams", args.num_beams))
        stop = r.get("stop", default_stop)
        r["stop"] = [stop] if isinstance(stop, str) else list(stop)
    # speculative decoding verifies up to gamma + 1 tokens past a row's budget (Proposer.context)
    spec = 0 if proposer is None else proposer.gamma + 1
    context = model.cfg.max_seq_len if proposer is None else proposer.context(model.cfg)
    constraint_problem = _constraint_problems(model, defaults_of(args))
    for r in rows:
        if r["ids"] is None:
            continue
        lp = len(prefixes[r["prefix"]]) if r["prefix"] is not None else 0
        # (a beam row's own sampling fields were refused while reading; the flags' sampling defaults are
        # for sampled rows)
        if r["num_beams"] > 1 and (args.top_logprobs or proposer is not None):
            errors.append({"id": r["id"], "error": "num_beams > 1 (beam search) does not take --top-logprobs or "
                           "--speculative"})
        elif not r["ids"] or lp + len(r["ids"]) + r["max_new"] + spec > context or r["max_new"] < 1:
            what = f"prefix of {lp} tokens + " if lp else ""
            extra = f" + gamma + 1 ({spec}, --speculative)" if spec else ""
            errors.append({"id": r["id"], "error": f"{what}prompt of {len(r['ids'])} tokens + max_new_tokens "
                           f"{r['max_new']}{extra} does not fit {model.cfg.name}'s context of {context}"})
        elif r["constraint"] and (why := constraint_problem(r["constraint"])):
            errors.append({"id": r["id"], "error": why})
        else:
            ok.append(r)
    return ok, errors, prefixes


def _constraint_problems(model, defaults: dict):
    """problem(regex): why a row's constraint cannot run on this model, alone (its automaton over the
    vocabulary, its table within jaxgen.constraints' limits), or None; once per distinct regex."""
    from functools import lru_cache

    from jaxgen import constraints as con

    ends = end_ids(model, defaults)

    @lru_cache(maxsize=None)
    def problem(regex: str) -> str | None:
        try:
            return con.problem([regex], writable_bytes(model.tokenizer), model.cfg.vocab_size, ends)
        except ValueError as e:  # no token sequence of the vocabulary writes it
            return str(e)
    return problem


def plan_work(args, model, rows: list[dict], prefixes: dict) -> list[tuple]:
    """Rows sharing a prefix and a sample count (or beam bucket) run together: each group one refill
    run per length class (n == 1, --refill) or static batches (n samples or K beams per row). Returns
    [(prefix text, n, rows, refill Plan or None, static batches)]."""
    from jaxgen.generate import BEAM_BUCKETS, bucket

    memory = int(args.memory_gb * (1 << 30)) if args.memory_gb else None
    defaults = defaults_of(args)
    fits = one_call(model, end_ids(model, defaults))
    groups: dict = {}
    for r in rows:
        k = bucket(r["num_beams"], BEAM_BUCKETS, "num_beams") if r["num_beams"] > 1 else 0
        # a prefix's keys are computed with one adapter: its rows run apart by adapter
        lora = r.get("lora") if r["prefix"] is not None else None
        groups.setdefault((r["prefix"], k or r["n"], k > 0, lora), []).append(r)
    work = []
    for (pre, n, beams, _), g in groups.items():
        shared = _planning_prefix(model, prefixes[pre]) if pre is not None else None
        if args.refill and n == 1 and not beams:  # one running state per length class (and group of one_call)
            for c in (s for c in length_classes(model, g, args.batch_size, shared) for s in call_groups(c, fits)):
                work.append((pre, n, c, refill_plan(model, c, args.batch_size, memory, defaults, shared), []))
        else:
            work.append((pre, n, g, None, plan_batches(model, g, args.batch_size, memory, shared, n, fits)))
    return work


def describe(model, work: list[tuple]) -> dict:
    """The `--dry-run` summary of planned work: static batch programs and refill states."""
    from jaxgen.generate import plan

    shapes = {}
    for _, n, _, _, bs in work:
        for b in bs:
            p = plan(model.cfg, len(b), max(len(r["ids"]) for r in b), max(r["max_new"] for r in b), n=n,
                     longest_row=longest_row(b))
            shapes.setdefault((p.batch, p.prompt_len, p.max_new), 0)
            shapes[(p.batch, p.prompt_len, p.max_new)] += 1
    refills = [(len(w[2]), w[3]) for w in work if w[3] is not None]
    return {"groups": len(work), "batches": sum(len(w[4]) for w in work), "programs": [
        {"batch": b, "prompt_len": t, "max_new": m, "batches": c} for (b, t, m), c in sorted(shapes.items())],
        # with --refill (the default) there are no static batches: one running state
        # of this shape decodes, and waiting rows are prefilled into its free slots
        "refill": [{"rows": k, "slots": r.batch, "cache_len": r.cache_len, "max_new": r.max_new,
                    "penalties": r.penalties} for k, r in refills] or None}


def execute(args, model, work: list[tuple], prefixes: dict, emit, proposer=None):
    """Run the planned work, passing each finished group of output lines to emit(lines)."""
    from jaxgen.flags import CHUNK_STEPS
    from jaxgen.generate import prefill_prefix

    defaults = defaults_of(args)
    shared = {}
    for pre, n, rows, refill, batches in work:
        key = (pre, rows[0].get("lora") if pre is not None else None)  # (plan_work: one adapter per prefix group)
        if pre is not None and key not in shared:  # prefilled once for all its rows
            shared[key] = prefill_prefix(model, prefixes[pre], lora=rows[0]["adapter"])
        if refill:
            rows = sorted(rows, key=lambda r: -len(r["ids"]))
            run_refill(model, rows, defaults, refill, args.chunk_steps or CHUNK_STEPS["batch"], args.top_logprobs, emit,
                       shared.get(key))
        for b in batches:
            emit(run_batch(model, b, defaults, args.top_logprobs, proposer, shared.get(key), n))
