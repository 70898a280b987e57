"""The command-line flags of `jaxgen generate`, `jaxgen batch` and `jaxgen convert`, and their checks.

The request knobs' flags are derived from `jaxgen.knobs` (name, type, default, help); the rest are the
front ends' own options (which model, how to load it, how to run a batch). `check` refuses every bad
value and every flag that would be ignored, before anything loads. `jaxgen.cli` parses with
`build_parser`; the Ray stage (`jaxgen.ray`) takes batch's flags as options by their Python names
and checks them with the same `check`, so a flag means the same everywhere.
"""
from __future__ import annotations

import argparse
import math

from jaxgen import knobs as kn

# --chunk-steps when not given: generate's decode steps between streamed outputs, batch's between refills.
# (None in the parsed flags, so that `check` can refuse the flag where nothing would use it.)
CHUNK_STEPS = {"generate": 4, "batch": 8}


class Parser(argparse.ArgumentParser):
    """argparse, reporting a bad argument as one line (exit 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class RaisingParser(Parser):
    """The same parser for callers that are not the command line (the Ray stage): a ValueError."""

    def error(self, message: str):
        raise ValueError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def add_knob_flags(p: argparse.ArgumentParser, command: str):
    """The flags of the request knobs that `command` has, from the table in `jaxgen.knobs`."""
    constraint = p.add_mutually_exclusive_group()  # one constraint per request
    beam = p.add_argument_group("beam search (deterministic; HF transformers' semantics, see jaxgen.beam)")
    for k in kn.KNOBS.values():
        if k.flag is None or command not in k.commands:
            continue
        group = constraint if k.name in kn.CONSTRAINTS else beam if k.beam == "only" or k.name == "num_beams" else p
        kw = dict(dest=k.dest, default=k.default, help=k.help)
        if k.metavar:
            kw["metavar"] = k.metavar
        if k.kind == "int":
            kw["type"] = int
        elif k.kind == "float":
            kw["type"] = float
        elif k.kind == "bool":
            kw["action"] = "store_true"
        elif k.kind == "early_stopping":  # a switch, or 'never' (another value: refused by `check`)
            kw.update(nargs="?", const=True, metavar="never")
        elif k.kind in ("strings", "choices", "adapter"):
            kw.update(action="append", default=None)
        group.add_argument(k.flag, **kw)


def add_model_flags(p: argparse.ArgumentParser, generate: bool):
    """Which model and how it loads and runs (`jaxgen generate` and `jaxgen batch`)."""
    from jaxgen.checkpoint.registry import DEFAULT_MODEL, MODELS
    from jaxgen.model import PREFILL_CHUNK

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a registry name ({', '.join(sorted(MODELS))}), a .gguf file, an HF checkpoint directory "
                        f"(config.json + safetensors) or an Orbax checkpoint directory")
    if generate:
        p.add_argument("--config", default=None, help="preset name or .toml for a .gguf no preset matches")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: an HF directory's own dtype; else float32 on CPU (exact reference text), "
                        "bfloat16 on GPU/TPU")
    p.add_argument("--mesh", default=None, help="shard over devices, e.g. data=2,model=4 (default: "
                   + ("one device)" if generate else "all local devices on data)"))
    p.add_argument("--quant", default=None, choices=["int8", "int4"],
                   help="weight-only quantization in groups of 32 inputs: int8 or int4 (default: none)")
    p.add_argument("--kv-quant", default=None, choices=["int8"], help="store the KV cache in int8 (default: dtype)")
    p.add_argument("--prefill-chunk", type=positive_int, default=PREFILL_CHUNK, metavar="N",
                   help=f"prompt tokens per prefill pass (default {PREFILL_CHUNK}; memory grows with it, not "
                        "with the prompt)")
    p.add_argument("--speculative", default=None, metavar="SPEC",
                   help="speculative decoding: draft=MODEL,gamma=4 or lookup,ngram=3,gamma=8 (exact; "
                   + ("not streamed)" if generate else "static batches on one device)"))


def build_parser(raise_errors: bool = False) -> argparse.ArgumentParser:
    """The `jaxgen` parser; its subcommands' parsers are `.commands[name]`."""
    ap = (RaisingParser if raise_errors else Parser)(prog="jaxgen", description="Autoregressive generation in JAX.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate continuations of prompts")
    g.add_argument("prompts", nargs="*", help="prompts; if none, read stdin (one per line)")
    add_model_flags(g, generate=True)
    add_knob_flags(g, "generate")
    g.add_argument("--ignore-stop", action="store_true", help="ignore the end-of-sequence ids (stop strings still stop)")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--system", default=None, help="system message for --chat")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.add_argument("--json-input", action="store_true", help="stdin lines are JSON strings")
    g.add_argument("--chunk-steps", type=positive_int, default=None,
                   help=f"decode steps between streamed outputs (default {CHUNK_STEPS['generate']}; streamed text "
                        "only: not --json, --num-beams or --speculative)")

    b = sub.add_parser("batch", help="generate for a JSONL file of prompts (resumable, sharded)")
    b.add_argument("--input", required=True, help="JSONL: {id, prompt | messages, per-row fields...} per line")
    b.add_argument("--output", required=True, help="JSONL results, appended; rerun to resume")
    add_model_flags(b, generate=False)
    add_knob_flags(b, "batch")
    b.add_argument("--ignore-stop", action="store_true", help="ignore the end-of-sequence ids (stop strings still stop)")
    b.add_argument("--batch-size", type=positive_int, default=8)
    b.add_argument("--memory-gb", type=positive_float, default=None, help="cap on the KV cache of one batch")
    b.add_argument("--chat", action="store_true", help="apply the chat template to 'prompt' rows")
    b.add_argument("--on-error", choices=["fail", "skip"], default="fail", help="on a malformed input line")
    b.add_argument("--dry-run", action="store_true", help="print the batch plan and compiled programs only")
    b.add_argument("--refill", action=argparse.BooleanOptionalAction, default=True,
                   help="continuous batching: refill finished slots between decode chunks (default on)")
    b.add_argument("--chunk-steps", type=positive_int, default=None,
                   help=f"decode steps between refills (default {CHUNK_STEPS['batch']}; with --refill)")
    b.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host: run on every host)")

    c = sub.add_parser("convert", help="write a model as an Orbax checkpoint (params + config + tokenizer)")
    c.add_argument("src", help="registry name, .gguf path or HF checkpoint directory")
    c.add_argument("dst", help="new directory")
    c.add_argument("--config", default=None, help="preset name or .toml for a .gguf no preset matches")
    c.add_argument("--quant", default=None, choices=["int8", "int4"],
                   help="write weight-only quantized params (int8 / int4, groups of 32)")
    ap.commands = {"generate": g, "batch": b, "convert": c}
    return ap


def unescape(s: str) -> str:
    """--stop "\\n\\n" means two newlines (a shell passes the backslashes through)."""
    return s.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def knob_value(args, k: kn.Knob):
    """The value a knob's flag gives (its default when not given), as the API takes it."""
    v = getattr(args, k.dest)
    if k.kind in ("strings", "choices") and v is not None:
        v = [unescape(s) for s in v]
    return v


def given(args, command: str) -> dict:
    """The knobs `command`'s flags give other than their defaults, by name (values as the API takes them)."""
    out = {}
    for k in kn.KNOBS.values():
        if k.flag is None or command not in k.commands:
            continue
        v = knob_value(args, k)
        if v is not None and (isinstance(v, list) or not kn.is_off(k.name, v) or type(v) is not type(k.default)):
            out[k.name] = v
    return out


def check(args, command: str, options: bool = False) -> dict:
    """Refuse, as one ValueError line, every bad value of `command`'s flags and every flag that would be
    ignored, before anything loads. Returns `given(args, command)`. Messages name a flag as `--flag`, or
    with options=True by its Python name (the Ray stage's options)."""
    name = lambda flag: flag[2:].replace("-", "_") if options else flag
    label = lambda knob: name(kn.KNOBS[knob].flag)
    given_knobs = given(args, command)
    for knob, v in given_knobs.items():
        if kn.KNOBS[knob].kind == "schema" and isinstance(v, str):
            continue  # a file: read and checked by `constraint_regex`
        if kn.KNOBS[knob].kind == "adapter":
            continue  # NAME=DIR specs: checked by `lora_specs`
        if problem := kn.problem(knob, v, label(knob), candidates=kn.DEFAULT_CANDIDATES):  # (the flags' candidates)
            raise ValueError(problem)
    if given_knobs.get("num_beams", 1) > 1:
        refused = [label(n) for n in given_knobs if kn.KNOBS[n].beam == "no"]
        refused += [name("--speculative")] if getattr(args, "speculative", None) else []
        if refused:
            raise ValueError(f"{label('num_beams')} {given_knobs['num_beams']} (beam search) does not take "
                             f"{', '.join(refused)}")
    elif command == "generate":  # (a batch's rows may ask for beam search: `batch_run.check_flags` sees them)
        if only := [label(n) for n in given_knobs if kn.KNOBS[n].beam == "only"]:
            raise ValueError(f"{kn.only_for_beams(only)} ({label('num_beams')} > 1)")
        if "whitespace" in given_knobs and "json_schema" not in given_knobs:
            raise ValueError(f"{label('whitespace')} only applies with {label('json_schema')}")
        if getattr(args, "system", None) is not None and not args.chat:
            raise ValueError("--system only applies with --chat (it is the chat template's system message)")
        if problem := kn.text_problem(getattr(args, "system", None), "--system"):
            raise ValueError(problem)
        if "top_logprobs" in given_knobs and not args.json:
            raise ValueError(f"{label('top_logprobs')} only applies with --json (streamed text has no "
                             "log-probabilities)")
    if command == "generate":
        if args.include_stop and not args.stop:
            raise ValueError(f"{label('include_stop')} only applies with {label('stop')} (it keeps a matched stop "
                             "string)")
        if args.json_input and args.prompts:
            raise ValueError("--json-input reads stdin's lines as JSON strings: give the prompts there, not as "
                             "arguments")
        if args.chunk_steps is not None and (args.json or args.num_beams > 1 or args.speculative):
            raise ValueError("--chunk-steps only applies to streamed text (not --json, --num-beams or --speculative)")
    elif command == "batch" and args.chunk_steps is not None and not args.refill:
        raise ValueError(f"{name('--chunk-steps')} only applies with {name('--refill')} (the decode steps between "
                         "refills)")
    constraint_regex(args)  # a bad schema file
    specs = lora_specs(args, name("--lora"))
    if command == "generate" and len(specs) > 1:
        raise ValueError(f"{name('--lora')}: jaxgen generate applies one adapter to every prompt, got {len(specs)} "
                         "(name several for jaxgen batch, whose rows pick one by their \"lora\" field)")
    return given_knobs


def lora_specs(args, label: str = "--lora") -> dict[str, str]:
    """The --lora flags (NAME=DIR, or DIR named by its last path part) as {name: directory}, each a
    PEFT adapter directory (its adapter_config.json is read when the adapter loads, after the model)."""
    import os

    out: dict[str, str] = {}
    for spec in getattr(args, "lora", None) or ():
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"{label} must be NAME=DIR or DIR (a PEFT adapter directory), got {spec!r:.80}")
        name, eq, path = spec.partition("=")
        if not eq:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        if not name or not path:
            raise ValueError(f"{label} must be NAME=DIR or DIR (a PEFT adapter directory), got {spec!r:.80}")
        if name in out:
            raise ValueError(f"{label}: the name {name!r} is given twice")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"{label} {spec}: not a PEFT adapter directory (no adapter_config.json)")
        out[name] = path
    return out


def constraint_regex(args) -> str | None:
    """The regex of the flags' constraint (--regex, --json-schema FILE or its schema, --choice ...),
    or None; a bad one raises ValueError before anything loads."""
    from jaxgen.constraints import to_regex

    if args.json_schema is not None:
        schema = args.json_schema
        if isinstance(schema, str):  # a file (on the command line; the Ray stage also takes the schema)
            try:
                with open(schema, encoding="utf-8") as f:
                    schema = f.read()
            except OSError as e:
                raise ValueError(f"--json-schema {args.json_schema}: {e.strerror}") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"--json-schema {args.json_schema}: not UTF-8 text (byte 0x{e.object[e.start]:02x} "
                                 f"at offset {e.start})") from None
        return to_regex("json_schema", schema, args.json_whitespace)
    if args.regex is not None:
        return to_regex("regex", args.regex)
    if args.choice is not None:
        return to_regex("choices", [unescape(c) for c in args.choice])
    return None
