"""Command line: `jaxgen generate` (streams text, or --json) and `jaxgen convert` (GGUF -> Orbax)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def _add_sampling_flags(p: argparse.ArgumentParser):
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable; \\n and \\t are read as newline and tab): the text ends "
                        "right before it")
    p.add_argument("--include-stop", action="store_true", help="keep the matched stop string in the text")
    p.add_argument("--prefix", default=None, metavar="TEXT",
                   help="a prefix every prompt continues, prefilled once (encoded with BOS, prompts without)")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--regex", default=None, help="structured output: the text matches this regex whole")
    c.add_argument("--json-schema", default=None, metavar="FILE",
                   help="structured output: JSON text valid under the JSON schema in FILE (compact)")
    c.add_argument("--choice", action="append", default=None, metavar="TEXT",
                   help="structured output: the text is one of the --choice values (repeatable)")
    p.add_argument("--json-whitespace", default=None, metavar="REGEX",
                   help="with --json-schema: whitespace allowed between JSON tokens (default: none)")
    b = p.add_argument_group("beam search (deterministic; HF transformers' semantics, see jaxgen.beam)")
    b.add_argument("--num-beams", type=_positive, default=1, metavar="K", help="beams per prompt (default 1: no beam search)")
    b.add_argument("--length-penalty", type=float, default=1.0, metavar="X",
                   help="a finished beam scores sum(logprobs) / new_tokens ** X (default 1.0)")
    b.add_argument("--early-stopping", nargs="?", const=True, default=False, choices=[True, "never"],
                   type=lambda v: v if v == "never" else _bad_early_stopping(v),
                   help="stop a prompt at K finished beams; 'never': only when no beam can improve")
    b.add_argument("--return-beams", action="store_true", help="output all K beams with their scores, best first")


def _bad_early_stopping(value: str):
    raise argparse.ArgumentTypeError(f"--early-stopping takes no value or 'never', got {value!r}")


def constraint_args(args) -> dict:
    """The constraint knobs of generate / batch from the flags, validated before anything loads."""
    from jaxgen.constraints import to_regex

    if args.json_schema is not None:
        try:
            text = open(args.json_schema, encoding="utf-8").read()
        except OSError as e:
            raise ValueError(f"--json-schema {args.json_schema}: {e.strerror}") from None
        regex = to_regex("json_schema", text, args.json_whitespace)
    elif args.regex is not None:
        regex = to_regex("regex", args.regex)
    elif args.choice is not None:
        regex = to_regex("choices", [unescape(c) for c in args.choice])
    else:
        return {}
    return {"regex": regex}


def unescape(s: str) -> str:
    """--stop "\\n\\n" means two newlines (a shell passes the backslashes through)."""
    return s.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def build_parser() -> argparse.ArgumentParser:
    from jaxgen.checkpoint import DEFAULT_MODEL, MODELS

    ap = argparse.ArgumentParser(prog="jaxgen", description="Autoregressive generation in JAX.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate continuations of prompts")
    g.add_argument("prompts", nargs="*", help="prompts; if none, read stdin (one per line)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a registry name ({', '.join(sorted(MODELS))}) or a .gguf / Orbax path")
    g.add_argument("--config", default=None, help="preset name or .toml for a .gguf no preset matches")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: float32 on CPU (exact reference text), bfloat16 on GPU/TPU")
    _add_sampling_flags(g)
    g.add_argument("--mesh", default=None, help="shard over devices, e.g. data=2,model=4 (default: one device)")
    _quant_args(g)
    g.add_argument("--speculative", default=None, metavar="SPEC",
                   help="speculative decoding: draft=MODEL,gamma=4 or lookup,ngram=3,gamma=8 (exact; not streamed)")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--system", default=None, help="system message for --chat")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.add_argument("--json-input", action="store_true", help="stdin lines are JSON strings")
    g.add_argument("--ignore-stop", action="store_true",
                   help="ignore the end-of-sequence ids (stop strings still stop)")
    g.add_argument("--top-logprobs", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="samples per prompt, from one prefill of it (default 1)")
    g.add_argument("--chunk-steps", type=int, default=4, help="decode steps between streamed outputs")

    b = sub.add_parser("batch", help="generate for a JSONL file of prompts (resumable, sharded)")
    b.add_argument("--input", required=True, help="JSONL: {id, prompt | messages, overrides...} per line")
    b.add_argument("--output", required=True, help="JSONL results, appended; rerun to resume")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    b.add_argument("--mesh", default=None, help="e.g. data=2,model=4 (default: all local devices on data)")
    _quant_args(b)
    b.add_argument("--speculative", default=None, metavar="SPEC",
                   help="draft=MODEL,gamma=4 or lookup,ngram=3,gamma=8 (static batches on one device)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--memory-gb", type=float, default=None, help="cap on the KV cache of one batch")
    _add_sampling_flags(b)
    b.add_argument("--chat", action="store_true", help="apply the chat template to 'prompt' rows")
    b.add_argument("--ignore-stop", action="store_true")
    b.add_argument("--top-logprobs", type=int, default=0)
    b.add_argument("--on-error", choices=["fail", "skip"], default="fail", help="on a malformed input line")
    b.add_argument("--dry-run", action="store_true", help="print the batch plan and compiled programs only")
    b.add_argument("--refill", action=argparse.BooleanOptionalAction, default=True,
                   help="continuous batching: refill finished slots between decode chunks (default on)")
    b.add_argument("--chunk-steps", type=int, default=8, help="decode steps between refills")
    b.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host: run on every host)")

    c = sub.add_parser("convert", help="write a model as an Orbax checkpoint (params + config + tokenizer)")
    c.add_argument("src", help="registry name or .gguf path")
    c.add_argument("dst", help="new directory")
    c.add_argument("--config", default=None, help="preset name or .toml for a .gguf no preset matches")
    c.add_argument("--quant", default=None, choices=["int8", "int4"],
                   help="write weight-only quantized params (int8 / int4, groups of 32)")
    return ap


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _quant_args(p):
    from jaxgen.model import PREFILL_CHUNK

    p.add_argument("--quant", default=None, choices=["int8", "int4"],
                   help="weight-only quantization in groups of 32 inputs: int8 or int4 (default: none)")
    p.add_argument("--kv-quant", default=None, choices=["int8"], help="store the KV cache in int8 (default: dtype)")
    p.add_argument("--prefill-chunk", type=_positive, default=PREFILL_CHUNK, metavar="N",
                   help=f"prompt tokens per prefill pass (default {PREFILL_CHUNK}; memory grows with it, not "
                        "with the prompt)")


TIMING_KEYS = ("load_s", "compile_s", "prefill_s", "decode_s", "new_tokens")  # every --json path's "timing"


def _timing_line(t: dict) -> str:
    return (f"{t['new_tokens']} tokens; load {t['load_s']:.2f}s, compile {t['compile_s']:.2f}s, "
            f"prefill {t['prefill_s']:.3f}s, decode {t['decode_s']:.2f}s")


def _generate_speculative(args, model, texts, prompts, request, timings, proposer) -> int:
    from jaxgen import speculative
    from jaxgen.checkpoint import load

    proposer = speculative.with_draft(proposer, lambda name: load(name, args.dtype, quant=args.quant))
    outs, stats = speculative.generate(model, texts, proposer, timings=timings, **request)
    spec = {"target_passes": stats.passes, "drafted": stats.drafted, "accepted": stats.accepted,
            "acceptance_rate": stats.acceptance_rate, "tokens_per_pass": stats.tokens_per_pass, "gamma": stats.gamma}
    for p, o in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": p, **o.fields(), "timing": {k: timings[k] for k in TIMING_KEYS},
                              "speculative": spec}, ensure_ascii=False))
        else:
            print(o.text if len(prompts) == 1 else f"--- {p!r}\n{o.text}")
    print(f"[{_timing_line(timings)}; {stats.tokens_per_pass:.2f} tokens per target pass, acceptance "
          f"{100 * stats.acceptance_rate:.0f}% of {stats.drafted} drafted tokens (gamma={stats.gamma})]", file=sys.stderr)
    return 0


def _check_beam_flags(args):
    """Beam search is deterministic: refuse the flags it would ignore, before the model loads."""
    from jaxgen.generate import BEAM_BUCKETS, NO_BEAM_KNOBS, bucket

    bucket(args.num_beams, BEAM_BUCKETS, "--num-beams")
    sampled = [f"--{k.replace('_', '-')}" for k, off in NO_BEAM_KNOBS.items() if getattr(args, k, off) != off]
    sampled += ["--speculative"] if getattr(args, "speculative", None) else []
    if sampled:
        raise ValueError(f"--num-beams {args.num_beams} (beam search) does not take {', '.join(sampled)}")


def _generate_beams(args, model, texts, prompts, request, timings) -> int:
    import time

    from jaxgen.generate import generate_beams

    t = time.perf_counter()
    request = {k: v for k, v in request.items() if k not in ("seed", "temperature", "top_k", "top_p", "min_p",
                                                             "repetition_penalty", "presence_penalty", "frequency_penalty")}
    out = generate_beams(model, texts, num_beams=args.num_beams, length_penalty=args.length_penalty,
                         early_stopping=args.early_stopping, return_beams=args.return_beams,
                         include_stop=args.include_stop, **request)
    timings["generate_s"] = time.perf_counter() - t  # compile included: beam search is not streamed
    k = args.num_beams if args.return_beams else 1
    for i, c in enumerate(out):
        p = prompts[i // k]
        if args.json:
            beam = {"beam": c.sample} if args.return_beams else {}
            print(json.dumps({"prompt": p, **beam, **c.fields(), "timing": {
                "load_s": timings.get("load_s"), "generate_s": timings["generate_s"]}}, ensure_ascii=False))
        elif len(out) == 1:
            print(c.text)
        else:
            print(f"--- {p!r}" + (f" beam {c.sample} (score {c.score:.4f})" if args.return_beams else "") + f"\n{c.text}")
    n_tok = sum(len(c.tokens) for c in out)
    print(f"[{n_tok} tokens in {k} beam(s) per prompt; load {timings.get('load_s', 0):.2f}s, beam search "
          f"{timings['generate_s']:.2f}s (compile included)]", file=sys.stderr)
    return 0


def _read_prompts(args) -> list[str]:
    if args.prompts:
        return list(args.prompts)
    if sys.stdin is None or sys.stdin.isatty():
        raise SystemExit("jaxgen generate: give a prompt, or pipe prompts on stdin (one per line)")
    prompts = []
    for n, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if args.json_input:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"jaxgen generate: stdin line {n} is not valid JSON ({e.msg})")
            if not isinstance(value, str):
                raise SystemExit(f"jaxgen generate: stdin line {n} must be a JSON string, got {type(value).__name__}")
            line = value
        prompts.append(line)
    if not prompts:
        raise SystemExit("jaxgen generate: no prompts on stdin")
    return prompts


def cmd_generate(args) -> int:

    from jaxgen.checkpoint import load
    from jaxgen.generate import stream, to_completions
    from jaxgen.sampling import make_sampling_params

    prompts = _read_prompts(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.n > 1 and args.speculative:
        raise ValueError("--n > 1 does not combine with --speculative yet")
    knobs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                 frequency_penalty=args.frequency_penalty)
    make_sampling_params(len(prompts), **knobs)  # bad knobs fail here, before the model loads
    if args.num_beams > 1:
        _check_beam_flags(args)
    proposer = None
    if args.speculative:  # likewise a bad --speculative
        from jaxgen import speculative

        proposer = speculative.parse(args.speculative, mesh=args.mesh, top_logprobs=args.top_logprobs)
    timings: dict = {}
    constraint = constraint_args(args)  # a bad regex / schema fails here, before the model loads
    if constraint and proposer is not None:
        raise ValueError("--speculative does not take --regex / --json-schema / --choice yet")
    mesh = None
    if args.mesh:
        from jaxgen.sharding import make_mesh

        mesh = make_mesh(args.mesh)  # a bad mesh fails here, before the model loads
    model = load(args.model, args.dtype, config=args.config, mesh=mesh, timings=timings, quant=args.quant,
                 kv_quant=args.kv_quant)
    model = dataclasses.replace(model, prefill_chunk=args.prefill_chunk)
    tok = model.tokenizer
    texts = prompts
    if args.chat:
        msgs = lambda p: ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": p}]
        texts = [tok.apply_chat_template(msgs(p)) for p in prompts]
    stops = [unescape(s) for s in args.stop or ()]
    request = dict(max_new_tokens=args.max_new_tokens, seed=args.seed,
                   stop_ids=[] if args.ignore_stop else None, stop=stops or None, **knobs, **constraint)
    if args.prefix is not None:
        if proposer is not None:
            raise ValueError("--prefix does not combine with --speculative yet")
        request["prefix"] = args.prefix
    if proposer is not None:
        request["include_stop"] = args.include_stop
        return _generate_speculative(args, model, texts, prompts, request, timings, proposer)
    if args.num_beams > 1:
        return _generate_beams(args, model, texts, prompts, request, timings)
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
    for out in stream(model, texts, chunk_steps=args.chunk_steps if streaming else 1 << 30,
                      top_logprobs=args.top_logprobs, timings=timings, n=k_samples, **request):
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
        print(json.dumps({"prompt": c.prompt, **sample, **c.fields(), "timing": {k: timings[k] for k in TIMING_KEYS}},
                         ensure_ascii=False))
    return 0


def _row(out, i):
    """Row i of a host GenerateOutput, as a one-row output."""
    return out.replace(**{f: getattr(out, f)[i:i + 1] for f in
                          ("tokens", "num_new", "finish", "logprobs", "top_ids", "top_logprobs")})


def cmd_batch(args) -> int:
    from jaxgen import batch
    from jaxgen.sampling import make_sampling_params

    if args.batch_size < 1 or args.chunk_steps < 1:
        raise ValueError(f"--batch-size and --chunk-steps must be >= 1, got {args.batch_size}, {args.chunk_steps}")
    make_sampling_params(1, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                         repetition_penalty=args.repetition_penalty)  # bad knobs fail before loading
    if args.num_beams > 1:
        _check_beam_flags(args)
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


def _persistent_compile_cache():
    """Keep compiled programs on disk (JAX's persistent compilation cache, under jaxgen's cache dir),
    so a second `jaxgen generate` of the same shapes loads them instead of compiling (the README's
    Command line section has the figures). JAXGEN_COMPILE_CACHE=0 turns it off; a cache dir the user
    configured is kept."""
    import jax

    from jaxgen.checkpoint.registry import cache_dir

    if os.environ.get("JAXGEN_COMPILE_CACHE", "1") != "0" and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))


def main(argv=None) -> int:
    from jaxgen.checkpoint import ModelNotInstalledError

    args = build_parser().parse_args(argv)
    if argv is None:  # run as the `jaxgen` program (tests call main(argv) and count compilations)
        _persistent_compile_cache()
    try:
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
        print(f"jaxgen {args.command}: out of memory: {_first_line(e)}\n  lower the work per step: "
              f"{_LOWER[args.command]}", file=sys.stderr)
        return 3


_LOWER = {"generate": "fewer prompts or a smaller --max-new-tokens, or --quant int8 / --kv-quant int8",
          "batch": "a smaller --batch-size, --memory-gb or --max-new-tokens, or --quant int8 / --kv-quant int8",
          "convert": "convert with --quant int8 (quantizes tensor by tensor)"}


def _out_of_memory(e: BaseException) -> bool:
    """XLA reports a failed device allocation as RESOURCE_EXHAUSTED (a RuntimeError); numpy / the
    host allocator as MemoryError."""
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
