"""Generation, the host API: validation (clear ValueErrors before anything compiles), shape buckets,
text in and out. `generate(model, prompts, ...)`, `stream` and `precompile` pad a request into the
arguments of the compiled engine (`jaxgen.engine`) and turn its output into Completions; any prompts
within one bucket and any knob values reuse one compiled program.

Buckets: prompt length rounds up to PROMPT_BUCKETS, batch to BATCH_BUCKETS, max_new_tokens to
NEW_TOKEN_BUCKETS, stop ids and biased ids per row to SLOT_BUCKETS, stop-string tables to
`jaxgen.stops`' buckets; the cache holds (prefix bucket +) prompt bucket + new-token bucket positions
(capped at the model's max_seq_len), which holds every row whose own prompt + max_new_tokens fits the
context: the context bounds each row, not the longest prompt + another row's larger budget. Padding
rows are done from the start and cost one prefill row.

Shared prefixes: `prefix=` (text, ids, or a `prefill_prefix` result to reuse) is prefilled once into
a one-row cache; each prompt is then prefilled on a copy of it at the positions that follow, so
generate(suffixes, prefix=p) == generate([p + s for s in suffixes]). A text prefix is encoded as a
prompt is (with the tokenizer's BOS); text prompts after a prefix are encoded without BOS.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from jaxgen import constraints as con
from jaxgen import knobs as kn
from jaxgen import lora as lora_mod
from jaxgen import sampling as smp
from jaxgen import stops as sst
from jaxgen.config import ModelConfig
from jaxgen.engine import (FINISH_REASONS, STOP, STOP_STRING, GenerateOutput, Prefix, decode_jit, generate_jit,
                           output, prefill_jit, prefill_prefix_jit)
# every shape rounds up to a bucket (the buckets and the one rounding rule live in jaxgen.knobs)
from jaxgen.knobs import BATCH_BUCKETS, BEAM_BUCKETS, NEW_TOKEN_BUCKETS, PROMPT_BUCKETS, SLOT_BUCKETS, bucket  # noqa: F401
from jaxgen.model import Model
from jaxgen.tokenizer import writable_bytes

ROW_ERROR = ("the model's logits became NaN or infinite at this step (corrupt weights, or an overflow in "
             "this dtype); the row ended there")


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # new ids (a stop token, if hit, is the last one)
    finish_reason: str  # "stop", "length", or "error" (the model's logits for this row were NaN / inf)
    logprobs: list[float]  # raw-model log-probability of each new token
    text: str | None = None  # detokenized new tokens (stop token excluded), when a tokenizer is set
    prompt: str | list[int] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per step (id, logprob) pairs
    sample: int = 0  # which of the prompt's n samples this is
    # finish_reason "stop": the stop string that matched (text ends before it), or the stop id
    stop_reason: str | int | None = None
    score: float | None = None  # beam search only: the beam's length-penalized score (see jaxgen.beam)
    message: str | None = None  # why jaxgen ended the row, where the model did not (jaxgen.conversation)

    def fields(self) -> dict:
        """The JSON fields of this completion (`jaxgen generate --json` and `jaxgen batch` lines)."""
        obj = {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
               "stop_reason": self.stop_reason, "logprobs": self.logprobs}
        if self.score is not None:
            obj["score"] = self.score
        if self.top_logprobs is not None:
            obj["top_logprobs"] = [[list(pair) for pair in step] for step in self.top_logprobs]
        if self.finish_reason == "error":
            obj["error"] = ROW_ERROR
        if self.message is not None:
            obj["message"] = self.message
        return obj


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes of one generate call: which compiled program it uses."""
    batch: int  # P, prompt rows (a bucket); the decode state has batch * n rows
    prompt_len: int  # T bucket
    max_new: int  # M bucket
    cache_len: int  # S
    stop_slots: int  # NS, a SLOT_BUCKETS bucket
    bias_slots: int  # NB, a SLOT_BUCKETS bucket
    penalties: bool = True  # whether the decode state carries the [B, V] penalty history
    n: int = 1  # samples per prompt, from one prefill
    prefix: int = 0  # Tp, the slots of a shared prefix's cache (0: no prefix)

    @property
    def rows(self) -> int:
        """B, the decode rows."""
        return self.batch * self.n


def plan(cfg: ModelConfig, batch: int, prompt_len: int, max_new: int, stop_slots: int = SLOT_BUCKETS[0],
         bias_slots: int = SLOT_BUCKETS[0], penalties: bool = True, n: int = 1, prefix: int = 0,
         prefix_len: int = 0, longest_row: int | None = None) -> Plan:
    """The bucketed shapes for a request of this size (raises if it cannot fit the model);
    stop_slots / bias_slots are the most stop ids / biased ids of any row, rounded to SLOT_BUCKETS;
    prefix / prefix_len: a shared prefix's cache slots and its tokens (0: none). longest_row: the
    most tokens one row holds, its prompt + its own max_new_tokens (default prompt_len + max_new).
    The context bounds each row, not the longest prompt + the largest budget of two different rows:
    the cache (prompt bucket + new-token bucket, capped at the context) holds every row that fits."""
    if max_new <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    t = bucket(prompt_len, PROMPT_BUCKETS, "prompt length")
    m = bucket(max_new, NEW_TOKEN_BUCKETS, "max_new_tokens")
    if prefix_len + (prompt_len + max_new if longest_row is None else longest_row) > cfg.max_seq_len:
        what = f"prefix of {prefix_len} tokens + " if prefix_len else ""
        raise ValueError(f"{what}prompt length {prompt_len} + max_new_tokens {max_new} exceeds {cfg.name}'s "
                         f"context of {cfg.max_seq_len} tokens")
    return Plan(batch=bucket(batch, BATCH_BUCKETS, "batch size"), prompt_len=min(t, cfg.max_seq_len),
                max_new=m, cache_len=min(prefix + t + m, cfg.max_seq_len),
                stop_slots=bucket(stop_slots, SLOT_BUCKETS, "stop ids per row"),
                bias_slots=bucket(bias_slots, SLOT_BUCKETS, "biased/banned ids per row"), penalties=penalties, n=n,
                prefix=prefix)


@dataclasses.dataclass(frozen=True)
class SharedPrefix:
    """A prefix prefilled once (`prefill_prefix`): pass it as `prefix=` to any number of calls."""
    ids: tuple[int, ...]
    bucket: int  # Tp: its padded length and its cache's slots
    state: Prefix  # the device pytree (a one-row KV cache and the ids)
    model: str  # the config name and KV storage it was prefilled with, checked at use
    kv_quant: str | None
    lora: Any = None  # the jaxgen.lora.Adapter it was prefilled with (its keys depend on it), checked at use

    def __len__(self) -> int:
        return len(self.ids)


def prefix_slots(cfg: ModelConfig, length: int) -> int:
    """Tp, the cache slots of a shared prefix of `length` tokens (0: no prefix): its prompt bucket."""
    return min(bucket(length, PROMPT_BUCKETS, "prefix length"), cfg.max_seq_len) if length else 0


def _encode(model: Model, p, what: str, add_bos: bool | None = None) -> list[int]:
    if isinstance(p, str):
        if model.tokenizer is None:
            raise ValueError(f"{what} is text: text prompts and prefixes need a model with a tokenizer; "
                             "pass token ids instead")
        if problem := kn.text_problem(p, what):
            raise ValueError(problem)
        ids = model.tokenizer.encode(p, add_bos=add_bos)
    else:
        try:
            ids = [int(t) for t in p]
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a string or a list of token ids, got {p!r:.80}") from None
    if not ids:
        raise ValueError(f"{what} is empty (no tokens)")
    bad = [t for t in ids if not 0 <= t < model.cfg.vocab_size]
    if bad:
        raise ValueError(f"{what} has token ids outside [0, {model.cfg.vocab_size}): {bad[:5]}")
    return ids


def prefill_prefix(model: Model, prefix, lora=None) -> SharedPrefix:
    """Prefill a prefix (text, encoded with BOS, or token ids) once; pass the result as `prefix=` to
    generate / stream / prepare to continue it with any prompts, as often as wanted. lora: the adapter
    (jaxgen.load_lora) of the prompts that will continue it (its keys depend on it)."""
    if isinstance(prefix, SharedPrefix):
        return prefix
    if lora is not None and not isinstance(lora, lora_mod.Adapter):
        raise ValueError(f"a prefix is prefilled with one LoRA adapter (from jaxgen.load_lora), got {type(lora).__name__}")
    model = lora_mod.attach(model, lora, 1)
    return _prefill_prefix(model, _encode(model, prefix, "prefix"), None if lora is None else 1, lora)


def _prefill_prefix(model: Model, ids: list[int], slot: int | None, lora=None) -> SharedPrefix:
    """`prefill_prefix` of checked ids, with LoRA slot `slot` of the model's table (None: no adapter)."""
    if len(ids) >= model.cfg.max_seq_len:
        raise ValueError(f"prefix of {len(ids)} tokens leaves no room in {model.cfg.name}'s context of "
                         f"{model.cfg.max_seq_len} tokens")
    Tp = prefix_slots(model.cfg, len(ids))
    tok = np.zeros((1, Tp), np.int32)
    tok[0, :len(ids)] = ids
    args = dict(tokens=tok, length=np.array([len(ids)], np.int32))
    if slot is not None:
        args["adapters"] = np.array([slot], np.int32)
    if model.mesh is not None:  # one row, on every device
        from jax.sharding import NamedSharding, PartitionSpec

        args = jax.device_put(args, NamedSharding(model.mesh, PartitionSpec()))
    state = prefill_prefix_jit(model.params, **args, cfg=model.cfg, cache_len=Tp, kv_quant=model.kv_quant,
                               prefill_chunk=model.prefill_chunk, paths=model.paths)
    return SharedPrefix(ids=tuple(ids), bucket=Tp, state=state, model=model.cfg.name, kv_quant=model.kv_quant,
                        lora=lora)


def stop_rows(stop, P: int, n: int = 1) -> list[list[str]]:
    """The stop strings of each of the P * n rows: `stop` is None, one string, a list of strings
    (every row), or a list of P lists (one per prompt, shared by its n samples)."""
    if stop is None:
        return [[] for _ in range(P * n)]
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a string, a list of strings or one list per prompt, got {stop!r:.80}")
    if stop and all(isinstance(s, (list, tuple)) for s in stop):
        if len(stop) != P:
            raise ValueError(f"stop has {len(stop)} lists but there are {P} prompts")
        rows = [list(s) for s in stop]
    else:
        rows = [list(stop)] * P
    for i, r in enumerate(rows):
        if problem := kn.problem("stop", r):
            raise ValueError(f"prompt {i}: {problem}")
    return [r for r in rows for _ in range(n)]


def _encode_prompts(model: Model, prompts, add_bos: bool | None = None) -> list[list[int]]:
    try:
        len(prompts)
    except TypeError:  # None, a number, a 0-d array
        raise ValueError(f"prompts must be a list of prompts (strings or lists of token ids), got {prompts!r:.80}"
                         ) from None
    if isinstance(prompts, (str, bytes)) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        raise ValueError("prompts must be a list of prompts (strings or lists of token ids), "
                         "not a single prompt; wrap it in a list")
    if not len(prompts):
        raise ValueError("no prompts given")
    return [_encode(model, p, f"prompt {i}", add_bos) for i, p in enumerate(prompts)]


def _per_sample(value, P: int, n: int, kind: str):
    """A knob given once for all rows or once per prompt, expanded to its P * n sample rows."""
    if n == 1 or value is None:
        return value
    if kind == "scalar":  # a number, or one per prompt
        a = np.asarray(value)
        return np.repeat(a, n, axis=0) if a.ndim == 1 and len(a) == P else value
    per_row = isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], (dict, list, tuple))
    if kind == "bias":  # {id: bias} for all rows, or a list of dicts, one per prompt
        per_row = isinstance(value, (list, tuple))
    return [v for v in value for _ in range(n)] if per_row and len(value) == P else value


def prepare(model: Model, prompts, *, max_new_tokens=64, stop_ids=None, seed=0, n: int = 1, stop=None,
            prefix=None, stop_universe: Sequence[str] | None = None, candidates: int = smp.DEFAULT_CANDIDATES,
            regex=None, json_schema=None, choices=None, whitespace: str | None = None,
            constraint_universe: Sequence[str] | None = None, top_logprobs: int = 0, batch: int | None = None,
            lora=None, lora_universe: list | None = None, **knobs):
    """Validate and pad a request into the arguments of `generate_jit` and its Plan.

    n > 1 asks for n samples of each prompt: per-row arguments get P * n rows in prompt-major order
    (knobs given per prompt are repeated for its samples), the prompts stay P rows (one prefill).
    stop: stop strings (see `stop_rows`); stop_universe fixes the table's string order (a refill run
    shares one table across its prefills). prefix: text, ids or a SharedPrefix (prefilled here, after
    every check, when it is not one already). regex / json_schema / choices: structured output (see
    `jaxgen.constraints`; each for all prompts or one per prompt, None = free), built into tables over
    the tokenizer's token bytes; constraint_universe fixes the table's regexes (a refill run).
    top_logprobs is checked here (it shapes the program's output, not its arguments). batch: pad the
    prompt rows to this many instead of their bucket (a `jaxgen.conversation` turn keeps its rows).
    lora: an adapter (jaxgen.load_lora) for every prompt or one (or None) per prompt; the model must
    carry their table (`jaxgen.lora.attach(model, lora, P, lora_universe)`, which the front ends call
    first): each prompt's slot becomes the `adapters` argument."""
    V = model.cfg.vocab_size
    max_new_tokens, stop_ids, seed, n, stop, prefix, regex, json_schema, choices, top_logprobs, candidates = map(
        kn.host_value, (max_new_tokens, stop_ids, seed, n, stop, prefix, regex, json_schema, choices, top_logprobs,
                        candidates))
    knobs = kn.host_values(knobs)
    kn.check("n", n)
    kn.check("top_logprobs", top_logprobs, vocab_size=V)
    kn.check("candidates", candidates)
    if whitespace is not None:
        kn.check("whitespace", whitespace)
        if json_schema is None or (isinstance(json_schema, (list, tuple)) and all(x is None for x in json_schema)):
            raise ValueError("whitespace applies to json_schema constraints only (the whitespace between JSON "
                             "tokens), and no prompt has one")
    pre_ids = None
    if isinstance(prefix, SharedPrefix):
        if (prefix.model, prefix.kv_quant) != (model.cfg.name, model.kv_quant):
            raise ValueError(f"this prefix was prefilled for {prefix.model} (kv_quant={prefix.kv_quant}), not "
                             f"{model.cfg.name} (kv_quant={model.kv_quant})")
        pre_ids = list(prefix.ids)
    elif prefix is not None:
        if isinstance(prefix, str):
            kn.check("prefix", prefix)
        pre_ids = _encode(model, prefix, "prefix")
    ids = _encode_prompts(model, prompts, add_bos=False if pre_ids is not None else None)
    P = len(ids)
    adapters, slot_rows = lora_mod.slots(lora, P, lora_universe)
    if slot_rows is not None and model.params.lora is None:
        raise ValueError("lora= needs the adapters' table on the model: call jaxgen.lora.attach(model, lora, P) first")
    pre_slot = None
    if pre_ids is not None and slot_rows is not None:
        if len(set(slot_rows.tolist())) > 1:
            raise ValueError("a shared prefix's keys are computed with one LoRA adapter: prompts with different "
                             "adapters (or none) cannot continue the same prefix; run each adapter's prompts apart")
        pre_slot = int(slot_rows[0])
        row_adapter = adapters[pre_slot - 1] if pre_slot else None
        if isinstance(prefix, SharedPrefix) and prefix.lora is not row_adapter:
            raise ValueError("this prefix was prefilled with another LoRA adapter than the prompts' (pass the same "
                             "lora= to prefill_prefix)")
    elif isinstance(prefix, SharedPrefix) and prefix.lora is not None:
        raise ValueError(f"this prefix was prefilled with LoRA adapter {prefix.lora.name!r}: pass it as lora= too")
    R = P * n  # sample rows
    if problem := kn.rows_per_call(P, n):
        raise ValueError(problem)
    mnt = kn.per_row("max_new_tokens", _per_sample(max_new_tokens, P, n, "scalar"), R, np.int32)
    longest = max(len(x) for x in ids)
    lp = len(pre_ids) if pre_ids is not None else 0
    row_tokens = [len(x) + int(mnt[i * n:(i + 1) * n].max()) for i, x in enumerate(ids)]  # prompt + budget
    for i, x in enumerate(ids):
        if lp + row_tokens[i] > model.cfg.max_seq_len:
            what = f"prefix of {lp} tokens + " if lp else ""
            raise ValueError(f"prompt {i}: {what}{len(x)} tokens + max_new_tokens {mnt[i * n]} exceeds "
                             f"{model.cfg.name}'s context of {model.cfg.max_seq_len} tokens")
    strings = stop_rows(stop, P, n)
    if any(strings) and not hasattr(model.tokenizer, "token_bytes"):
        raise ValueError("stop strings need a model with a tokenizer (to read tokens as text)")
    regexes = [r for r in con.row_regexes(P, regex, json_schema, choices, whitespace) for _ in range(n)]
    constrained = any(r is not None for r in regexes) or bool(constraint_universe)
    if constrained and not hasattr(model.tokenizer, "token_bytes"):
        raise ValueError("regex / json_schema / choices need a model with a tokenizer (to read tokens as text)")
    if stop_ids is None:
        stop_ids = list(getattr(model.tokenizer, "stop_ids", ()) or ())
    if not isinstance(stop_ids, (list, tuple, np.ndarray)):
        kn.check("stop_ids", stop_ids)
    per_row_stops = len(stop_ids) > 0 and isinstance(stop_ids[0], (list, tuple))
    if per_row_stops and len(stop_ids) not in (P, R):
        raise ValueError(f"stop_ids has {len(stop_ids)} rows but there are {P} prompts")
    if per_row_stops and len(stop_ids) == P:
        stop_ids = _per_sample(stop_ids, P, n, "list")
    stops = [list(stop_ids[i]) if per_row_stops else list(stop_ids) for i in range(R)]
    for row in stops:
        kn.check("stop_ids", row, vocab_size=V)
    most = max(len(s) for s in stops)
    knobs = {k: _per_sample(v, P, n, "bias" if k == "logit_bias" else "list" if k == "banned_ids" else "scalar")
             for k, v in knobs.items()}
    sp = smp.make_sampling_params(R, vocab_size=model.cfg.vocab_size, candidates=candidates, **knobs)
    Tp = prefix_slots(model.cfg, lp)
    p = plan(model.cfg, P, longest, int(mnt.max()), stop_slots=most, bias_slots=sp.bias_ids.shape[1],
             penalties=smp.uses_penalties(sp), n=n, prefix=Tp, prefix_len=lp, longest_row=max(row_tokens))
    if not isinstance(seed, (list, tuple, np.ndarray)):
        # Row i of a scalar seed s uses s * 1_000_003 + i (i counts sample rows); pass one seed per
        # row to make a row's samples independent of its place in the batch.
        seeds = (int(kn.check("seed", seed)) * 1_000_003 + np.arange(R)) % (2 ** 31)
    elif n > 1 and len(seed) == P:  # one seed per prompt: sample j of it uses s * 1_000_003 + j
        seeds = (np.repeat(kn.per_row("seed", seed, P, np.int64), n) * 1_000_003 + np.tile(np.arange(n), P)) % (2 ** 31)
    else:
        seeds = kn.per_row("seed", seed, R, np.int64)
    if batch is not None:
        assert batch >= P, (batch, P)
        p = dataclasses.replace(p, batch=batch)
    if model.mesh is not None:  # rows split evenly over the data axis
        d = model.mesh.shape["data"]
        p = dataclasses.replace(p, batch=-(-p.batch // d) * d)
    Pb, T = p.batch, p.prompt_len
    B = Pb * n
    pad = lambda a, fill, rows=B: np.concatenate([a, np.full((rows - len(a),) + a.shape[1:], fill, a.dtype)])
    tok = np.zeros((Pb, T), np.int32)
    for i, x in enumerate(ids):
        tok[i, :len(x)] = x
    stop_arr = np.full((B, p.stop_slots), -1, np.int32)
    for i, s in enumerate(stops):
        stop_arr[i, :len(s)] = s
    sp = jax.tree.map(lambda a: pad(a, a[0] if a.ndim == 1 else (-1 if a.dtype == np.int32 else 0)), sp)
    vocab_bytes = model.tokenizer.token_bytes() if any(strings) or stop_universe else []
    table = sst.build(strings, vocab_bytes, model.cfg.vocab_size, rows=B, universe=stop_universe)
    args = dict(prompts=tok, prompt_lengths=pad(np.array([len(x) for x in ids], np.int32), 0, Pb), sp=sp,
                max_new_tokens=pad(mnt, 0), stop_ids=stop_arr,
                seeds=pad(np.asarray(seeds, np.uint32), 0), stop_strings=table)
    if constrained:  # tables over the tokenizer's bytes; stop ids end a row only in an accepting state
        ends = sorted({t for row in stops for t in row})
        args["constraints"], start = con.build(regexes, writable_bytes(model.tokenizer), model.cfg.vocab_size, ends,
                                               rows=B, universe=constraint_universe)
        args["constraint_start"] = start
    if slot_rows is not None:
        args["adapters"] = pad(slot_rows, 0, Pb)
    if pre_ids is not None:
        args["prefix"] = (prefix if isinstance(prefix, SharedPrefix) else
                          _prefill_prefix(model, pre_ids, pre_slot)).state
    return ids, args, p


def generate(model: Model, prompts, *, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
             min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
             logit_bias=None, banned_ids=None, stop_ids=None, seed=0, top_logprobs: int = 0, n: int = 1,
             stop=None, include_stop: bool = False, prefix=None, regex=None, json_schema=None, choices=None,
             whitespace: str | None = None, num_beams=1, length_penalty=1.0, early_stopping=False,
             return_beams: bool = False, candidates: int = smp.DEFAULT_CANDIDATES, lora=None) -> list[Completion]:
    """Generate continuations for a list of prompts (strings, or lists of token ids).

    Every knob is a scalar or one value per prompt. temperature 0 (the default) is greedy decoding;
    see `jaxgen.sampling` for each transform's exact semantics and order. stop_ids defaults to the
    tokenizer's end-of-sequence ids. Returns one Completion per prompt, in order; with n > 1, n per
    prompt (prompt-major, `Completion.sample` = 0 .. n-1) from one prefill of each prompt: exactly
    what generating the list with each prompt repeated n times gives (same seeds, same tokens).

    stop: stop strings (one, a list for every prompt, or a list per prompt). A row ends at the token
    whose text completes one (decided in the compiled loop); its text ends right before the first
    occurrence (include_stop=True keeps the string), its tokens and logprobs at that token, and
    `stop_reason` names the string. prefix: a shared prefix (text, ids, or `prefill_prefix(model, p)`
    to reuse it) that every prompt continues; equal to prepending it to every prompt.

    Structured output (`jaxgen.constraints`): regex= (the text matches it whole), json_schema= (a dict
    or JSON text; compact unless whitespace= gives the regex allowed between JSON tokens) or
    choices= (one of these strings), each for every prompt or a list with one entry (None = free) per
    prompt. Enforced in the compiled loop: the sampling transforms choose among the allowed tokens
    (the masked distribution, renormalized), stop ids are allowed only where the text is complete,
    and a row whose constraint allows nothing more ends with finish_reason "stop".

    Beam search (`jaxgen.beam`, HF transformers' semantics): num_beams > 1 (one width, or one per
    prompt; any widths up to the same BEAM_BUCKETS bucket share one compiled program) returns each
    prompt's best beam, or with return_beams=True its num_beams best (`Completion.sample` = rank),
    each with its `score` (summed log-probability / new tokens ** length_penalty). early_stopping:
    False (HF's default heuristic), True (stop at num_beams finished beams) or "never"; per prompt
    too. Stop ids, stop strings and constraints end beams; sampling knobs (temperature, top_k, top_p,
    min_p, seed), penalties, biases, n and top_logprobs do not apply to it (refused: `jaxgen.knobs`).

    LoRA (`jaxgen.lora`): lora= an adapter from `jaxgen.load_lora` for every prompt, or a list with one
    adapter or None per prompt; applied unmerged inside the compiled loop, several adapters in one
    batch; another adapter of the same rank bucket and target modules reuses the compiled program.
    """
    # every knob, by its jaxgen.knobs name (NumPy / JAX arrays and scalars as Python values)
    request = kn.host_values({k: v for k, v in locals().items() if k in kn.KNOBS})
    include_stop, n, stop, lora, top_logprobs, candidates = (
        request[k] for k in ("include_stop", "n", "stop", "lora", "top_logprobs", "candidates"))
    kn.check("include_stop", include_stop)
    if _beam_widths(request["num_beams"], len(prompts) if isinstance(prompts, (list, tuple)) else 1) is not None:
        return generate_beams(model, prompts, **request)
    if only := kn.beam_only(request):
        raise ValueError(f"{kn.only_for_beams(only)} (num_beams > 1)")
    for k in kn.BEAM_KNOBS + ("include_stop",):
        del request[k]
    model = lora_mod.attach(model, lora, _count(prompts))
    ids, args, p = prepare(model, prompts, **request)
    out = fetch(run(model, args, p, top_logprobs, candidates))
    return to_completions(model, prompts, out, len(ids) * n, n, stop_rows(stop, len(ids), n), include_stop)


def _count(prompts) -> int:
    """How many prompts a (possibly malformed) prompts argument holds; `prepare` refuses a bad one."""
    return len(prompts) if isinstance(prompts, (list, tuple)) else 1


def _beam_widths(num_beams, P: int):
    """num_beams (one int, or one per prompt) as a list of P widths; None when no prompt asks for
    more than one beam (plain decoding)."""
    widths = list(num_beams) if isinstance(num_beams, (list, tuple, np.ndarray)) else [num_beams] * P
    for w in widths:
        kn.check("num_beams", w)
    if len(widths) != P:
        raise ValueError(f"num_beams has {len(widths)} values but there are {P} prompts")
    return widths if widths and max(widths) > 1 else None


def generate_beams(model: Model, prompts, *, num_beams=4, length_penalty=1.0, early_stopping=False,
                   return_beams: bool = False, stop=None, include_stop: bool = False, timings: dict | None = None,
                   **request) -> list[Completion]:
    """Beam search (see `generate` and `jaxgen.beam`): each prompt's best beam, or its num_beams best.
    Refuses the knobs beam search does not take (`jaxgen.knobs`: sampling, penalties, n, ...). If
    `timings` is a dict it receives compile_s, prefill_s, decode_s (the prefill and the search run as
    two programs, compiled ahead and timed apart, as in `stream`) and new_tokens (of the results)."""
    import time

    from jaxgen.beam import EARLY_STOPPING, beam_jit, beam_loop_jit, beam_start_jit

    num_beams, length_penalty, early_stopping, return_beams, include_stop, stop = map(
        kn.host_value, (num_beams, length_penalty, early_stopping, return_beams, include_stop, stop))
    request = kn.host_values(request)
    bad = kn.beam_refused(request)
    if bad:
        raise ValueError(f"beam search is deterministic and scores raw log-probabilities: {', '.join(bad)} "
                         "cannot be used with num_beams > 1")
    request = {k: v for k, v in request.items() if not (k in kn.KNOBS and kn.KNOBS[k].beam == "no")}
    kn.check("return_beams", return_beams)
    kn.check("include_stop", include_stop)
    if not isinstance(prompts, (list, tuple)):
        _encode_prompts(model, prompts)  # raises the usual message
    P = len(prompts)
    widths = _beam_widths(num_beams, P) or [1] * P
    K = bucket(max(widths), BEAM_BUCKETS, "num_beams")

    def per_prompt(name, v):
        values = list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v] * P
        if len(values) != P:
            raise ValueError(f"{name} needs one value or one per prompt ({P} prompts), got {len(values)}")
        return [kn.check(name, x) for x in values]

    model = lora_mod.attach(model, request.get("lora"), P)
    lps = [float(x) for x in per_prompt("length_penalty", length_penalty)]
    es = [EARLY_STOPPING[x if isinstance(x, str) else bool(x)] for x in per_prompt("early_stopping", early_stopping)]
    ids, args, p = prepare(model, prompts, n=K, stop=stop, **request)
    for k in ("sp", "seeds"):
        del args[k]
    pad = lambda vals, dtype: np.concatenate([np.asarray(vals, dtype), np.zeros(p.batch - P, dtype)])
    args.update(width=pad(widths, np.int32), length_penalty=pad(lps, np.float32), early_stopping=pad(es, np.int32))
    statics = dict(cfg=model.cfg, max_new=p.max_new, cache_len=p.cache_len, beams=K, mesh=model.mesh,
                   kv_quant=model.kv_quant, prefill_chunk=model.prefill_chunk, paths=model.paths)
    args = place(model, args)
    if timings is None:
        out = fetch(beam_jit(model.params, **args, **statics))
    else:
        loop = dict(max_new_tokens=args["max_new_tokens"], stop_ids=args["stop_ids"])
        t0 = time.perf_counter()
        lowered = beam_start_jit.lower(model.params, **args, **statics)
        start_c = lowered.compile()
        state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), lowered.out_info,
                             start_c.output_shardings)  # the loop takes the state as the start lays it out
        loop_c = beam_loop_jit.lower(model.params, state, **loop, cfg=model.cfg, max_new=p.max_new,
                                     mesh=model.mesh, paths=model.paths).compile()
        t1 = time.perf_counter()
        b = jax.block_until_ready(start_c(model.params, **args))
        t2 = time.perf_counter()
        out = fetch(jax.block_until_ready(loop_c(model.params, b, **loop)))
        timings.update(compile_s=t1 - t0, prefill_s=t2 - t1, decode_s=time.perf_counter() - t2)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    gen = GenerateOutput(tokens=flat(out.tokens), num_new=flat(out.num_new), finish=flat(out.finish),
                         logprobs=flat(out.logprobs), top_ids=np.zeros(flat(out.tokens).shape + (0,), np.int32),
                         top_logprobs=np.zeros(flat(out.tokens).shape + (0,), np.float32), steps=out.steps)
    beams = to_completions(model, prompts, gen, P * K, K, stop_rows(stop, P, K), include_stop)
    results = []
    for i, c in enumerate(beams):
        rank, score = i % K, float(out.scores[i // K, i % K])
        if rank >= (widths[i // K] if return_beams else 1):
            continue
        if not np.isfinite(score):  # no hypothesis: every continuation had NaN / inf logits
            c = dataclasses.replace(c, tokens=[], logprobs=[], text="" if c.text is not None else None,
                                    finish_reason="error", stop_reason=None)
        results.append(dataclasses.replace(c, score=score if np.isfinite(score) else None))
    if timings is not None:
        timings["new_tokens"] = sum(len(c.tokens) for c in results)
    return results


def run(model: Model, args: dict, p: Plan, top_logprobs: int = 0,
        candidates: int = smp.DEFAULT_CANDIDATES) -> GenerateOutput:
    """Call the compiled program on `prepare`d arguments (always by keyword: jit keys its cache on
    how arguments are passed, so every caller goes through here)."""
    return generate_jit(model.params, **place(model, args), **statics(model, p, top_logprobs, candidates))


def statics(model: Model, p: Plan, top_logprobs: int = 0, candidates: int = smp.DEFAULT_CANDIDATES) -> dict:
    """generate_jit's (and prefill_jit's) static arguments for a plan, as `run` and `stream` pass them."""
    return dict(cfg=model.cfg, max_new=p.max_new, cache_len=p.cache_len, top_logprobs=top_logprobs,
                candidates=candidates, mesh=model.mesh, kv_quant=model.kv_quant, penalties=p.penalties, n=p.n,
                prefill_chunk=model.prefill_chunk, paths=model.paths)


def place(model: Model, args: dict) -> dict:
    """With a mesh, put every per-row argument on the `data` axis (each process holds the whole
    host batch; device_put keeps the rows of its own devices)."""
    if model.mesh is None:
        return args
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxgen.sharding import batch_sharding

    args = dict(args)
    full = NamedSharding(model.mesh, PartitionSpec())
    if "prefix" in args:  # one row, read by every row
        args["prefix"] = jax.device_put(args["prefix"], full)
    if "constraints" in args:  # tables read by every row
        args["constraints"] = jax.device_put(args["constraints"], full)
    if "stop_strings" in args:  # tables read by every row; the row masks split like the rows
        t = args.pop("stop_strings")
        tables = jax.device_put((t.token_class, t.next_state, t.hit), full)
        args["stop_strings"] = t.replace(token_class=tables[0], next_state=tables[1], hit=tables[2],
                                         mask=jax.device_put(t.mask, batch_sharding(model.mesh, 1)))
    rows = {k: v for k, v in args.items() if k not in ("prefix", "stop_strings", "constraints")}
    rows = jax.tree.map(lambda a: jax.device_put(a, batch_sharding(model.mesh, np.ndim(a))), rows)
    return {**args, **rows}


def fetch(tree):
    """Host numpy copy of a (possibly multi-process) result."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def to_completions(model: Model, prompts, out: GenerateOutput, rows: int, n: int = 1,
                   stop_strings: Sequence[Sequence[str]] | None = None, include_stop: bool = False) -> list[Completion]:
    """Completions of the first `rows` rows of `out`; with n samples per prompt, row i is sample
    i % n of prompts[i // n]. stop_strings: each row's (`stop_rows`), to cut the text of rows that
    ended on one."""
    results = []
    for i in range(rows):
        k = int(out.num_new[i])
        toks = [int(t) for t in out.tokens[i, :k]]
        code = int(out.finish[i])
        finish = FINISH_REASONS.get(code, "length")
        text = reason = None
        if code == STOP:
            reason = toks[-1]
        if model.tokenizer is not None:
            text = model.tokenizer.decode(toks[:-1] if code == STOP else toks)
            if code == STOP_STRING:
                text, reason = sst.cut(text, stop_strings[i] if stop_strings else (), include_stop)
        top = None
        if out.top_ids.shape[-1]:
            top = [[(int(a), float(b)) for a, b in zip(out.top_ids[i, j], out.top_logprobs[i, j])]
                   for j in range(k)]
        results.append(Completion(tokens=toks, finish_reason=finish,
                                  logprobs=[float(x) for x in out.logprobs[i, :k]], text=text,
                                  prompt=prompts[i // n], top_logprobs=top, sample=i % n, stop_reason=reason))
    return results


def stream(model: Model, prompts, *, chunk_steps: int = 8, top_logprobs: int = 0,
           candidates: int = smp.DEFAULT_CANDIDATES, timings: dict | None = None, **request):
    """Generate like `generate`, yielding a host copy of the GenerateOutput after the prefill and
    after every `chunk_steps` decode steps, so callers can show tokens as they are produced.

    The tokens equal `generate`'s: both run the same prefill and decode steps (here as two compiled
    programs, with the decode loop stopped and resumed between chunks). If `timings` is a dict it
    receives compile_s, prefill_s and decode_s (device-synchronized) and new_tokens.
    """
    import time

    if isinstance(chunk_steps, bool) or not isinstance(chunk_steps, (int, np.integer)) or chunk_steps < 1:
        raise ValueError(f"chunk_steps must be an integer >= 1, got {chunk_steps!r}")
    request = kn.host_values(request)
    top_logprobs, candidates = kn.host_value(top_logprobs), kn.host_value(candidates)
    beam = [k for k in kn.BEAM_KNOBS if not kn.is_off(k, request.pop(k, None))]
    if beam:
        raise ValueError(f"stream() does not run beam search ({', '.join(beam)}): a beam is known only when the "
                         "search ends; use generate(num_beams=...)")
    kn.check("include_stop", request.pop("include_stop", False))  # outputs are token arrays; `to_completions` cuts text
    model = lora_mod.attach(model, request.get("lora"), _count(prompts))
    ids, args, p = prepare(model, prompts, candidates=candidates, top_logprobs=top_logprobs, **request)
    args = place(model, args)
    loop_args = {k: args[k] for k in ("sp", "max_new_tokens", "stop_ids", "seeds")}
    t0 = time.perf_counter()
    lowered = prefill_jit.lower(model.params, **args, **statics(model, p, top_logprobs, candidates))
    prefill_c = lowered.compile()
    # decode takes the state exactly as prefill lays it out (shapes, and shardings on a mesh)
    state_shape = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                               lowered.out_info, prefill_c.output_shardings)
    decode_c = decode_jit.lower(model.params, state_shape, **loop_args, until=np.int32(0), cfg=model.cfg,
                                candidates=candidates, mesh=model.mesh, paths=model.paths).compile()
    t1 = time.perf_counter()
    state = jax.block_until_ready(prefill_c(model.params, **args))
    t2 = time.perf_counter()
    decode_s = 0.0
    while True:
        out = fetch(output(state))
        yield out
        if int(out.steps) >= p.max_new or bool(np.all(out.finish[:len(ids) * p.n] > 0)):
            break
        t = time.perf_counter()
        state = jax.block_until_ready(decode_c(model.params, state, **loop_args,
                                               until=np.int32(int(out.steps) + chunk_steps)))
        decode_s += time.perf_counter() - t
    if timings is not None:
        timings.update(compile_s=t1 - t0, prefill_s=t2 - t1, decode_s=decode_s,
                       new_tokens=int(out.num_new[:len(ids) * p.n].sum()))


def precompile(model: Model, batch: int, prompt_len: int, max_new_tokens: int, *, top_logprobs: int = 0,
               candidates: int = smp.DEFAULT_CANDIDATES, stop_slots: int = SLOT_BUCKETS[0],
               bias_slots: int = SLOT_BUCKETS[0], penalties: bool = False, n: int = 1):
    """Compile the generate program for one bucket ahead of time, by running it once on a dummy
    request of that bucket whose rows are all padding (the loop exits at once); later requests that
    round to the same bucket reuse it (penalties=True: the program for requests that use a
    repetition / presence / frequency penalty; n: samples per prompt). Returns the Plan."""
    p = plan(model.cfg, batch, prompt_len, max_new_tokens, stop_slots, bias_slots, penalties, n)
    P, B = p.batch, p.rows
    args = dict(prompts=np.zeros((P, p.prompt_len), np.int32), prompt_lengths=np.zeros((P,), np.int32),
                sp=smp.make_sampling_params(B, candidates=candidates, bias_slots=p.bias_slots),
                max_new_tokens=np.zeros((B,), np.int32), stop_ids=np.full((B, p.stop_slots), -1, np.int32),
                seeds=np.zeros((B,), np.uint32), stop_strings=sst.build([], [], model.cfg.vocab_size, rows=B))
    jax.block_until_ready(run(model, args, p, top_logprobs, candidates))
    return p
