"""Generation, the host API: validation (clear ValueErrors before anything compiles), shape buckets,
text in and out. `generate(model, prompts, ...)`, `stream` and `precompile` pad a request into the
arguments of the compiled engine (`jaxgen.engine`) and turn its output into Completions; any prompts
within one bucket and any knob values reuse one compiled program.

Buckets: prompt length rounds up to PROMPT_BUCKETS, batch to BATCH_BUCKETS, max_new_tokens to
NEW_TOKEN_BUCKETS, stop ids and biased ids per row to SLOT_BUCKETS; the cache holds prompt bucket +
new-token bucket positions (capped at the model's max_seq_len). Padding rows are done from the start
and cost one prefill row.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from jaxgen import sampling as smp
from jaxgen.config import ModelConfig
from jaxgen.engine import (FINISH_REASONS, GenerateOutput, decode_jit, generate_jit, output, prefill_jit)
from jaxgen.model import Model

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
NEW_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SLOT_BUCKETS = smp.SLOT_BUCKETS  # stop ids per row (and, in sampling, biased/banned ids per row)


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # new ids (a stop token, if hit, is the last one)
    finish_reason: str  # "stop" or "length"
    logprobs: list[float]  # raw-model log-probability of each new token
    text: str | None = None  # detokenized new tokens (stop token excluded), when a tokenizer is set
    prompt: str | list[int] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per step (id, logprob) pairs
    sample: int = 0  # which of the prompt's n samples this is

    def fields(self) -> dict:
        """The JSON fields of this completion (`jaxgen generate --json` and `jaxgen batch` lines)."""
        obj = {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
               "logprobs": self.logprobs}
        if self.top_logprobs is not None:
            obj["top_logprobs"] = [[list(pair) for pair in step] for step in self.top_logprobs]
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

    @property
    def rows(self) -> int:
        """B, the decode rows."""
        return self.batch * self.n


def plan(cfg: ModelConfig, batch: int, prompt_len: int, max_new: int, stop_slots: int = SLOT_BUCKETS[0],
         bias_slots: int = SLOT_BUCKETS[0], penalties: bool = True, n: int = 1) -> Plan:
    """The bucketed shapes for a request of this size (raises if it cannot fit the model);
    stop_slots / bias_slots are the most stop ids / biased ids of any row, rounded to SLOT_BUCKETS."""
    if max_new <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    t = bucket(prompt_len, PROMPT_BUCKETS, "prompt length")
    m = bucket(max_new, NEW_TOKEN_BUCKETS, "max_new_tokens")
    if prompt_len + max_new > cfg.max_seq_len:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new} exceeds {cfg.name}'s "
                         f"context of {cfg.max_seq_len} tokens")
    return Plan(batch=bucket(batch, BATCH_BUCKETS, "batch size"), prompt_len=min(t, cfg.max_seq_len),
                max_new=m, cache_len=min(t + m, cfg.max_seq_len),
                stop_slots=bucket(stop_slots, SLOT_BUCKETS, "stop ids per row"),
                bias_slots=bucket(bias_slots, SLOT_BUCKETS, "biased/banned ids per row"), penalties=penalties, n=n)


def _encode_prompts(model: Model, prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        raise ValueError("prompts must be a list of prompts (strings or lists of token ids), "
                         "not a single prompt; wrap it in a list")
    if not len(prompts):
        raise ValueError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("text prompts need a model with a tokenizer; pass token ids instead")
            ids = model.tokenizer.encode(p)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty (no tokens)")
        bad = [t for t in ids if not 0 <= t < model.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {model.cfg.vocab_size}): {bad[:5]}")
        out.append(ids)
    return out


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


def prepare(model: Model, prompts, *, max_new_tokens=64, stop_ids=None, seed=0, n: int = 1,
            candidates: int = smp.DEFAULT_CANDIDATES, **knobs):
    """Validate and pad a request into the numpy arguments of `generate_jit` and its Plan.

    n > 1 asks for n samples of each prompt: per-row arguments get P * n rows in prompt-major order
    (knobs given per prompt are repeated for its samples), the prompts stay P rows (one prefill)."""
    ids = _encode_prompts(model, prompts)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
    P = len(ids)
    R = P * n  # sample rows
    if R > BATCH_BUCKETS[-1]:
        raise ValueError(f"{P} prompts x n={n} samples = {R} rows exceeds the largest batch bucket {BATCH_BUCKETS[-1]}")
    mnt = smp._per_row("max_new_tokens", _per_sample(max_new_tokens, P, n, "scalar"), R, np.int32)
    if np.any(mnt <= 0):
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    longest = max(len(x) for x in ids)
    for i, x in enumerate(ids):
        if len(x) + mnt[i * n:(i + 1) * n].max() > model.cfg.max_seq_len:
            raise ValueError(f"prompt {i}: {len(x)} tokens + max_new_tokens {mnt[i * n]} exceeds "
                             f"{model.cfg.name}'s context of {model.cfg.max_seq_len} tokens")
    if stop_ids is None:
        stop_ids = list(getattr(model.tokenizer, "stop_ids", ()) or ())
    per_row_stops = len(stop_ids) > 0 and isinstance(stop_ids[0], (list, tuple))
    if per_row_stops and len(stop_ids) not in (P, R):
        raise ValueError(f"stop_ids has {len(stop_ids)} rows but there are {P} prompts")
    if per_row_stops and len(stop_ids) == P:
        stop_ids = _per_sample(stop_ids, P, n, "list")
    stops = [list(stop_ids[i]) if per_row_stops else list(stop_ids) for i in range(R)]
    most = max(len(s) for s in stops)
    knobs = {k: _per_sample(v, P, n, "bias" if k == "logit_bias" else "list" if k == "banned_ids" else "scalar")
             for k, v in knobs.items()}
    sp = smp.make_sampling_params(R, vocab_size=model.cfg.vocab_size, candidates=candidates, **knobs)
    p = plan(model.cfg, P, longest, int(mnt.max()), stop_slots=most, bias_slots=sp.bias_ids.shape[1],
             penalties=smp.uses_penalties(sp), n=n)
    if np.isscalar(seed) or np.ndim(seed) == 0:
        # Row i of a scalar seed s uses s * 1_000_003 + i (i counts sample rows); pass one seed per
        # row to make a row's samples independent of its place in the batch.
        seeds = (int(seed) * 1_000_003 + np.arange(R)) % (2 ** 31)
    elif n > 1 and np.ndim(seed) == 1 and len(seed) == P:  # one seed per prompt: sample j of it uses s * 1_000_003 + j
        seeds = (np.repeat(np.asarray(seed, np.int64), n) * 1_000_003 + np.tile(np.arange(n), P)) % (2 ** 31)
    else:
        seeds = smp._per_row("seed", seed, R, np.int64)
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
    args = dict(prompts=tok, prompt_lengths=pad(np.array([len(x) for x in ids], np.int32), 0, Pb), sp=sp,
                max_new_tokens=pad(mnt, 0), stop_ids=stop_arr,
                seeds=pad(np.asarray(seeds, np.uint32), 0))
    return ids, args, p


def generate(model: Model, prompts, *, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
             min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
             logit_bias=None, banned_ids=None, stop_ids=None, seed=0, top_logprobs: int = 0, n: int = 1,
             candidates: int = smp.DEFAULT_CANDIDATES) -> list[Completion]:
    """Generate continuations for a list of prompts (strings, or lists of token ids).

    Every knob is a scalar or one value per prompt. temperature 0 (the default) is greedy decoding;
    see `jaxgen.sampling` for each transform's exact semantics and order. stop_ids defaults to the
    tokenizer's end-of-sequence ids. Returns one Completion per prompt, in order; with n > 1, n per
    prompt (prompt-major, `Completion.sample` = 0 .. n-1) from one prefill of each prompt: exactly
    what generating the list with each prompt repeated n times gives (same seeds, same tokens).
    """
    ids, args, p = prepare(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, seed=seed, n=n,
                           candidates=candidates, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p, repetition_penalty=repetition_penalty,
                           presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                           logit_bias=logit_bias, banned_ids=banned_ids)
    if top_logprobs < 0 or top_logprobs > model.cfg.vocab_size:
        raise ValueError(f"top_logprobs must be in [0, {model.cfg.vocab_size}], got {top_logprobs}")
    out = fetch(run(model, args, p, top_logprobs, candidates))
    return to_completions(model, prompts, out, len(ids) * n, n)


def run(model: Model, args: dict, p: Plan, top_logprobs: int = 0,
        candidates: int = smp.DEFAULT_CANDIDATES) -> GenerateOutput:
    """Call the compiled program on `prepare`d arguments (always by keyword: jit keys its cache on
    how arguments are passed, so every caller goes through here)."""
    return generate_jit(model.params, **place(model, args), cfg=model.cfg, max_new=p.max_new,
                        cache_len=p.cache_len, top_logprobs=top_logprobs, candidates=candidates, mesh=model.mesh,
                        kv_quant=model.kv_quant, penalties=p.penalties, n=p.n)


def place(model: Model, args: dict) -> dict:
    """With a mesh, put every per-row argument on the `data` axis (each process holds the whole
    host batch; device_put keeps the rows of its own devices)."""
    if model.mesh is None:
        return args
    from jaxgen.sharding import batch_sharding

    return jax.tree.map(lambda a: jax.device_put(a, batch_sharding(model.mesh, np.ndim(a))), args)


def fetch(tree):
    """Host numpy copy of a (possibly multi-process) result."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def to_completions(model: Model, prompts, out: GenerateOutput, rows: int, n: int = 1) -> list[Completion]:
    """Completions of the first `rows` rows of `out`; with n samples per prompt, row i is sample
    i % n of prompts[i // n]."""
    results = []
    for i in range(rows):
        k = int(out.num_new[i])
        toks = [int(t) for t in out.tokens[i, :k]]
        finish = FINISH_REASONS.get(int(out.finish[i]), "length")
        text = None
        if model.tokenizer is not None:
            body = toks[:-1] if finish == "stop" else toks
            text = model.tokenizer.decode(body)
        top = None
        if out.top_ids.shape[-1]:
            top = [[(int(a), float(b)) for a, b in zip(out.top_ids[i, j], out.top_logprobs[i, j])]
                   for j in range(k)]
        results.append(Completion(tokens=toks, finish_reason=finish,
                                  logprobs=[float(x) for x in out.logprobs[i, :k]], text=text,
                                  prompt=prompts[i // n], top_logprobs=top, sample=i % n))
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

    if chunk_steps < 1:
        raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    ids, args, p = prepare(model, prompts, candidates=candidates, **request)
    statics = dict(cfg=model.cfg, max_new=p.max_new, cache_len=p.cache_len, top_logprobs=top_logprobs,
                   candidates=candidates, mesh=model.mesh, kv_quant=model.kv_quant, penalties=p.penalties, n=p.n)
    args = place(model, args)
    loop_args = {k: args[k] for k in ("sp", "max_new_tokens", "stop_ids", "seeds")}
    t0 = time.perf_counter()
    lowered = prefill_jit.lower(model.params, **args, **statics)
    prefill_c = lowered.compile()
    # decode takes the state exactly as prefill lays it out (shapes, and shardings on a mesh)
    state_shape = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                               lowered.out_info, prefill_c.output_shardings)
    decode_c = decode_jit.lower(model.params, state_shape, **loop_args, until=np.int32(0), cfg=model.cfg,
                                candidates=candidates, mesh=model.mesh).compile()
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
                seeds=np.zeros((B,), np.uint32))
    jax.block_until_ready(run(model, args, p, top_logprobs, candidates))
    return p
