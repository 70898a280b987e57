"""A request's knobs and size limits, each described once.

`KNOBS` holds every request knob: its name (the Python keyword and the `jaxgen batch` row field), type,
range, default (for the sampling transforms the default is "off"), whether it takes one value per
prompt, whether beam search takes it, and its command-line flag. Every front end derives from it:

- the Python API checks values with `check` / `per_row` (`generate.prepare`, `sampling.make_sampling_params`,
  beam search refuses what `beam_refused` names);
- the command line builds its flags from it and checks them before a model loads (`jaxgen.cli`);
- `jaxgen batch` checks row fields with it (`jaxgen.batch_run.check_row`);
- the Ray stage checks its options with it (`jaxgen.ray`).

So a knob is added or changed here, once, and the front ends cannot disagree on it. Messages are
"<name> must be <range>, got <value>", where <name> is what the front end calls the knob
(`temperature` in Python, a row or a Ray option; `--temperature` on the command line).

Buckets: every shape of a compiled program rounds up to one of these, so few programs compile.
`bucket` is the one rounding rule (also for stop-string and constraint tables).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # decode rows (prompts x samples)
NEW_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# stop ids per row and biased / banned ids per row: 1 to 8 entries share one program, 9 to 64 the next
SLOT_BUCKETS = (8, 64, 512, 4096)
BEAM_BUCKETS = (2, 4, 8, 16, 32)  # the static beam maximum K of a compiled beam-search program
MAX_STOP_STRINGS = 32  # distinct stop strings per call (bits of the decode state's int32 row mask)
DEFAULT_CANDIDATES = 256  # the top-k / top-p candidate set (jaxgen.sampling)


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    """The smallest bucket >= n; a ValueError naming `what` past the largest."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class Knob:
    name: str  # the Python keyword and the `jaxgen batch` row field
    kind: str  # int | float | bool | early_stopping | strings | choices | text | regex | schema | ids | bias | adapter
    default: Any  # the value when not given; for the sampling transforms, "off"
    lo: float | None = None  # numeric range, inclusive (exclusive at lo when lo_open)
    hi: float | str | None = None  # a number, or the per-call limit that bounds it ("candidates", "vocab_size")
    lo_open: bool = False
    off: str = ""  # what the default means, shown with the range ("0 = greedy")
    per_row: bool = True  # one value for every prompt, or one per prompt (else one per call)
    beam: str = "any"  # "any": beam search takes it; "no": refused with num_beams > 1; "only": beam search only
    flag: str | None = None  # the command-line flag; None: Python only
    commands: tuple[str, ...] = ("generate", "batch")  # the subcommands with the flag
    row: bool = True  # a `jaxgen batch` row field (and so a Ray row column)
    metavar: str | None = None
    help: str = ""

    @property
    def dest(self) -> str | None:
        """The flag's Python name (argparse's dest; the Ray stage's option name)."""
        return self.flag[2:].replace("-", "_") if self.flag else None


_K = Knob
KNOBS: dict[str, Knob] = {k.name: k for k in (
    _K("max_new_tokens", "int", 64, 1, NEW_TOKEN_BUCKETS[-1], flag="--max-new-tokens", metavar="N",
       help="new tokens per prompt at most (default 64)"),
    _K("temperature", "float", 0.0, 0, None, off="0 = greedy", beam="no", flag="--temperature",
       help="0 = greedy (default)"),
    _K("top_k", "int", 0, 0, "candidates", off="0 = off", beam="no", flag="--top-k",
       help="keep the k most likely tokens (0 = off)"),
    _K("top_p", "float", 1.0, 0, 1, lo_open=True, off="1 = off", beam="no", flag="--top-p",
       help="nucleus: keep the most likely tokens up to this mass (1 = off)"),
    _K("min_p", "float", 0.0, 0, 1, off="0 = off", beam="no", flag="--min-p",
       help="keep tokens with p >= min_p * p_max (0 = off)"),
    _K("repetition_penalty", "float", 1.0, 0, None, lo_open=True, off="1 = off", beam="no",
       flag="--repetition-penalty", help="HF/CTRL penalty on tokens seen so far (1 = off)"),
    _K("presence_penalty", "float", 0.0, off="0 = off", beam="no", flag="--presence-penalty",
       help="subtracted from generated tokens' logits (0 = off)"),
    _K("frequency_penalty", "float", 0.0, off="0 = off", beam="no", flag="--frequency-penalty",
       help="subtracted per occurrence in the generated tokens (0 = off)"),
    _K("seed", "int", 0, 0, 2 ** 32 - 1, beam="no", flag="--seed",
       help="sampling seed (a batch row's comes from it and the row's id)"),
    _K("logit_bias", "bias", None, beam="no", row=False, help="{token id: bias} added to the logits"),
    _K("banned_ids", "ids", None, beam="no", row=False, help="token ids never generated"),
    _K("stop_ids", "ids", None, row=False, help="ids that end a row (default: the tokenizer's end ids)"),
    _K("stop", "strings", None, hi=MAX_STOP_STRINGS, flag="--stop", metavar="TEXT",
       help="stop string (repeatable; \\n and \\t are read as newline and tab): the text ends right before it"),
    _K("include_stop", "bool", False, per_row=False, flag="--include-stop", row=False,
       help="keep the matched stop string in the text"),
    _K("prefix", "text", None, per_row=False, flag="--prefix", metavar="TEXT",
       help="a prefix every prompt continues, prefilled once (encoded with BOS, prompts without)"),
    _K("regex", "regex", None, flag="--regex",
       help="structured output: the text matches this regex whole (Python's re.fullmatch)"),
    _K("json_schema", "schema", None, flag="--json-schema", metavar="FILE",
       help="structured output: JSON text valid under the JSON schema in FILE (compact)"),
    _K("choices", "choices", None, flag="--choice", metavar="TEXT",
       help="structured output: the text is one of the --choice values (repeatable)"),
    _K("whitespace", "regex", None, per_row=False, flag="--json-whitespace", row=False, metavar="REGEX",
       help="with a JSON schema: the whitespace allowed between JSON tokens (default: none)"),
    _K("lora", "adapter", None, flag="--lora", metavar="NAME=DIR",
       help="a LoRA adapter (PEFT directory; repeatable in batch, where a row's \"lora\" field names one; "
            "generate applies its one adapter to every prompt)"),
    _K("n", "int", 1, 1, BATCH_BUCKETS[-1], per_row=False, beam="no", flag="--n", commands=("generate",),
       help="samples per prompt, from one prefill of it (default 1)"),
    _K("top_logprobs", "int", 0, 0, "vocab_size", per_row=False, beam="no", flag="--top-logprobs", row=False,
       metavar="N", help="also return the N most likely tokens of each step (0 = off)"),
    _K("candidates", "int", DEFAULT_CANDIDATES, 1, None, per_row=False, beam="no", row=False,
       help="size of the top-k / top-p candidate set (static)"),
    _K("num_beams", "int", 1, 1, BEAM_BUCKETS[-1], off="1 = no beam search", flag="--num-beams", metavar="K",
       help="beam search with K beams per prompt (deterministic; default 1: none)"),
    _K("length_penalty", "float", 1.0, beam="only", flag="--length-penalty", metavar="X",
       help="beam search: a finished beam scores sum(logprobs) / new_tokens ** X (default 1.0)"),
    _K("early_stopping", "early_stopping", False, beam="only", flag="--early-stopping",
       help="beam search: stop a prompt at K finished beams; 'never': only when no beam can improve"),
    _K("return_beams", "bool", False, per_row=False, beam="only", flag="--return-beams",
       help="beam search: output all K beams with their scores, best first"),
)}
CONSTRAINTS = ("regex", "json_schema", "choices")  # structured output: at most one per prompt
BEAM_KNOBS = tuple(k.name for k in KNOBS.values() if k.beam == "only" or k.name == "num_beams")  # beam search's own


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


def _show(v) -> str:
    text = repr(v.item() if isinstance(v, np.generic) else v)
    return text if len(text) <= 80 else text[:77] + "..."


def must(name: str, **limits) -> str:
    """What a value of knob `name` must be, in words ("an integer in [0, 256] (0 = off)")."""
    k = KNOBS[name]
    hi = limits.get(k.hi) if isinstance(k.hi, str) else k.hi
    if hi is None and isinstance(k.hi, str):  # a per-call limit not known here: named
        hi = {"vocab_size": "the vocabulary size", "candidates": "candidates"}[k.hi]
    fmt = lambda x: f"{x:g}" if isinstance(x, float) else str(x)
    if k.kind in ("int", "float"):
        what = "an integer" if k.kind == "int" else "a finite number"
        if k.lo is not None and hi is not None:
            what += f" in {'(' if k.lo_open else '['}{fmt(k.lo)}, {fmt(hi)}]"
        elif k.lo is not None:
            what += f" {'>' if k.lo_open else '>='} {fmt(k.lo)}"
        elif hi is not None:
            what += f" <= {fmt(hi)}"
        return what + (f" ({k.off})" if k.off else "")
    return {"bool": "true or false", "early_stopping": "true, false or 'never'",
            "strings": f"a non-empty string or a list of at most {k.hi} non-empty strings",
            "choices": "a non-empty list of non-empty strings", "text": "a non-empty string",
            "regex": "a non-empty string (a regex)", "schema": "a JSON schema (an object, or its JSON text)",
            "ids": "a list of token ids" + (f" in [0, {limits['vocab_size']})" if limits.get("vocab_size") else ""),
            "bias": "a {token id: finite number or -inf} mapping",
            "adapter": "an adapter from jaxgen.load_lora or None (a batch row: the NAME of a --lora NAME=DIR)"}[k.kind]


_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(value, label: str) -> str | None:
    """A lone surrogate in `value` (a string, or in the strings of its lists and dicts) as one line
    naming `label`, or None. Such a str has no UTF-8 form, so no tokenizer, stop-string or constraint
    table takes it: a JSON "\\ud83d" escape without its other half (a UTF-16 pair cut in two), or a
    byte that is not UTF-8 in a command-line argument or on stdin (Python reads those as U+DC80-U+DCFF)."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        if m is None:
            return None
        cp = ord(m.group())
        what = (f"the byte 0x{cp - 0xDC00:02X}, which is not UTF-8, or a lone surrogate U+{cp:04X}"
                if 0xDC80 <= cp <= 0xDCFF else f"a lone surrogate U+{cp:04X} (half of a UTF-16 pair)")
        return f"{label} is not valid Unicode text: {what} at character {m.start()}"
    items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else value
    if isinstance(items, (list, tuple)):
        for item in items:
            if p := text_problem(item, label):
                return p
    return None


def problem(name: str, value, label: str | None = None, **limits) -> str | None:
    """What is wrong with `value` for knob `name` (one value: a row's, or the call's), as one line
    naming it `label` (default: the knob's name); None if it is fine. limits: the per-call bounds a
    knob may name (candidates, vocab_size); an unknown one (None) is not checked."""
    k = KNOBS[name]
    label = label or name
    bad = f"{label} must be {must(name, **limits)}, got {_show(value)}"
    hi = limits.get(k.hi) if isinstance(k.hi, str) else k.hi
    if k.kind in ("text", "strings", "choices", "regex", "schema") and (p := text_problem(value, label)):
        return p
    if k.kind in ("int", "float"):
        if not (_is_int(value) if k.kind == "int" else _is_number(value)):
            return bad
        try:  # (a JSON row's integer may have hundreds of digits)
            as_float = float(value)
        except OverflowError:
            return bad
        if not math.isfinite(as_float) or (k.kind == "float" and abs(as_float) > _FLOAT32_MAX):
            return bad  # a float knob runs as a float32
        if k.lo is not None and (value <= k.lo if k.lo_open else value < k.lo):
            return bad
        if isinstance(hi, (int, float)) and value > hi:
            return bad
        return None
    if k.kind == "bool":
        return None if isinstance(value, (bool, np.bool_)) else bad
    if k.kind == "early_stopping":
        return None if isinstance(value, (bool, np.bool_)) or value == "never" else bad
    if k.kind == "text":
        return None if isinstance(value, str) and value else bad
    if k.kind in ("strings", "choices"):
        items = [value] if k.kind == "strings" and isinstance(value, str) else value
        ok = isinstance(items, (list, tuple)) and all(isinstance(s, str) and s for s in items)
        if not ok or (k.kind == "choices" and not items) or (k.hi is not None and len(items) > k.hi):
            return bad
        return None
    if k.kind == "ids":
        vocab = limits.get("vocab_size")
        items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
        if items is None or not all(_is_int(t) and t >= 0 and (vocab is None or t < vocab) for t in items):
            return bad
        return None
    if k.kind == "bias":
        vocab = limits.get("vocab_size")
        if not isinstance(value, dict) or not all(
                _is_int(t) and t >= 0 and (vocab is None or t < vocab) and _is_number(b) and (math.isfinite(b) or b == -math.inf)
                for t, b in value.items()):
            return bad
        return None
    if k.kind in ("regex", "schema"):
        if k.kind == "regex" and not (isinstance(value, str) and value):
            return bad
        if name == "whitespace":  # a regex of its own, not a constraint
            from jaxgen.json_regex import json_whitespace

            try:
                json_whitespace(value, label)
            except ValueError as e:
                return str(e)
            return None
        from jaxgen.constraints import to_regex

        try:
            to_regex(name, value)
        except ValueError as e:
            return str(e)
        return None
    if k.kind == "adapter":  # an Adapter (Python) or a name (a batch row; resolved by the front end)
        from jaxgen.lora import Adapter

        return None if value is None or isinstance(value, Adapter) or (isinstance(value, str) and value) else bad
    raise AssertionError(f"knob {name!r} has an unknown kind {k.kind!r}")


def check(name: str, value, label: str | None = None, **limits):
    """Raise ValueError(problem) if `value` is not a valid value of knob `name`; returns it."""
    p = problem(name, value, label, **limits)
    if p:
        raise ValueError(p)
    return value


def host_value(value):
    """A knob value given as a NumPy or JAX array or scalar (a caller inside a JAX program holds its
    temperatures, seeds or budgets as arrays) as the Python value the checks read: a 0-d array or a
    NumPy scalar is its number, a 1-d array a list (one value per prompt); lists, tuples and dicts are
    converted item by item. Anything else is returned as given."""
    if isinstance(value, np.generic):
        return value.item()
    if type(value) in (list, tuple):  # (not a named tuple: rebuilt as its type from the items)
        return type(value)(host_value(v) for v in value)
    if isinstance(value, dict):
        return {host_value(k): host_value(v) for k, v in value.items()}
    if not isinstance(value, (str, bytes)) and all(hasattr(value, a) for a in ("__array__", "shape", "dtype")):
        return np.asarray(value).tolist()
    return value


def host_values(request: dict) -> dict:
    """`host_value` of each knob of a request (the keyword arguments of a front end)."""
    return {k: host_value(v) if k in KNOBS else v for k, v in request.items()}


def per_row(name: str, value, rows: int, dtype, **limits) -> np.ndarray:
    """A per-row numeric knob (one value, or one per row) checked value by value, as a [rows] array."""
    items = np.asarray(value, dtype=object) if isinstance(value, (list, tuple, np.ndarray)) else None
    if items is None:
        return np.full((rows,), check(name, value, **limits), dtype)
    if items.shape != (rows,):
        raise ValueError(f"{name} must be a scalar or have one value per prompt ({rows}), got shape {items.shape}")
    for v in items:
        check(name, v, **limits)
    return np.asarray(list(items), dtype)


def is_off(name: str, value) -> bool:
    """Whether `value` (one value, or one per prompt) is the knob's default everywhere: not asked for."""
    off = KNOBS[name].default
    if value is None or (off is None and isinstance(value, (dict, list, tuple)) and not value):
        return True
    if off is None:
        return False
    if isinstance(value, (list, tuple, np.ndarray)):
        return all(is_off(name, v) for v in np.asarray(value, dtype=object).ravel())
    return type(value) is not str and value == off or value is off


def beam_refused(request: dict) -> list[str]:
    """The knobs of `request` that beam search does not take (given and not off), as "name=value"."""
    return [f"{k}={_show(v)}" for k, v in request.items()
            if k in KNOBS and KNOBS[k].beam == "no" and not is_off(k, v)]


def beam_only(request: dict) -> list[str]:
    """The beam-search-only knobs of `request` given with a value other than their default."""
    return [k for k, v in request.items() if k in KNOBS and KNOBS[k].beam == "only" and not is_off(k, v)]


def only_for_beams(names: list[str]) -> str:
    """The start of the message refusing beam-search-only knobs (each front end names them its way)."""
    return f"{', '.join(names)} only appl{'ies' if len(names) == 1 else 'y'} to beam search"


def rows_per_call(prompts: int, n: int) -> str | None:
    """The problem with P prompts x n samples as decode rows (the largest batch bucket), or None."""
    if prompts * n > BATCH_BUCKETS[-1]:
        return (f"{prompts} prompts x n={n} samples = {prompts * n} rows exceeds the largest batch bucket "
                f"{BATCH_BUCKETS[-1]}")
    return None


def markdown() -> str:
    """The table as the README shows it (`python -m jaxgen.knobs`; a test keeps the README's copy equal)."""
    beam = {"any": "yes", "no": "refused", "only": "only"}
    lines = ["| knob | values | default | per prompt | beam search | flag | batch row field |", "|---|---|---|---|---|---|---|"]
    for k in KNOBS.values():
        flag = f"`{k.flag}`" + ("" if k.commands == ("generate", "batch") else f" ({', '.join(k.commands)})") if k.flag else "-"
        lines.append(f"| `{k.name}` | {must(k.name).replace('|', '/')} | `{k.default!r}` | {'yes' if k.per_row else '-'} | "
                     f"{beam[k.beam]} | {flag} | {'yes' if k.row else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
