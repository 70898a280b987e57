"""Command line: `jaxgen generate` (streams text, or --json), `jaxgen batch` (a JSONL file, resumable)
and `jaxgen convert` (GGUF -> Orbax). The flags and their checks are `jaxgen.flags`."""
from __future__ import annotations

import dataclasses
import json
import sys

from jaxgen import flags
from jaxgen import knobs as kn
from jaxgen.errors import first_line
from jaxgen.flags import build_parser, unescape  # noqa: F401  (the parser and --stop's escapes)


TIMING_KEYS = ("load_s", "compile_s", "prefill_s", "decode_s", "new_tokens")  # every --json path's "timing"


def _timing_line(t: dict) -> str:
    return (f"{t['new_tokens']} tokens; load {t['load_s']:.2f}s, compile {t['compile_s']:.2f}s, "
            f"prefill {t['prefill_s']:.3f}s, decode {t['decode_s']:.2f}s")


def _print_json(obj: dict):
    print(json.dumps(obj, ensure_ascii=False))


def _generate_speculative(args, model, texts, prompts, request, timings, proposer) -> int:
    from jaxgen import speculative
    from jaxgen.checkpoint import load

    proposer = speculative.with_draft(proposer, lambda name: load(name, args.dtype, quant=args.quant))
    request = {k: v for k, v in request.items() if k not in kn.BEAM_KNOBS + ("n", "prefix")}  # refused before loading
    outs, stats = speculative.generate(model, texts, proposer, timings=timings, **request)
    spec = {"target_passes": stats.passes, "drafted": stats.drafted, "accepted": stats.accepted,
            "acceptance_rate": stats.acceptance_rate, "tokens_per_pass": stats.tokens_per_pass, "gamma": stats.gamma}
    for p, o in zip(prompts, outs):
        if args.json:
            _print_json({"prompt": p, **o.fields(), "timing": {k: timings[k] for k in TIMING_KEYS}, "speculative": spec})
        else:
            print(o.text if len(prompts) == 1 else f"--- {p!r}\n{o.text}")
    print(f"[{_timing_line(timings)}; {stats.tokens_per_pass:.2f} tokens per target pass, acceptance "
          f"{100 * stats.acceptance_rate:.0f}% of {stats.drafted} drafted tokens (gamma={stats.gamma})]", file=sys.stderr)
    return 0


def _generate_beams(args, model, texts, prompts, request, timings) -> int:
    from jaxgen.generate import generate_beams

    request = {k: v for k, v in request.items() if kn.KNOBS[k].beam != "no"}  # (flags.check refused any given)
    out = generate_beams(model, texts, timings=timings, **request)
    k = args.num_beams if args.return_beams else 1
    for i, c in enumerate(out):
        p = prompts[i // k]
        if args.json:
            beam = {"beam": c.sample} if args.return_beams else {}
            _print_json({"prompt": p, **beam, **c.fields(), "timing": {key: timings[key] for key in TIMING_KEYS}})
        elif len(out) == 1:
            print(c.text)
        else:
            print(f"--- {p!r}" + (f" beam {c.sample} (score {c.score:.4f})" if args.return_beams else "") + f"\n{c.text}")
    print(f"[{_timing_line(timings)}; {k} beam(s) per prompt]", file=sys.stderr)
    return 0


def _read_prompts(args) -> list[str]:
    if args.prompts:
        for i, p in enumerate(args.prompts, 1):
            if problem := kn.text_problem(p, f"prompt {i}"):
                raise ValueError(problem)
        return list(args.prompts)
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("give a prompt, or pipe prompts on stdin (one per line)")
    prompts = []
    for n, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if args.json_input:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"stdin line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(value, str):
                raise ValueError(f"stdin line {n} must be a JSON string, got {type(value).__name__}")
            line = value
        if problem := kn.text_problem(line, f"stdin line {n}"):
            raise ValueError(problem)
        prompts.append(line)
    if not prompts:
        raise ValueError("no prompts on stdin (every line was empty)")
    return prompts


def request_of(args, regex: str | None) -> dict:
    """The `generate` keywords that the generate command's flags give (every knob flag, by its
    jaxgen.knobs name; the constraint flags as their one regex; --ignore-stop as stop_ids=[])."""
    request = {k.name: flags.knob_value(args, k) for k in kn.KNOBS.values() if k.flag and "generate" in k.commands}
    for name in kn.CONSTRAINTS + ("whitespace",):
        del request[name]
    if regex is not None:
        request["regex"] = regex
    request["stop_ids"] = [] if args.ignore_stop else None
    return request


def cmd_generate(args) -> int:
    from jaxgen.checkpoint import load
    from jaxgen.generate import stream, to_completions

    # everything that needs no model is checked first: a bad flag costs no load
    prompts = _read_prompts(args)
    flags.check(args, "generate")
    if problem := kn.rows_per_call(len(prompts), args.n):
        raise ValueError(problem)
    proposer = None
    if args.speculative:
        from jaxgen import speculative

        proposer = speculative.parse(args.speculative, mesh=args.mesh, top_logprobs=args.top_logprobs)
        for flag, given in (("--n", args.n > 1), ("--prefix", args.prefix is not None)):
            if given:
                raise ValueError(f"{flag} does not combine with --speculative yet")
    constraint = flags.constraint_regex(args)
    if constraint and proposer is not None:
        raise ValueError("--speculative does not take --regex / --json-schema / --choice yet")
    adapter = None
    if specs := flags.lora_specs(args):  # (one: flags.check) read before the model loads; applied to every prompt
        from jaxgen.lora import load_lora

        (name, path), = specs.items()
        adapter = load_lora(path, name=name)
    mesh = None
    if args.mesh:
        from jaxgen.sharding import make_mesh

        mesh = make_mesh(args.mesh)
    timings: dict = {}
    model = load(args.model, args.dtype, config=args.config, mesh=mesh, timings=timings, quant=args.quant,
                 kv_quant=args.kv_quant, need_tokenizer=True)
    model = dataclasses.replace(model, prefill_chunk=args.prefill_chunk)
    tok = model.tokenizer
    texts = prompts
    if args.chat:
        msgs = lambda p: ([{"role": "system", "content": args.system}] if args.system is not None else []) + [
            {"role": "user", "content": p}]
        texts = [tok.apply_chat_template(msgs(p)) for p in prompts]
    request = request_of(args, constraint)
    request["lora"] = adapter
    if adapter is not None:
        from jaxgen.lora import check as check_adapter

        check_adapter(adapter, model.cfg)
    if proposer is not None:
        return _generate_speculative(args, model, texts, prompts, request, timings, proposer)
    if args.num_beams > 1:
        return _generate_beams(args, model, texts, prompts, request, timings)
    stops = request["stop"] or []
    k_samples = args.n
    n = len(prompts) * k_samples  # output rows: sample j of prompt p is row p * k_samples + j
    label = lambda i: f"{prompts[i // k_samples]!r}" + (f" sample {i % k_samples}" if k_samples > 1 else "")
    streaming = not args.json
    decoders = [tok.stream_decoder() for _ in range(n)]
    sent = [0] * n
    printed_done = [False] * n
    out = None
    # Streamed text holds back what could still turn out to be the start of a stop string.
    hold = max((len(s) for s in stops), default=1) - 1
    acc, shown = "", 0

    def final_text(i):
        return to_completions(model, prompts, _row(out, i), 1, 1, [stops], args.include_stop)[0].text
    chunk_steps = (args.chunk_steps or flags.CHUNK_STEPS["generate"]) if streaming else 1 << 30  # --json: one chunk
    for out in stream(model, texts, chunk_steps=chunk_steps, timings=timings, **request):
        if not streaming:
            continue
        for i in range(n):
            k = int(out.num_new[i])
            done = int(out.finish[i]) > 0
            body_end = k - 1 if int(out.finish[i]) == 1 else k  # the stop token is not text
            new = decoders[i].push(out.tokens[i, sent[i]:body_end]) if body_end > sent[i] else ""
            sent[i] = max(sent[i], body_end)
            if n == 1:
                acc += new
                if done:  # the whole text is known: cut at a stop string, if one ended it
                    text = final_text(0)
                    sys.stdout.write(text[shown:] + "\n")
                else:
                    safe = max(shown, len(acc) - hold)
                    sys.stdout.write(acc[shown:safe])
                    shown = safe
                sys.stdout.flush()
            elif done and not printed_done[i]:  # several prompts: each is printed when it finishes
                printed_done[i] = True
                sys.stdout.write(f"--- [{i}] {label(i)}\n{final_text(i)}\n")
                sys.stdout.flush()
    if streaming:
        if n == 1 and int(out.finish[0]) == 0:
            sys.stdout.write((acc + decoders[0].flush())[shown:] + "\n")
        for i in range(n):
            if n > 1 and not printed_done[i]:
                sys.stdout.write(f"--- [{i}] {label(i)}\n{final_text(i)}\n")
        print(f"[{_timing_line(timings)}]", file=sys.stderr)
        return 0
    for c in to_completions(model, prompts, out, n, k_samples, [stops] * n, args.include_stop):
        sample = {"sample": c.sample} if k_samples > 1 else {}
        _print_json({"prompt": c.prompt, **sample, **c.fields(), "timing": {k: timings[k] for k in TIMING_KEYS}})
    return 0


def _row(out, i):
    """Row i of a host GenerateOutput, as a one-row output."""
    return out.replace(**{f: getattr(out, f)[i:i + 1] for f in
                          ("tokens", "num_new", "finish", "logprobs", "top_ids", "top_logprobs")})


def cmd_batch(args) -> int:
    from jaxgen import batch

    flags.check(args, "batch")
    if args.distributed:
        import jax

        jax.distributed.initialize()  # TPU pods / SLURM / coordinator env vars: no arguments needed
    return batch.main(args)


def cmd_convert(args) -> int:
    from jaxgen.checkpoint import load
    from jaxgen.checkpoint.orbax import save

    model = load(args.src, config=args.config, use_cache=False, quant=args.quant)
    path = save(args.dst, model.cfg, model.params, model.tokenizer)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from jaxgen.checkpoint import ModelNotInstalledError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad argument (one line on stderr, 2) or --help (0): the status, as for any input
        return e.code
    if argv is None:  # run as the `jaxgen` program (tests call main(argv) and count compilations)
        from jaxgen.checkpoint.registry import persistent_compile_cache

        persistent_compile_cache()
    try:
        from jaxgen import backend

        backend.check_env()  # a bad JAXGEN_PATHS is one line before any model loads
        return {"generate": cmd_generate, "convert": cmd_convert, "batch": cmd_batch}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, ModelNotInstalledError) as e:
        # Bad input is reported as one line naming the problem, not a traceback.
        print(f"jaxgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from jaxgen.batch import OutputError

        if not isinstance(e, OutputError):
            raise
        print(f"jaxgen {args.command}: error: {e.strerror}", file=sys.stderr)  # what was written is whole
        return 1
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise  # an unexpected failure is a bug, not bad input: keep its traceback
        print(f"jaxgen {args.command}: out of memory: {first_line(e, 300)}\n  lower the work per step: "
              f"{_LOWER[args.command]}", file=sys.stderr)
        return 3


_LOWER = {"generate": "fewer prompts or a smaller --max-new-tokens, or --quant int8 / --kv-quant int8",
          "batch": "a smaller --batch-size, --memory-gb or --max-new-tokens, or --quant int8 / --kv-quant int8",
          "convert": "convert with --quant int8 (quantizes tensor by tensor)"}


def _out_of_memory(e: BaseException) -> bool:
    """XLA reports a failed device allocation as RESOURCE_EXHAUSTED (a RuntimeError); numpy / the
    host allocator as MemoryError."""
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def entry() -> int:
    """The `jaxgen` command: `main`, and after its one-line error (exit 2) nothing more on stderr while the
    process ends: a library's background threads may still print (Orbax's other reads of a damaged
    checkpoint fail alike, each with a page of TensorStore spec)."""
    rc = main()
    if rc == 2:
        import os

        sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    return rc


if __name__ == "__main__":
    sys.exit(entry())
