"""Generation: one jitted program that prefills a ragged batch and decodes in a `lax.while_loop`.

Two layers:
- `generate_tokens(params, prompts, prompt_lengths, sampling, max_new_tokens, stop_ids, seeds, *, cfg,
  ...)`: pure and jittable (no host callbacks, no Python state), so it runs inside a user's own
  `jax.jit`; `generate_jit` is it under `jax.jit` with the static arguments marked.
- `generate(model, prompts, ...)`: the host-side API. It validates input (clear ValueErrors before any
  compilation), pads to shape buckets, and calls `generate_jit`. Any prompts within one bucket and any
  knob values reuse one compiled program.

Buckets: prompt length rounds up to PROMPT_BUCKETS, batch to BATCH_BUCKETS, max_new_tokens to
NEW_TOKEN_BUCKETS; the cache holds prompt bucket + new-token bucket positions (capped at the model's
max_seq_len). Padding rows are done from the start and cost one prefill row.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen import sampling as smp
from jaxgen.cache import KVCache, init_cache, padded_positions
from jaxgen.config import ModelConfig
from jaxgen.model import Params, forward_hidden, unembed

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
NEW_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SLOT_BUCKETS = smp.SLOT_BUCKETS  # stop ids per row (and, in sampling, biased/banned ids per row)
STOP, LENGTH = 1, 2  # finish codes; 0 = still running
FINISH_REASONS = {STOP: "stop", LENGTH: "length"}


@struct.dataclass
class DecodeState:
    step: jax.Array  # [] int32 tokens generated so far (== next column of `tokens`)
    tokens: jax.Array  # [B, M] int32 generated ids; pad_id after a row's end
    logprobs: jax.Array  # [B, M] f32 log-probability of each chosen token under the raw model
    top_ids: jax.Array  # [B, M, n] int32 top-n alternatives per step (n = top_logprobs, may be 0)
    top_logprobs: jax.Array  # [B, M, n] f32
    last: jax.Array  # [B] int32 last chosen token (the next decode input)
    done: jax.Array  # [B] bool
    finish: jax.Array  # [B] int32 STOP / LENGTH once done, else 0
    num_new: jax.Array  # [B] int32 tokens generated per row (a stop token counts)
    # Penalty history, [B, V] only in programs built with penalties=True (5 bytes x B x V: 1.3 GB at
    # batch 1024 on Gemma's 262k vocabulary), else [B, 0]: a greedy or plain-sampled batch carries none.
    seen: jax.Array  # [B, V | 0] bool token seen in prompt or output (repetition penalty)
    counts: jax.Array  # [B, V | 0] int32 generated-token counts (presence / frequency penalties)
    cache: KVCache


@struct.dataclass
class GenerateOutput:
    tokens: jax.Array  # [B, M] int32 new ids (pad_id past each row's num_new)
    num_new: jax.Array  # [B] int32
    finish: jax.Array  # [B] int32 STOP or LENGTH (0 only for padding rows)
    logprobs: jax.Array  # [B, M] f32
    top_ids: jax.Array  # [B, M, n] int32
    top_logprobs: jax.Array  # [B, M, n] f32
    steps: jax.Array  # [] int32 decode-loop iterations run (+1 for the token sampled after prefill)


def append_tokens(s: DecodeState, cand: jax.Array, avail: jax.Array, logprobs: jax.Array,
                  max_new_tokens: jax.Array, stop_ids: jax.Array):
    """Append up to J new tokens per row: the first avail [B] of cand [B, J] (raw-model logprobs
    [B, J]), cut after the first stop id and at the row's budget; done rows take nothing. Updates
    tokens, logprobs, penalty history, last, done / finish and num_new. The one place where stops and
    budgets are decided: plain decoding appends one token per step, speculative decoding a block.
    Returns (state, n_emit [B])."""
    B, J = cand.shape
    V = s.seen.shape[1]
    M = s.tokens.shape[1]
    active = ~s.done
    j = jnp.arange(J)[None, :]
    is_stop = jnp.any(cand[:, :, None] == stop_ids[:, None, :], axis=-1)  # [B, J]
    room = max_new_tokens - s.num_new  # [B] >= 1 while active
    valid = (j < avail[:, None]) & (j < room[:, None])
    first_stop = jnp.min(jnp.where(is_stop & valid, j, J), axis=1)
    n_emit = jnp.where(active, jnp.minimum(jnp.minimum(avail, room), first_stop + 1), 0)  # [B]
    emit = j < n_emit[:, None]  # [B, J]
    hit_stop = active & (first_stop < n_emit)
    hit_len = active & ~hit_stop & (s.num_new + n_emit >= max_new_tokens)
    r2 = jnp.arange(B)[:, None]
    cols = jnp.where(emit, s.num_new[:, None] + j, M)  # out of range -> dropped
    seen, counts = s.seen, s.counts
    if V:  # penalty history: the emitted tokens become seen and counted
        ids = jnp.where(emit, cand, V)
        seen = seen.at[r2, ids].set(True, mode="drop")
        counts = counts.at[r2, ids].add(1, mode="drop")
    last = jnp.take_along_axis(cand, jnp.maximum(n_emit - 1, 0)[:, None], 1)[:, 0]
    state = s.replace(
        step=s.step + 1, tokens=s.tokens.at[r2, cols].set(cand, mode="drop"),
        logprobs=s.logprobs.at[r2, cols].set(logprobs.astype(jnp.float32), mode="drop"),
        last=jnp.where(n_emit > 0, last, s.last), done=s.done | hit_stop | hit_len,
        finish=jnp.where(hit_stop, STOP, jnp.where(hit_len, LENGTH, s.finish)), num_new=s.num_new + n_emit,
        seen=seen, counts=counts)
    return state, n_emit


def _record(s: DecodeState, logits, sp, max_new_tokens, stop_ids, seeds, top_n, candidates, pad_id):
    """Sample one token per row from logits [B, V] and append it (`append_tokens`). Keyed by
    (seed, num_new): rows are independent of their neighbours and of the step at which they joined."""
    B = logits.shape[0]
    rows = jnp.arange(B)
    hist = (s.seen, s.counts) if s.seen.shape[1] else (None, None)
    tok = smp.sample(logits, smp.row_keys(seeds, s.num_new), sp, *hist, candidates)
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B]; no [B, V] log-softmax is materialized
    tok = jnp.where(s.done, pad_id, tok)
    idx = jnp.where(s.done, s.tokens.shape[1], s.num_new)  # done rows write nothing (dropped)
    if top_n:
        top_lp, top_ids = jax.lax.top_k(logits, top_n)
        top_lp = top_lp - lse[:, None]
        col = lambda buf, val: buf.at[rows, idx].set(val.astype(buf.dtype), mode="drop")
        s = s.replace(top_ids=col(s.top_ids, top_ids), top_logprobs=col(s.top_logprobs, top_lp))
    s, _ = append_tokens(s, tok[:, None], jnp.ones((B,), jnp.int32), (logits[rows, tok] - lse)[:, None],
                         max_new_tokens, stop_ids)
    return s


def prefill(params: Params, prompts: jax.Array, prompt_lengths: jax.Array, sp: smp.SamplingParams,
            max_new_tokens: jax.Array, stop_ids: jax.Array, seeds: jax.Array, *, cfg: ModelConfig,
            max_new: int, cache_len: int, top_logprobs: int = 0,
            candidates: int = smp.DEFAULT_CANDIDATES, pad_id: int = 0, mesh=None,
            kv_quant: str | None = None, cache_extra: int = 0, penalties: bool = True) -> DecodeState:
    """Prefill right-padded prompts [B, T] in one forward pass and sample the first new token.
    With a `mesh`, the returned state is constrained to `sharding.state_shardings`; kv_quant="int8"
    keeps the KV cache in int8 (see jaxgen.cache); cache_extra adds ring slots (speculative rollback);
    penalties=False builds a state without the [B, V] penalty history (the penalty knobs are then
    ignored: `prepare` sets it from the request)."""
    B, T = prompts.shape
    V = cfg.vocab_size
    rows = jnp.arange(B)
    positions = padded_positions(prompt_lengths, T)  # [B, T]
    cache = init_cache(cfg, B, cache_len, params.embed.dtype, extra=cache_extra, kv_quant=kv_quant)
    h, cache = forward_hidden(params, prompts, positions, cache, cfg)  # [B, T, D]
    h_last = h[rows, jnp.maximum(prompt_lengths - 1, 0)]  # [B, D]
    logits = unembed(params, h_last, cfg)  # [B, V]

    H = V if penalties else 0
    seen = jnp.zeros((B, H), bool).at[rows[:, None], jnp.where(positions >= 0, prompts, H)].set(True, mode="drop")
    n = top_logprobs
    state = DecodeState(
        step=jnp.zeros((), jnp.int32), tokens=jnp.full((B, max_new), pad_id, jnp.int32),
        logprobs=jnp.zeros((B, max_new), jnp.float32),
        top_ids=jnp.zeros((B, max_new, n), jnp.int32), top_logprobs=jnp.zeros((B, max_new, n), jnp.float32),
        last=jnp.zeros((B,), jnp.int32), done=(prompt_lengths <= 0) | (max_new_tokens <= 0),
        finish=jnp.zeros((B,), jnp.int32), num_new=jnp.zeros((B,), jnp.int32),
        seen=seen, counts=jnp.zeros((B, H), jnp.int32), cache=cache)
    return _constrain(_record(state, logits, sp, max_new_tokens, stop_ids, seeds, n, candidates, pad_id), mesh)


def _constrain(state: DecodeState, mesh) -> DecodeState:
    """Pin the loop carry to fixed shardings (rows on `data`, cache as the rules say), so the
    while_loop neither reshards nor lets GSPMD pick a different layout per iteration."""
    if mesh is None:
        return state
    from jaxgen.sharding import state_shardings

    return jax.lax.with_sharding_constraint(state, state_shardings(jax.eval_shape(lambda: state), mesh))


def decode(params: Params, state: DecodeState, sp: smp.SamplingParams, max_new_tokens: jax.Array,
           stop_ids: jax.Array, seeds: jax.Array, until: jax.Array, *, cfg: ModelConfig,
           candidates: int = smp.DEFAULT_CANDIDATES, pad_id: int = 0, mesh=None) -> DecodeState:
    """Decode one token per row per step while step < until (traced) and some row is not done.

    Running it to `until = M` at once or in chunks gives the same tokens: each step depends only on
    the state, the row's seed and the step index."""
    top_n = state.top_ids.shape[-1]

    def cond(s: DecodeState):  # every row stops by its max_new_tokens <= M, so `until` bounds chunks only
        return (s.step < until) & ~jnp.all(s.done)

    def body(s: DecodeState):
        pos = jnp.where(s.done, -1, s.cache.lengths)[:, None]  # finished rows write nothing
        h, cache = forward_hidden(params, s.last[:, None], pos, s.cache, cfg)
        logits = unembed(params, h[:, 0], cfg)
        return _constrain(_record(s.replace(cache=cache), logits, sp, max_new_tokens, stop_ids, seeds, top_n,
                                  candidates, pad_id), mesh)

    return jax.lax.while_loop(cond, body, state)


def insert(state: DecodeState, new: DecodeState, slots: jax.Array) -> DecodeState:
    """Continuous batching: put the rows of `new` (a prefilled state with the same M and cache
    shapes) into rows `slots` [b] of a running state; a slot >= B drops that row. The running
    state's step counter is kept; each row carries its own position and token count."""
    put = lambda a, b, axis=0: a.at[(slice(None),) * axis + (slots,)].set(b, mode="drop")
    c, n = state.cache, new.cache
    stacks = jax.tree.map(lambda a, b: put(a, b, 1), c.stacks(), n.stacks())  # rows are axis 1: [L, B, ...]
    cache = c.with_stacks(stacks, pos_local=put(c.pos_local, n.pos_local), pos_global=put(c.pos_global, n.pos_global),
                          lengths=put(c.lengths, n.lengths))
    rows = ("tokens", "logprobs", "top_ids", "top_logprobs", "last", "done", "finish", "num_new", "seen", "counts")
    return state.replace(cache=cache, **{f: put(getattr(state, f), getattr(new, f)) for f in rows})


def output(state: DecodeState) -> GenerateOutput:
    return GenerateOutput(tokens=state.tokens, num_new=state.num_new, finish=state.finish,
                          logprobs=state.logprobs, top_ids=state.top_ids,
                          top_logprobs=state.top_logprobs, steps=state.step)


def generate_tokens(params: Params, prompts: jax.Array, prompt_lengths: jax.Array,
                    sp: smp.SamplingParams, max_new_tokens: jax.Array, stop_ids: jax.Array,
                    seeds: jax.Array, *, cfg: ModelConfig, max_new: int, cache_len: int,
                    top_logprobs: int = 0, candidates: int = smp.DEFAULT_CANDIDATES,
                    pad_id: int = 0, mesh=None, kv_quant: str | None = None,
                    penalties: bool = True) -> GenerateOutput:
    """Prefill right-padded prompts [B, T] in one pass, then decode up to `max_new` tokens per row.

    Traced: params, prompts [B, T] int32, prompt_lengths [B] int32 (0 = padding row), sp (per-row
    knobs), max_new_tokens [B] int32 (<= max_new), stop_ids [B, NS] int32 (-1 = unused), seeds [B].
    Static: cfg, max_new (the token buffer M), cache_len, top_logprobs, candidates, pad_id, mesh
    (a jax.sharding.Mesh: the decode state is then kept on `jaxgen.sharding`'s shardings), kv_quant
    (None or "int8": the KV cache's storage), penalties (False: no [B, V] penalty history is carried
    and the repetition / presence / frequency knobs are ignored; `prepare`'s Plan says which a request
    needs). The loop exits as soon as every row is done.
    """
    state = prefill(params, prompts, prompt_lengths, sp, max_new_tokens, stop_ids, seeds, cfg=cfg,
                    max_new=max_new, cache_len=cache_len, top_logprobs=top_logprobs,
                    candidates=candidates, pad_id=pad_id, mesh=mesh, kv_quant=kv_quant, penalties=penalties)
    state = decode(params, state, sp, max_new_tokens, stop_ids, seeds, jnp.int32(max_new), cfg=cfg,
                   candidates=candidates, pad_id=pad_id, mesh=mesh)
    return output(state)


_STATIC = ("cfg", "max_new", "cache_len", "top_logprobs", "candidates", "pad_id", "mesh", "kv_quant", "penalties")
generate_jit = jax.jit(generate_tokens, static_argnames=_STATIC)
# The streaming pair: the same two phases as separate programs, so a caller can read tokens between
# chunks of decode steps. The state is donated: each chunk updates the cache in place.
prefill_jit = jax.jit(prefill, static_argnames=_STATIC)
insert_jit = jax.jit(insert, donate_argnames="state")
decode_jit = jax.jit(decode, static_argnames=("cfg", "candidates", "pad_id", "mesh"), donate_argnames="state")


# ---- host side: buckets, validation, the high-level API ----------------------------------------
def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class Model:
    """What `generate` needs: a config, params and (optionally) a tokenizer for text in/out."""
    cfg: ModelConfig
    params: Params
    tokenizer: Any = None
    mesh: Any = None  # a jax.sharding.Mesh when params are sharded (see jaxgen.sharding)
    kv_quant: str | None = None  # None (cache in the params' dtype) or "int8" (see jaxgen.cache)


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # new ids (a stop token, if hit, is the last one)
    finish_reason: str  # "stop" or "length"
    logprobs: list[float]  # raw-model log-probability of each new token
    text: str | None = None  # detokenized new tokens (stop token excluded), when a tokenizer is set
    prompt: str | list[int] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per step (id, logprob) pairs

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
    batch: int  # B bucket
    prompt_len: int  # T bucket
    max_new: int  # M bucket
    cache_len: int  # S
    stop_slots: int  # NS, a SLOT_BUCKETS bucket
    bias_slots: int  # NB, a SLOT_BUCKETS bucket
    penalties: bool = True  # whether the decode state carries the [B, V] penalty history


def plan(cfg: ModelConfig, batch: int, prompt_len: int, max_new: int, stop_slots: int = SLOT_BUCKETS[0],
         bias_slots: int = SLOT_BUCKETS[0], penalties: bool = True) -> Plan:
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
                bias_slots=bucket(bias_slots, SLOT_BUCKETS, "biased/banned ids per row"), penalties=penalties)


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


def prepare(model: Model, prompts, *, max_new_tokens=64, stop_ids=None, seed=0,
            candidates: int = smp.DEFAULT_CANDIDATES, **knobs):
    """Validate and pad a request into the numpy arguments of `generate_jit` and its Plan."""
    ids = _encode_prompts(model, prompts)
    n = len(ids)
    mnt = smp._per_row("max_new_tokens", max_new_tokens, n, np.int32)
    if np.any(mnt <= 0):
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    longest = max(len(x) for x in ids)
    for i, x in enumerate(ids):
        if len(x) + mnt[i] > model.cfg.max_seq_len:
            raise ValueError(f"prompt {i}: {len(x)} tokens + max_new_tokens {mnt[i]} exceeds "
                             f"{model.cfg.name}'s context of {model.cfg.max_seq_len} tokens")
    if stop_ids is None:
        stop_ids = list(getattr(model.tokenizer, "stop_ids", ()) or ())
    per_row_stops = len(stop_ids) > 0 and isinstance(stop_ids[0], (list, tuple))
    stops = [list(stop_ids[i]) if per_row_stops else list(stop_ids) for i in range(n)]
    if per_row_stops and len(stop_ids) != n:
        raise ValueError(f"stop_ids has {len(stop_ids)} rows but there are {n} prompts")
    most = max(len(s) for s in stops)
    sp = smp.make_sampling_params(n, vocab_size=model.cfg.vocab_size, candidates=candidates, **knobs)
    p = plan(model.cfg, n, longest, int(mnt.max()), stop_slots=most, bias_slots=sp.bias_ids.shape[1],
             penalties=smp.uses_penalties(sp))
    if np.isscalar(seed) or np.ndim(seed) == 0:
        # Row i of a scalar seed s uses s * 1_000_003 + i; pass one seed per row to make a row's
        # samples independent of its place in the batch.
        seeds = (int(seed) * 1_000_003 + np.arange(n)) % (2 ** 31)
    else:
        seeds = smp._per_row("seed", seed, n, np.int64)
    if model.mesh is not None:  # rows split evenly over the data axis
        d = model.mesh.shape["data"]
        p = dataclasses.replace(p, batch=-(-p.batch // d) * d)
    B, T = p.batch, p.prompt_len
    pad = lambda a, fill: np.concatenate([a, np.full((B - n,) + a.shape[1:], fill, a.dtype)])
    tok = np.zeros((B, T), np.int32)
    for i, x in enumerate(ids):
        tok[i, :len(x)] = x
    stop_arr = np.full((B, p.stop_slots), -1, np.int32)
    for i, s in enumerate(stops):
        stop_arr[i, :len(s)] = s
    sp = jax.tree.map(lambda a: pad(a, a[0] if a.ndim == 1 else (-1 if a.dtype == np.int32 else 0)), sp)
    args = dict(prompts=tok, prompt_lengths=pad(np.array([len(x) for x in ids], np.int32), 0), sp=sp,
                max_new_tokens=pad(mnt, 0), stop_ids=stop_arr,
                seeds=pad(np.asarray(seeds, np.uint32), 0))
    return ids, args, p


def generate(model: Model, prompts, *, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
             min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
             logit_bias=None, banned_ids=None, stop_ids=None, seed=0, top_logprobs: int = 0,
             candidates: int = smp.DEFAULT_CANDIDATES) -> list[Completion]:
    """Generate continuations for a list of prompts (strings, or lists of token ids).

    Every knob is a scalar or one value per prompt. temperature 0 (the default) is greedy decoding;
    see `jaxgen.sampling` for each transform's exact semantics and order. stop_ids defaults to the
    tokenizer's end-of-sequence ids. Returns one Completion per prompt, in order.
    """
    ids, args, p = prepare(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, seed=seed,
                           candidates=candidates, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p, repetition_penalty=repetition_penalty,
                           presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                           logit_bias=logit_bias, banned_ids=banned_ids)
    if top_logprobs < 0 or top_logprobs > model.cfg.vocab_size:
        raise ValueError(f"top_logprobs must be in [0, {model.cfg.vocab_size}], got {top_logprobs}")
    out = fetch(run(model, args, p, top_logprobs, candidates))
    return to_completions(model, prompts, out, len(ids))


def run(model: Model, args: dict, p: Plan, top_logprobs: int = 0,
        candidates: int = smp.DEFAULT_CANDIDATES) -> GenerateOutput:
    """Call the compiled program on `prepare`d arguments (always by keyword: jit keys its cache on
    how arguments are passed, so every caller goes through here)."""
    return generate_jit(model.params, **place(model, args), cfg=model.cfg, max_new=p.max_new,
                        cache_len=p.cache_len, top_logprobs=top_logprobs, candidates=candidates, mesh=model.mesh,
                        kv_quant=model.kv_quant, penalties=p.penalties)


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


def to_completions(model: Model, prompts, out: GenerateOutput, n: int) -> list[Completion]:
    results = []
    for i in range(n):
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
                                  prompt=prompts[i], top_logprobs=top))
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
                   candidates=candidates, mesh=model.mesh, kv_quant=model.kv_quant, penalties=p.penalties)
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
        if int(out.steps) >= p.max_new or bool(np.all(out.finish[:len(ids)] > 0)):
            break
        t = time.perf_counter()
        state = jax.block_until_ready(decode_c(model.params, state, **loop_args,
                                               until=np.int32(int(out.steps) + chunk_steps)))
        decode_s += time.perf_counter() - t
    if timings is not None:
        timings.update(compile_s=t1 - t0, prefill_s=t2 - t1, decode_s=decode_s,
                       new_tokens=int(out.num_new[:len(ids)].sum()))


def precompile(model: Model, batch: int, prompt_len: int, max_new_tokens: int, *, top_logprobs: int = 0,
               candidates: int = smp.DEFAULT_CANDIDATES, stop_slots: int = SLOT_BUCKETS[0],
               bias_slots: int = SLOT_BUCKETS[0], penalties: bool = False):
    """Compile the generate program for one bucket ahead of time, by running it once on a dummy
    request of that bucket whose rows are all padding (the loop exits at once); later requests that
    round to the same bucket reuse it (penalties=True: the program for requests that use a
    repetition / presence / frequency penalty). Returns the Plan."""
    p = plan(model.cfg, batch, prompt_len, max_new_tokens, stop_slots, bias_slots, penalties)
    B = p.batch
    args = dict(prompts=np.zeros((B, p.prompt_len), np.int32), prompt_lengths=np.zeros((B,), np.int32),
                sp=smp.make_sampling_params(B, candidates=candidates, bias_slots=p.bias_slots),
                max_new_tokens=np.zeros((B,), np.int32), stop_ids=np.full((B, p.stop_slots), -1, np.int32),
                seeds=np.zeros((B,), np.uint32))
    jax.block_until_ready(run(model, args, p, top_logprobs, candidates))
    return p
