"""The compiled engine: pure, jittable functions over a decode-state pytree. No host state, no
validation, no Python callbacks, so they run inside a user's own `jax.jit` (RL rollouts, evals).

- `prefill(params, prompts, prompt_lengths, sp, max_new_tokens, stop_ids, seeds, *, cfg, ...)` ->
  DecodeState: one forward pass over right-padded prompts [B, T], the first new token sampled.
- `decode(params, state, ..., until)` -> DecodeState: a `lax.while_loop`, one token per row per step,
  until `until` steps or every row is done (so it can be run in chunks).
- `start(...)` -> (DecodeState, logits): the prefill without its first choice (beam search scores
  the logits instead of sampling them: `jaxgen.beam`).
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

from jaxgen import backend
from jaxgen import constraints as con
from jaxgen import sampling as smp
from jaxgen import stops as sst
from jaxgen.cache import KVCache, init_cache, padded_positions, ring_size, row_scatter
from jaxgen.config import ModelConfig
from jaxgen.model import PREFILL_CHUNK, Params, forward_hidden, prefill_hidden, unembed
from jaxgen.sharding import by_rows, stack_shardings, top_k

STOP, LENGTH, STOP_STRING, CLOSED, ERROR = 1, 2, 3, 4, 5  # finish codes; 0 = still running
# CLOSED: the row's constraint accepts its text and allows nothing more; ERROR: the row's logits were
# not finite (NaN / inf: corrupt weights or an overflow), so nothing was sampled from them
FINISH_REASONS = {STOP: "stop", LENGTH: "length", STOP_STRING: "stop", CLOSED: "stop", ERROR: "error"}


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
    # batch 1024 on Gemma's 262k vocabulary, split over a mesh's data x model devices like the logits),
    # else [B, 0]: a greedy or plain-sampled batch carries none.
    seen: jax.Array  # [B, V | 0] bool token seen in prompt or output (repetition penalty)
    counts: jax.Array  # [B, V | 0] int32 generated-token counts (presence / frequency penalties)
    stop_state: jax.Array  # [B] int32 stop-string automaton state of the row's text so far
    stops: sst.StopStrings  # the stop-string tables (replicated) and each row's mask [B]
    cache: KVCache
    # Structured output (jaxgen.constraints): the tables (replicated) and each row's automaton state,
    # 0 = unconstrained. None in programs whose request has no constraint (no per-step cost there).
    cons: con.Constraints | None = None
    cstate: jax.Array | None = None  # [B] int32


@struct.dataclass
class Prefix:
    """A prompt prefix prefilled once, for any number of later prompts that continue it."""
    cache: KVCache  # one row: the prefix's keys / values at positions 0 .. length - 1 (cache.lengths [1])
    tokens: jax.Array  # [Tp] int32 the prefix ids, -1 past its length (they count as seen for penalties)


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
    tokens, logprobs, penalty history, last, done / finish, num_new and the stop-string state. The
    one place where stops and budgets are decided: plain decoding appends one token per step,
    speculative decoding a block. A stop id or a token completing a stop string is the row's last.
    Returns (state, n_emit [B])."""
    B, J = cand.shape
    V = s.seen.shape[1]
    M = s.tokens.shape[1]
    active = ~s.done
    j = jnp.arange(J)[None, :]
    is_stop = jnp.any(cand[:, :, None] == stop_ids[:, None, :], axis=-1)  # [B, J]
    str_states, str_hit = sst.advance(s.stops, s.stop_state, cand)  # [B, J] each
    closed = jnp.zeros_like(is_stop)
    if s.cons is not None:
        c_states, closed = con.advance(s.cons, s.cstate, cand)  # [B, J] each
    room = max_new_tokens - s.num_new  # [B] >= 1 while active
    valid = (j < avail[:, None]) & (j < room[:, None])
    first_stop = jnp.min(jnp.where((is_stop | str_hit | closed) & valid, j, J), axis=1)
    n_emit = jnp.where(active, jnp.minimum(jnp.minimum(avail, room), first_stop + 1), 0)  # [B]
    emit = j < n_emit[:, None]  # [B, J]
    hit_stop = active & (first_stop < n_emit)
    at_stop = lambda a: jnp.take_along_axis(a, jnp.minimum(first_stop, J - 1)[:, None], 1)[:, 0]
    by_id = at_stop(is_stop)  # a stop id that also completes a stop string counts as the id
    by_string = at_stop(str_hit)  # ... and a string completed on a closing token as the string
    hit_len = active & ~hit_stop & (s.num_new + n_emit >= max_new_tokens)
    cols = jnp.where(emit, s.num_new[:, None] + j, M)  # out of range -> dropped
    seen, counts = s.seen, s.counts
    if V:  # penalty history: the emitted tokens become seen and counted
        ids = jnp.where(emit, cand, V)
        seen = row_scatter(seen, jnp.ones_like(emit), ids)
        counts = row_scatter(counts, jnp.ones_like(cand), ids, add=True)
    at_last = lambda a: jnp.take_along_axis(a, jnp.maximum(n_emit - 1, 0)[:, None], 1)[:, 0]
    last = at_last(cand)
    state = s.replace(
        step=s.step + 1, tokens=row_scatter(s.tokens, cand, cols), logprobs=row_scatter(s.logprobs, logprobs, cols),
        last=jnp.where(n_emit > 0, last, s.last), done=s.done | hit_stop | hit_len,
        finish=jnp.where(hit_stop, jnp.where(by_id, STOP, jnp.where(by_string, STOP_STRING, CLOSED)),
                         jnp.where(hit_len, LENGTH, s.finish)),
        num_new=s.num_new + n_emit, seen=seen, counts=counts,
        stop_state=jnp.where(n_emit > 0, at_last(str_states), s.stop_state))
    if s.cons is not None:
        state = state.replace(cstate=jnp.where(n_emit > 0, at_last(c_states), s.cstate))
    return state, n_emit


def record(s: DecodeState, logits, sp, max_new_tokens, stop_ids, seeds, top_n, candidates, pad_id,
           paths: backend.Paths | None = None, mesh=None):
    """Sample one token per row from logits [B, V] and append it (`append_tokens`). Keyed by
    (seed, num_new): rows are independent of their neighbours and of the step at which they joined.
    On a `mesh`, each `data` shard draws its own rows (`by_rows`)."""
    B = logits.shape[0]
    hist = (s.seen, s.counts) if s.seen.shape[1] else (None, None)
    allowed = logits
    if s.cons is not None:  # before every sampling transform: they choose among the allowed tokens
        allowed = jnp.where(con.allowed(s.cons, s.cstate, stop_ids), logits, -jnp.inf)
    gates = backend.resolve(paths).gates
    # each device draws its own rows, and the candidates come from each model shard's own vocabulary
    top = lambda x, k: top_k(x, k, mesh, local=smp.top_candidates)
    draw = lambda a, keys, p, h: smp.sample(a, keys, p, *h, candidates, gates, top)
    tok = by_rows(draw, mesh, B)(allowed, smp.row_keys(seeds, s.num_new), sp, hist)
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B]; no [B, V] log-softmax is materialized
    tok = jnp.where(s.done, pad_id, tok)
    idx = jnp.where(s.done, s.tokens.shape[1], s.num_new)  # done rows write nothing (dropped)
    if top_n:
        top_lp, top_ids = top_k(logits, top_n, mesh)
        top_lp = top_lp - lse[:, None]
        col = lambda buf, val: row_scatter(buf, val[:, None], idx[:, None])
        s = s.replace(top_ids=col(s.top_ids, top_ids), top_logprobs=col(s.top_logprobs, top_lp))
    broken = ~jnp.isfinite(lse) & ~s.done  # a NaN or +inf logit (or none finite): end the row, emit nothing
    chosen = jnp.take_along_axis(logits, tok[:, None], 1)[:, 0]  # [B] (not logits[rows, tok]: see cache.row_scatter)
    s, _ = append_tokens(s, tok[:, None], (~broken).astype(jnp.int32), (chosen - lse)[:, None],
                         max_new_tokens, stop_ids)
    return s.replace(done=s.done | broken, finish=jnp.where(broken, ERROR, s.finish))


def start(params: Params, prompts: jax.Array, prompt_lengths: jax.Array, max_new_tokens: jax.Array, *,
          cfg: ModelConfig, max_new: int, cache_len: int, top_logprobs: int = 0, pad_id: int = 0,
          kv_quant: str | None = None, cache_extra: int = 0, penalties: bool = True, n: int = 1,
          stop_strings: sst.StopStrings | None = None, prefix: Prefix | None = None,
          prefill_chunk: int = PREFILL_CHUNK, constraints: con.Constraints | None = None,
          constraint_start: jax.Array | None = None, paths: backend.Paths | None = None,
          adapters: jax.Array | None = None, mesh=None) -> tuple[DecodeState, jax.Array]:
    """The prefill without its first choice: the decode state of B = P * n rows with nothing
    generated yet, and the logits [B, V] of each row's first new token (`prefill` samples from them,
    beam search scores them). Arguments as for `prefill`."""
    P, T = prompts.shape
    B = P * n
    V = cfg.vocab_size
    positions = padded_positions(prompt_lengths, T)  # [P, T]
    if prefix is None:
        cache = init_cache(cfg, P, cache_len, params.embed.dtype, extra=cache_extra, kv_quant=kv_quant)
    else:
        cache = _widen(prefix.cache, P, cache_len, cfg, cache_extra)
        positions = jnp.where(positions >= 0, positions + prefix.cache.lengths[0], -1)
    if adapters is not None:  # each prompt's LoRA slot in params.lora (jaxgen.lora)
        cache = cache.replace(adapter=jnp.asarray(adapters, jnp.int32))
    h_last, cache = prefill_hidden(params, prompts, positions, cache, cfg, prefill_chunk, paths,
                                   stack_shardings(cache, mesh))  # [P, D]
    logits = unembed(params, h_last, cfg, paths)  # [P, V]

    H = V if penalties else 0
    seen = row_scatter(jnp.zeros((P, H), bool), jnp.ones(prompts.shape, bool), jnp.where(positions >= 0, prompts, H))
    if prefix is not None:
        seen = seen.at[:, jnp.where(prefix.tokens >= 0, prefix.tokens, H)].set(True, mode="drop")
    stop_strings = _no_stop_strings(V, B) if stop_strings is None else jax.tree.map(jnp.asarray, stop_strings)
    if n > 1:  # prompt row p -> decode rows p * n + j
        rep = lambda a, axis=0: jnp.repeat(a, n, axis=axis)
        cache = cache.map_rows(lambda axis, a: rep(a, axis))
        logits, seen, prompt_lengths = rep(logits), rep(seen), rep(prompt_lengths)  # [B, V], [B, H], [B]
    k = top_logprobs
    state = DecodeState(
        step=jnp.zeros((), jnp.int32), tokens=jnp.full((B, max_new), pad_id, jnp.int32),
        logprobs=jnp.zeros((B, max_new), jnp.float32),
        top_ids=jnp.zeros((B, max_new, k), jnp.int32), top_logprobs=jnp.zeros((B, max_new, k), jnp.float32),
        last=jnp.zeros((B,), jnp.int32), done=(prompt_lengths <= 0) | (max_new_tokens <= 0),
        finish=jnp.zeros((B,), jnp.int32), num_new=jnp.zeros((B,), jnp.int32),
        seen=seen, counts=jnp.zeros((B, H), jnp.int32), stop_state=jnp.zeros((B,), jnp.int32),
        stops=stop_strings, cache=cache)
    if constraints is not None:
        state = state.replace(cons=jax.tree.map(jnp.asarray, constraints), cstate=jnp.asarray(constraint_start, jnp.int32))
    return state, logits


def prefill(params: Params, prompts: jax.Array, prompt_lengths: jax.Array, sp: smp.SamplingParams,
            max_new_tokens: jax.Array, stop_ids: jax.Array, seeds: jax.Array, *, cfg: ModelConfig,
            max_new: int, cache_len: int, top_logprobs: int = 0,
            candidates: int = smp.DEFAULT_CANDIDATES, pad_id: int = 0, mesh=None,
            kv_quant: str | None = None, cache_extra: int = 0, penalties: bool = True, n: int = 1,
            stop_strings: sst.StopStrings | None = None, prefix: Prefix | None = None,
            prefill_chunk: int = PREFILL_CHUNK, constraints: con.Constraints | None = None,
            constraint_start: jax.Array | None = None, paths: backend.Paths | None = None,
            adapters: jax.Array | None = None) -> DecodeState:
    """Prefill right-padded prompts [P, T] (`prefill_chunk` tokens per forward pass: see
    model.prefill_hidden) and sample the first new token of
    B = P * n decode rows: with n > 1 each prompt's cache row (and penalty history) is copied in-graph
    to its n rows (prompt-major: rows p * n .. p * n + n - 1), which then sample independently, so n
    samples cost one prefill. The per-row arguments (sp, max_new_tokens, stop_ids, seeds) have B rows.
    With a `mesh`, the returned state is constrained to `sharding.state_shardings` (and the cache held
    in them through the layers: model.forward_hidden's stack_shardings); kv_quant="int8"
    keeps the KV cache in int8 (see jaxgen.cache); cache_extra adds ring slots (speculative rollback);
    penalties=False builds a state without the [B, V] penalty history (the penalty knobs are then
    ignored: `prepare` sets it from the request). stop_strings: the tables of `jaxgen.stops` with a
    mask for each of the B rows (None: no stop strings). prefix: a `prefill_prefix` result that every
    prompt continues (prompts then hold only what follows it, at the positions after it).
    constraints, constraint_start [B]: `jaxgen.constraints` tables and each row's start state (None:
    no row is constrained, and the program carries nothing for it). paths: jaxgen.backend's
    implementation choices (None: the default backend's; see `_paths` for a mesh). adapters [P]
    int32: each prompt's slot in params.lora (jaxgen.lora; 0 = none), kept with its cache rows."""
    paths = _paths(paths, mesh)
    state, logits = start(params, prompts, prompt_lengths, max_new_tokens, cfg=cfg, max_new=max_new,
                          cache_len=cache_len, top_logprobs=top_logprobs, pad_id=pad_id, kv_quant=kv_quant,
                          cache_extra=cache_extra, penalties=penalties, n=n, stop_strings=stop_strings,
                          prefix=prefix, prefill_chunk=prefill_chunk, constraints=constraints,
                          constraint_start=constraint_start, paths=paths, adapters=adapters, mesh=mesh)
    return _constrain(record(state, logits, sp, max_new_tokens, stop_ids, seeds, top_logprobs, candidates, pad_id,
                             paths, mesh), mesh)


def _paths(paths: backend.Paths | None, mesh) -> backend.Paths:
    """The paths a program runs: `paths` or the default backend's; with a mesh the Pallas decode
    kernel becomes "live" (a pallas_call is not partitioned by GSPMD: it would gather the cache)."""
    paths = backend.resolve(paths)
    if mesh is not None and paths.decode_attention == "pallas":
        paths = paths.replace(decode_attention="live")
    return paths


def _no_stop_strings(V: int, B: int) -> sst.StopStrings:
    Q, C = sst.STATE_BUCKETS[0], sst.CLASS_BUCKETS[0]
    z = lambda *shape: jnp.zeros(shape, jnp.int32)
    return sst.StopStrings(token_class=z(V), next_state=z(Q, C), hit=z(Q, C), mask=z(B))


def prefill_prefix(params: Params, tokens: jax.Array, length: jax.Array, *, cfg: ModelConfig, cache_len: int,
                   kv_quant: str | None = None, prefill_chunk: int = PREFILL_CHUNK,
                   paths: backend.Paths | None = None, adapters: jax.Array | None = None) -> Prefix:
    """Prefill one prefix, tokens [1, Tp] right-padded to its length [1], into a one-row cache of
    cache_len (>= Tp) slots. `prefill(..., prefix=)` copies it to every row and continues it."""
    positions = padded_positions(length, tokens.shape[1])  # [1, Tp]
    cache = init_cache(cfg, 1, cache_len, params.embed.dtype, kv_quant=kv_quant)
    if adapters is not None:  # [1]: the prefix's keys hold this LoRA slot's projections
        cache = cache.replace(adapter=jnp.asarray(adapters, jnp.int32))
    _, cache = prefill_hidden(params, tokens, positions, cache, cfg, prefill_chunk, paths)
    return Prefix(cache=cache, tokens=jnp.where(positions[0] >= 0, tokens[0], -1))


def _widen(c: KVCache, P: int, cache_len: int, cfg: ModelConfig, extra: int = 0) -> KVCache:
    """A one-row prefix cache as P rows of a cache_len-slot cache. Global slots hold position p at slot
    p, so new slots go at the end; a ring shorter than the new one held fewer positions than its size
    (p < Sp <= window), also at slot p: it grows at the end too."""
    W, S = ring_size(cfg, cache_len, extra), cache_len
    grow = lambda a, axis, size, fill: jnp.pad(a, [(0, size - a.shape[axis]) if i == axis else (0, 0)
                                                for i in range(a.ndim)], constant_values=fill)
    rows = lambda a, axis: jnp.broadcast_to(a, a.shape[:axis] + (P,) + a.shape[axis + 1:])
    kl, vl, kg, vg = c.stacks()  # [L, 1, W|S, ...] (or (int8, scale) pairs)
    local = lambda t: jax.tree.map(lambda a: rows(grow(a, 2, W, 0), 1), t)
    glob = lambda t: jax.tree.map(lambda a: rows(grow(a, 2, S, 0), 1), t)
    return c.with_stacks((local(kl), local(vl), glob(kg), glob(vg)),
                         pos_local=rows(grow(c.pos_local, 1, W, -1), 0), pos_global=rows(grow(c.pos_global, 1, S, -1), 0),
                         lengths=rows(c.lengths, 0), adapter=None if c.adapter is None else rows(c.adapter, 0))


def _constrain(state: DecodeState, mesh) -> DecodeState:
    """Pin the loop carry to fixed shardings (rows on `data`, cache as the rules say), so the
    while_loop neither reshards nor lets GSPMD pick a different layout per iteration."""
    if mesh is None:
        return state
    from jaxgen.sharding import state_shardings

    return jax.lax.with_sharding_constraint(state, state_shardings(jax.eval_shape(lambda: state), mesh))


def decode(params: Params, state: DecodeState, sp: smp.SamplingParams, max_new_tokens: jax.Array,
           stop_ids: jax.Array, seeds: jax.Array, until: jax.Array, *, cfg: ModelConfig,
           candidates: int = smp.DEFAULT_CANDIDATES, pad_id: int = 0, mesh=None,
           paths: backend.Paths | None = None) -> DecodeState:
    """Decode one token per row per step while step < until (traced) and some row is not done.

    Running it to `until = M` at once or in chunks gives the same tokens: each step depends only on
    the state, the row's seed and the step index."""
    top_n = state.top_ids.shape[-1]
    paths = _paths(paths, mesh)

    def cond(s: DecodeState):  # every row stops by its max_new_tokens <= M, so `until` bounds chunks only
        return (s.step < until) & ~jnp.all(s.done)

    def body(s: DecodeState):
        pos = jnp.where(s.done, -1, s.cache.lengths)[:, None]  # finished rows write nothing
        h, cache = forward_hidden(params, s.last[:, None], pos, s.cache, cfg, paths=paths,
                                  stack_shardings=stack_shardings(s.cache, mesh))
        logits = unembed(params, h[:, 0], cfg, paths)
        return _constrain(record(s.replace(cache=cache), logits, sp, max_new_tokens, stop_ids, seeds, top_n,
                                  candidates, pad_id, paths, mesh), mesh)

    return jax.lax.while_loop(cond, body, state)


def insert(state: DecodeState, new: DecodeState, slots: jax.Array) -> DecodeState:
    """Continuous batching: put the rows of `new` (a prefilled state with the same M and cache
    shapes) into rows `slots` [b] of a running state; a slot >= B drops that row. The running
    state's step counter is kept; each row carries its own position and token count."""
    put = lambda a, b, axis=0: a.at[(slice(None),) * axis + (slots,)].set(b, mode="drop")
    cache = state.cache.map_rows(lambda axis, a, b: put(a, b, axis), new.cache)
    rows = ("tokens", "logprobs", "top_ids", "top_logprobs", "last", "done", "finish", "num_new", "seen", "counts",
            "stop_state") + (("cstate",) if state.cons is not None else ())
    # the stop-string (and constraint) tables are the running state's: every prefill of a run builds the same
    stops = state.stops.replace(mask=put(state.stops.mask, new.stops.mask))
    return state.replace(cache=cache, stops=stops, **{f: put(getattr(state, f), getattr(new, f)) for f in rows})


def output(state: DecodeState) -> GenerateOutput:
    return GenerateOutput(tokens=state.tokens, num_new=state.num_new, finish=state.finish,
                          logprobs=state.logprobs, top_ids=state.top_ids,
                          top_logprobs=state.top_logprobs, steps=state.step)


def generate_tokens(params: Params, prompts: jax.Array, prompt_lengths: jax.Array,
                    sp: smp.SamplingParams, max_new_tokens: jax.Array, stop_ids: jax.Array,
                    seeds: jax.Array, *, cfg: ModelConfig, max_new: int, cache_len: int,
                    top_logprobs: int = 0, candidates: int = smp.DEFAULT_CANDIDATES,
                    pad_id: int = 0, mesh=None, kv_quant: str | None = None,
                    penalties: bool = True, n: int = 1, stop_strings: sst.StopStrings | None = None,
                    prefix: Prefix | None = None, prefill_chunk: int = PREFILL_CHUNK,
                    constraints: con.Constraints | None = None, constraint_start: jax.Array | None = None,
                    paths: backend.Paths | None = None, adapters: jax.Array | None = None) -> GenerateOutput:
    """Prefill right-padded prompts [P, T] in one pass, then decode up to `max_new` tokens for each
    of the B = P * n rows (n samples per prompt, prompt-major; see `prefill`).

    Traced: params, prompts [P, T] int32, prompt_lengths [P] int32 (0 = padding row), sp (per-row
    knobs, [B]), max_new_tokens [B] int32 (<= max_new), stop_ids [B, NS] int32 (-1 = unused), seeds [B].
    Static: cfg, max_new (the token buffer M), cache_len, top_logprobs, candidates, pad_id, mesh
    (a jax.sharding.Mesh: the decode state is then kept on `jaxgen.sharding`'s shardings), kv_quant
    (None or "int8": the KV cache's storage), penalties (False: no [B, V] penalty history is carried
    and the repetition / presence / frequency knobs are ignored; `prepare`'s Plan says which a request
    needs), n (samples per prompt), prefill_chunk (prompt tokens per prefill pass), paths
    (jaxgen.backend.Paths: attention kernels, gates, dequantization; None = the default backend's).
    Optional, traced: stop_strings (`jaxgen.stops` tables, a mask per
    row), prefix (a `prefill_prefix` result the prompts continue), constraints + constraint_start
    (structured output: `jaxgen.constraints` tables, a start state per row), adapters [P] (each
    prompt's LoRA slot in params.lora: jaxgen.lora). The loop exits as soon as every row is done.
    """
    state = prefill(params, prompts, prompt_lengths, sp, max_new_tokens, stop_ids, seeds, cfg=cfg,
                    max_new=max_new, cache_len=cache_len, top_logprobs=top_logprobs,
                    candidates=candidates, pad_id=pad_id, mesh=mesh, kv_quant=kv_quant, penalties=penalties, n=n,
                    stop_strings=stop_strings, prefix=prefix, prefill_chunk=prefill_chunk,
                    constraints=constraints, constraint_start=constraint_start, paths=paths, adapters=adapters)
    state = decode(params, state, sp, max_new_tokens, stop_ids, seeds, jnp.int32(max_new), cfg=cfg,
                   candidates=candidates, pad_id=pad_id, mesh=mesh, paths=paths)
    return output(state)


_STATIC = ("cfg", "max_new", "cache_len", "top_logprobs", "candidates", "pad_id", "mesh", "kv_quant", "penalties",
           "n", "prefill_chunk", "paths")
generate_jit = backend.jit(generate_tokens, static_argnames=_STATIC)
# The streaming pair: the same two phases as separate programs, so a caller can read tokens between
# chunks of decode steps. The state is donated: each chunk updates the cache in place.
prefill_jit = backend.jit(prefill, static_argnames=_STATIC)
insert_jit = backend.jit(insert, donate_argnames="state")
decode_jit = backend.jit(decode, static_argnames=("cfg", "candidates", "pad_id", "mesh", "paths"), donate_argnames="state")
prefill_prefix_jit = backend.jit(prefill_prefix, static_argnames=("cfg", "cache_len", "kv_quant", "prefill_chunk", "paths"))
