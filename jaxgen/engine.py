"""The compiled engine: pure, jittable functions over a decode-state pytree. No host state, no
validation, no Python callbacks, so they run inside a user's own `jax.jit` (RL rollouts, evals).

- `prefill(params, prompts, prompt_lengths, sp, max_new_tokens, stop_ids, seeds, *, cfg, ...)` ->
  DecodeState: one forward pass over right-padded prompts [B, T], the first new token sampled.
- `decode(params, state, ..., until)` -> DecodeState: a `lax.while_loop`, one token per row per step,
  until `until` steps or every row is done (so it can be run in chunks).
- `insert(state, new, slots)`: prefilled rows into a running state (continuous batching).
- `generate_tokens(...)` -> GenerateOutput: prefill then decode, what `generate_jit` compiles.
- `append_tokens` / `record`: where stops, budgets and the penalty history are decided (plain decoding
  appends one token per step, speculative decoding a block).

The host API (`jaxgen.generate`: validation, buckets, text in and out) builds their arguments.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen import sampling as smp
from jaxgen.cache import KVCache, init_cache, padded_positions
from jaxgen.config import ModelConfig
from jaxgen.model import Params, forward_hidden, unembed

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


def record(s: DecodeState, logits, sp, max_new_tokens, stop_ids, seeds, top_n, candidates, pad_id):
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
            kv_quant: str | None = None, cache_extra: int = 0, penalties: bool = True, n: int = 1) -> DecodeState:
    """Prefill right-padded prompts [P, T] in one forward pass and sample the first new token of
    B = P * n decode rows: with n > 1 each prompt's cache row (and penalty history) is copied in-graph
    to its n rows (prompt-major: rows p * n .. p * n + n - 1), which then sample independently, so n
    samples cost one prefill. The per-row arguments (sp, max_new_tokens, stop_ids, seeds) have B rows.
    With a `mesh`, the returned state is constrained to `sharding.state_shardings`; kv_quant="int8"
    keeps the KV cache in int8 (see jaxgen.cache); cache_extra adds ring slots (speculative rollback);
    penalties=False builds a state without the [B, V] penalty history (the penalty knobs are then
    ignored: `prepare` sets it from the request)."""
    P, T = prompts.shape
    B = P * n
    V = cfg.vocab_size
    rows = jnp.arange(P)
    positions = padded_positions(prompt_lengths, T)  # [P, T]
    cache = init_cache(cfg, P, cache_len, params.embed.dtype, extra=cache_extra, kv_quant=kv_quant)
    h, cache = forward_hidden(params, prompts, positions, cache, cfg)  # [P, T, D]
    h_last = h[rows, jnp.maximum(prompt_lengths - 1, 0)]  # [P, D]
    logits = unembed(params, h_last, cfg)  # [P, V]

    H = V if penalties else 0
    seen = jnp.zeros((P, H), bool).at[rows[:, None], jnp.where(positions >= 0, prompts, H)].set(True, mode="drop")
    if n > 1:  # prompt row p -> decode rows p * n + j
        rep = lambda a, axis=0: jnp.repeat(a, n, axis=axis)
        cache = cache.with_stacks(jax.tree.map(lambda a: rep(a, 1), cache.stacks()),  # rows are axis 1: [L, P, ...]
                                  pos_local=rep(cache.pos_local), pos_global=rep(cache.pos_global),
                                  lengths=rep(cache.lengths))
        logits, seen, prompt_lengths = rep(logits), rep(seen), rep(prompt_lengths)  # [B, V], [B, H], [B]
    k = top_logprobs
    state = DecodeState(
        step=jnp.zeros((), jnp.int32), tokens=jnp.full((B, max_new), pad_id, jnp.int32),
        logprobs=jnp.zeros((B, max_new), jnp.float32),
        top_ids=jnp.zeros((B, max_new, k), jnp.int32), top_logprobs=jnp.zeros((B, max_new, k), jnp.float32),
        last=jnp.zeros((B,), jnp.int32), done=(prompt_lengths <= 0) | (max_new_tokens <= 0),
        finish=jnp.zeros((B,), jnp.int32), num_new=jnp.zeros((B,), jnp.int32),
        seen=seen, counts=jnp.zeros((B, H), jnp.int32), cache=cache)
    return _constrain(record(state, logits, sp, max_new_tokens, stop_ids, seeds, k, candidates, pad_id), mesh)


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
        return _constrain(record(s.replace(cache=cache), logits, sp, max_new_tokens, stop_ids, seeds, top_n,
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
                    penalties: bool = True, n: int = 1) -> GenerateOutput:
    """Prefill right-padded prompts [P, T] in one pass, then decode up to `max_new` tokens for each
    of the B = P * n rows (n samples per prompt, prompt-major; see `prefill`).

    Traced: params, prompts [P, T] int32, prompt_lengths [P] int32 (0 = padding row), sp (per-row
    knobs, [B]), max_new_tokens [B] int32 (<= max_new), stop_ids [B, NS] int32 (-1 = unused), seeds [B].
    Static: cfg, max_new (the token buffer M), cache_len, top_logprobs, candidates, pad_id, mesh
    (a jax.sharding.Mesh: the decode state is then kept on `jaxgen.sharding`'s shardings), kv_quant
    (None or "int8": the KV cache's storage), penalties (False: no [B, V] penalty history is carried
    and the repetition / presence / frequency knobs are ignored; `prepare`'s Plan says which a request
    needs), n (samples per prompt). The loop exits as soon as every row is done.
    """
    state = prefill(params, prompts, prompt_lengths, sp, max_new_tokens, stop_ids, seeds, cfg=cfg,
                    max_new=max_new, cache_len=cache_len, top_logprobs=top_logprobs,
                    candidates=candidates, pad_id=pad_id, mesh=mesh, kv_quant=kv_quant, penalties=penalties, n=n)
    state = decode(params, state, sp, max_new_tokens, stop_ids, seeds, jnp.int32(max_new), cfg=cfg,
                   candidates=candidates, pad_id=pad_id, mesh=mesh)
    return output(state)


_STATIC = ("cfg", "max_new", "cache_len", "top_logprobs", "candidates", "pad_id", "mesh", "kv_quant", "penalties",
           "n")
generate_jit = jax.jit(generate_tokens, static_argnames=_STATIC)
# The streaming pair: the same two phases as separate programs, so a caller can read tokens between
# chunks of decode steps. The state is donated: each chunk updates the cache in place.
prefill_jit = jax.jit(prefill, static_argnames=_STATIC)
insert_jit = jax.jit(insert, donate_argnames="state")
decode_jit = jax.jit(decode, static_argnames=("cfg", "candidates", "pad_id", "mesh"), donate_argnames="state")
