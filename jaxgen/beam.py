"""Beam search in the compiled loop: beams are rows of the engine's decode state (prompt p's beams are
rows p * K .. p * K + K - 1, K a static maximum), and each step reorders the running rows, KV cache
included, by a gather within each prompt's group of K rows. Pure and jittable like `jaxgen.engine`.

Semantics follow HF transformers' beam search (`generate(num_beams=k, do_sample=False)`):
- a beam's score is the sum of its tokens' raw-model log-probabilities (constraints only remove
  tokens: the allowed ones keep their unrenormalized log-probabilities, as HF's prefix-allowed-tokens
  processor does); the first step expands beam 0 only;
- each step ranks every (beam, next token) continuation of a prompt by summed log-probability. Of
  the best k, those that finish (a stop id, a completed stop string, a closed constraint, or the
  token budget) become finished hypotheses with score sum / length ** length_penalty (length = new
  tokens including the finishing one); the best k that do not finish become the running beams;
- a prompt is done when no running beam is left, or (early_stopping=1, HF's True) once it has k
  finished hypotheses, or (every mode) once it has k and the best running beam cannot beat the worst
  of them: its score divided by its current length ** length_penalty (early_stopping=0, HF's False),
  or for early_stopping=2 (HF's "never") with length_penalty > 0 by the row's budget ** length_penalty.
Continuations considered per beam: its best K + NS (NS = stop-id slots), enough to find k running ones
even when every stop id is among them (exact). A beam whose best continuations also complete more
than NS stop strings has fewer candidates (HF keeps 2k over all beams; both are heuristics there).
Differences from HF: a prompt's width k is per prompt (<= K) and its budget per prompt; HF's width and
max_length are per call.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen import backend
from jaxgen import constraints as con
from jaxgen import engine as eng
from jaxgen import stops as sst
from jaxgen.model import PREFILL_CHUNK, Params, forward_hidden, unembed
from jaxgen.sharding import by_rows, stack_shardings, top_k

EARLY_STOPPING = {False: 0, True: 1, "never": 2}  # HF's early_stopping values -> their code here


@struct.dataclass
class BeamState:
    run: eng.DecodeState  # B = P * K rows: the running beams (tokens so far, cache, automaton states)
    score: jax.Array  # [P, K] f32 summed log-probabilities of the running beams (-inf: an empty slot)
    width: jax.Array  # [P] int32 beams of each prompt, 1 .. K (0: a padding prompt)
    length_penalty: jax.Array  # [P] f32
    early_stopping: jax.Array  # [P] int32 an EARLY_STOPPING code
    budget: jax.Array  # [P] int32 max_new_tokens of each prompt
    fin_tokens: jax.Array  # [P, K, M] int32 finished hypotheses, best first
    fin_logprobs: jax.Array  # [P, K, M] f32 raw-model log-probability of each of their tokens
    fin_len: jax.Array  # [P, K] int32 new tokens (the finishing one included)
    fin_finish: jax.Array  # [P, K] int32 engine finish code (STOP, STOP_STRING, CLOSED, LENGTH)
    fin_score: jax.Array  # [P, K] f32 length-penalized score (-inf: no hypothesis yet)


@struct.dataclass
class BeamOutput:
    tokens: jax.Array  # [P, K, M] int32 each prompt's finished beams, best first (pad past fin_len)
    num_new: jax.Array  # [P, K] int32
    finish: jax.Array  # [P, K] int32 engine finish code (0: no hypothesis: the width was smaller)
    logprobs: jax.Array  # [P, K, M] f32
    scores: jax.Array  # [P, K] f32 length-penalized beam score (-inf: none)
    steps: jax.Array  # [] int32 decode steps run (+1 for the first)


def _take(a: jax.Array, parent: jax.Array, axis: int = 0) -> jax.Array:
    """Rows of a ([..., B = P * K, ...] with rows on `axis`) taken within each prompt's group of K:
    new row p * K + j is old row p * K + parent[p, j]. A gather on the beam axis only, so with rows
    split over devices by whole prompts every device keeps its own rows."""
    P, K = parent.shape
    shape = a.shape
    grouped = a.reshape(shape[:axis] + (P, K) + shape[axis + 1:])
    idx = parent.reshape((1,) * axis + (P, K) + (1,) * (a.ndim - axis - 1))
    return jnp.take_along_axis(grouped, idx, axis=axis + 1).reshape(shape)


def reorder(s: eng.DecodeState, parent: jax.Array) -> eng.DecodeState:
    """The decode state with each prompt's rows reordered by parent [P, K] (cache included)."""
    cache = s.cache.map_rows(lambda axis, a: _take(a, parent, axis))
    rows = ("tokens", "logprobs", "top_ids", "top_logprobs", "last", "done", "finish", "num_new", "seen", "counts",
            "stop_state") + (("cstate",) if s.cons is not None else ())
    return s.replace(cache=cache, stops=s.stops.replace(mask=_take(s.stops.mask, parent)),
                     **{f: _take(getattr(s, f), parent) for f in rows})


def _finishing(s: eng.DecodeState, tok: jax.Array, max_new_tokens: jax.Array, stop_ids: jax.Array):
    """Whether appending each candidate tok [B, J] (alternatives, not a sequence) to its row ends it,
    and the finish code it would end with: ([B, J] bool, [B, J] int32)."""
    B, J = tok.shape
    flat = lambda a: jnp.repeat(a, J, axis=0)  # one row per (row, candidate)
    is_stop = jnp.any(tok[:, :, None] == stop_ids[:, None, :], axis=-1)
    _, hit = sst.advance(s.stops.replace(mask=flat(s.stops.mask)), flat(s.stop_state), tok.reshape(-1, 1))
    hit = hit.reshape(B, J)
    closed = jnp.zeros_like(is_stop)
    if s.cons is not None:
        _, closed = con.advance(s.cons, flat(s.cstate), tok.reshape(-1, 1))
        closed = closed.reshape(B, J)
    at_budget = (s.num_new + 1 >= max_new_tokens)[:, None]
    code = jnp.where(is_stop, eng.STOP, jnp.where(hit, eng.STOP_STRING, jnp.where(closed, eng.CLOSED, eng.LENGTH)))
    return is_stop | hit | closed | at_budget, code


def step(b: BeamState, logits: jax.Array, max_new_tokens: jax.Array, stop_ids: jax.Array, mesh=None) -> BeamState:
    """One beam-search step from the running rows' next-token logits [B, V] (see the module doc). On a
    `mesh` each `data` shard ranks its own prompts' continuations (`sharding.top_k`, `sharding.by_rows`:
    a prompt's rows are on one shard)."""
    s = b.run
    P, K = b.score.shape
    B, V = logits.shape
    M = s.tokens.shape[1]
    J = min(K + stop_ids.shape[1], V)
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, 1]
    masked = logits
    if s.cons is not None:
        masked = jnp.where(con.allowed(s.cons, s.cstate, stop_ids), logits, -jnp.inf)
    masked = jnp.where(jnp.isnan(masked) | ~jnp.isfinite(lse), -jnp.inf, masked)  # NaN logits: no continuation
    c_logit, c_tok = top_k(masked, J, mesh)  # [B, J] each beam's best continuations
    c_lp = c_logit - lse  # raw-model log-probabilities (-inf where not allowed)
    total = (b.score.reshape(B, 1) + c_lp).reshape(P, K * J)
    fin, code = _finishing(s, c_tok, max_new_tokens, stop_ids)
    fin, code, c_tok, c_lp = (a.reshape(P, K * J) for a in (fin, code, c_tok, c_lp))
    active = ~s.done.reshape(P, K)[:, 0]  # [P] a prompt's rows are done together
    in_width = jnp.arange(K)[None, :] < b.width[:, None]  # [P, K]
    pick = lambda a, idx: jnp.take_along_axis(a, idx, axis=1)
    best_k = lambda a: by_rows(lambda x: jax.lax.top_k(x, K), mesh, P)(a)  # [P, K] of a prompt's candidates

    # New finished hypotheses: the finishing ones among the prompt's best k continuations.
    top, idx = best_k(total)  # [P, K]
    new = active[:, None] & in_width & pick(fin, idx) & jnp.isfinite(top)
    length = pick(s.num_new.reshape(P, K), idx // J) + 1  # [P, K]
    new_score = jnp.where(new, top / length.astype(jnp.float32) ** b.length_penalty[:, None], -jnp.inf)
    parents = lambda a: pick(a.reshape(P, K, M), (idx // J)[:, :, None])  # [P, K, M] within each prompt
    col = jnp.arange(M)[None, None, :] == (length - 1)[:, :, None]  # [P, K, M] the finishing token's column
    new_tokens = jnp.where(col, pick(c_tok, idx)[:, :, None], parents(s.tokens))
    new_lps = jnp.where(col, pick(c_lp, idx)[:, :, None], parents(s.logprobs))
    scores = jnp.concatenate([b.fin_score, new_score], axis=1)  # [P, 2K]: keep the best K
    best, keep = best_k(scores)
    merge = lambda old, cand: pick(jnp.concatenate([old, cand], axis=1),
                                   keep.reshape(keep.shape + (1,) * (old.ndim - 2)))
    b = b.replace(fin_score=best, fin_tokens=merge(b.fin_tokens, new_tokens), fin_logprobs=merge(b.fin_logprobs, new_lps),
                  fin_len=merge(b.fin_len, length), fin_finish=merge(b.fin_finish, pick(code, idx)))

    # Running beams: the best k continuations that do not finish.
    r_score, r_idx = best_k(jnp.where(fin, -jnp.inf, total))  # [P, K]
    r_score = jnp.where(in_width & active[:, None], r_score, -jnp.inf)
    parent = jnp.where(active[:, None], r_idx // J, jnp.arange(K)[None, :])  # a done prompt's rows stay
    s = reorder(s, parent)
    alive = jnp.isfinite(r_score).reshape(B)
    s = s.replace(done=s.done | ~alive)
    s, _ = eng.append_tokens(s, pick(c_tok, r_idx).reshape(B, 1), jnp.ones((B,), jnp.int32),
                             pick(c_lp, r_idx).reshape(B, 1), max_new_tokens, stop_ids)

    # Whether each prompt is done (HF's stopping rules, per prompt).
    full = jnp.sum(jnp.isfinite(best) & in_width, axis=1) >= b.width  # k finished hypotheses
    worst = jnp.min(jnp.where(in_width, best, jnp.inf), axis=1)
    now = s.num_new.reshape(P, K)[:, 0]  # new tokens of the running beams (all alike)
    hyp_len = jnp.where((b.early_stopping == 2) & (b.length_penalty > 0), b.budget, now)
    best_possible = r_score[:, 0] / jnp.maximum(hyp_len, 1).astype(jnp.float32) ** b.length_penalty
    done = (~jnp.isfinite(r_score[:, 0]) | (full & (b.early_stopping == 1)) | (full & (best_possible <= worst))
            | ~active)
    return b.replace(run=s.replace(done=jnp.repeat(done, K) | s.done), score=r_score)


def init(state: eng.DecodeState, logits: jax.Array, width: jax.Array, length_penalty: jax.Array,
         early_stopping: jax.Array, max_new_tokens: jax.Array, stop_ids: jax.Array, mesh=None) -> BeamState:
    """The beam state after the first step, from `engine.start`'s state of B = P * K rows and the
    prompts' first-token logits [B, V] (per-prompt knobs [P]; max_new_tokens, stop_ids per row)."""
    B, M = state.tokens.shape
    P = width.shape[0]
    K = B // P
    # only beam 0 is expanded at the first step: the K copies of a prompt would give the same beams
    score = jnp.where((jnp.arange(K)[None, :] == 0) & (width[:, None] > 0), 0.0, -jnp.inf)
    b = BeamState(run=state, score=score.astype(jnp.float32), width=width, length_penalty=length_penalty.astype(jnp.float32),
                  early_stopping=early_stopping, budget=max_new_tokens.reshape(P, K)[:, 0],
                  fin_tokens=jnp.zeros((P, K, M), jnp.int32), fin_logprobs=jnp.zeros((P, K, M), jnp.float32),
                  fin_len=jnp.zeros((P, K), jnp.int32), fin_finish=jnp.zeros((P, K), jnp.int32),
                  fin_score=jnp.full((P, K), -jnp.inf, jnp.float32))
    return step(b, logits, max_new_tokens, stop_ids, mesh)


def _constrain(b: BeamState, mesh) -> BeamState:
    """Pin the carry: the running rows as the engine's state, the per-prompt arrays on `data`."""
    if mesh is None:
        return b
    from jax.sharding import NamedSharding, PartitionSpec

    prompts = lambda a: NamedSharding(mesh, PartitionSpec("data", *([None] * (a.ndim - 1))))
    rest = {f: jax.lax.with_sharding_constraint(getattr(b, f), prompts(getattr(b, f)))
            for f in ("score", "width", "length_penalty", "early_stopping", "budget", "fin_tokens", "fin_logprobs",
                      "fin_len", "fin_finish", "fin_score")}
    return b.replace(run=eng._constrain(b.run, mesh), **rest)


def beam_start(params: Params, prompts: jax.Array, prompt_lengths: jax.Array, max_new_tokens: jax.Array,
               stop_ids: jax.Array, width: jax.Array, length_penalty: jax.Array, early_stopping: jax.Array, *,
               cfg, max_new: int, cache_len: int, beams: int, pad_id: int = 0, mesh=None,
               kv_quant: str | None = None, stop_strings: sst.StopStrings | None = None,
               prefix: eng.Prefix | None = None, prefill_chunk: int = PREFILL_CHUNK,
               constraints: con.Constraints | None = None, constraint_start: jax.Array | None = None,
               paths=None, adapters: jax.Array | None = None) -> BeamState:
    """The prefill and the first beam step of `beam_search` (same arguments): its loop's start."""
    state, logits = eng.start(params, prompts, prompt_lengths, max_new_tokens, cfg=cfg, max_new=max_new,
                              cache_len=cache_len, pad_id=pad_id, kv_quant=kv_quant, penalties=False, n=beams,
                              stop_strings=stop_strings, prefix=prefix, prefill_chunk=prefill_chunk,
                              constraints=constraints, constraint_start=constraint_start, paths=eng._paths(paths, mesh),
                              adapters=adapters, mesh=mesh)
    return _constrain(init(state, logits, width, length_penalty, early_stopping, max_new_tokens, stop_ids, mesh), mesh)


def beam_loop(params: Params, b: BeamState, max_new_tokens: jax.Array, stop_ids: jax.Array, *, cfg, max_new: int,
              mesh=None, paths=None) -> BeamOutput:
    """The rest of `beam_search` from `beam_start`'s state: a step per new token until every prompt is done."""
    paths = eng._paths(paths, mesh)

    def cond(b: BeamState):
        return (b.run.step < max_new) & ~jnp.all(b.run.done)

    def body(b: BeamState):
        s = b.run
        pos = jnp.where(s.done, -1, s.cache.lengths)[:, None]  # done rows write nothing
        h, cache = forward_hidden(params, s.last[:, None], pos, s.cache, cfg, paths=paths,
                                  stack_shardings=stack_shardings(s.cache, mesh))
        return _constrain(step(b.replace(run=s.replace(cache=cache)), unembed(params, h[:, 0], cfg, paths),
                               max_new_tokens, stop_ids, mesh), mesh)

    b = jax.lax.while_loop(cond, body, b)
    return BeamOutput(tokens=b.fin_tokens, num_new=b.fin_len, finish=jnp.where(jnp.isfinite(b.fin_score), b.fin_finish, 0),
                      logprobs=b.fin_logprobs, scores=b.fin_score, steps=b.run.step)


def beam_search(params: Params, prompts: jax.Array, prompt_lengths: jax.Array, max_new_tokens: jax.Array,
                stop_ids: jax.Array, width: jax.Array, length_penalty: jax.Array, early_stopping: jax.Array, *,
                cfg, max_new: int, cache_len: int, beams: int, pad_id: int = 0, mesh=None,
                kv_quant: str | None = None, stop_strings: sst.StopStrings | None = None,
                prefix: eng.Prefix | None = None, prefill_chunk: int = PREFILL_CHUNK,
                constraints: con.Constraints | None = None, constraint_start: jax.Array | None = None,
                paths=None, adapters: jax.Array | None = None) -> BeamOutput:
    """Beam search for right-padded prompts [P, T] with up to `beams` (K, static) beams each.

    Traced: prompt_lengths [P] (0 = padding), max_new_tokens and stop_ids per row ([B], [B, NS] with
    B = P * K), width [P] (each prompt's beams, 1 .. K), length_penalty [P] f32, early_stopping [P]
    (EARLY_STOPPING codes), stop_strings / constraints with B rows and adapters [P] (LoRA slots) as in
    `engine.generate_tokens`. Returns every prompt's K best finished hypotheses, best first."""
    b = beam_start(params, prompts, prompt_lengths, max_new_tokens, stop_ids, width, length_penalty, early_stopping,
                   cfg=cfg, max_new=max_new, cache_len=cache_len, beams=beams, pad_id=pad_id, mesh=mesh,
                   kv_quant=kv_quant, stop_strings=stop_strings, prefix=prefix, prefill_chunk=prefill_chunk,
                   constraints=constraints, constraint_start=constraint_start, paths=paths, adapters=adapters)
    return beam_loop(params, b, max_new_tokens, stop_ids, cfg=cfg, max_new=max_new, mesh=mesh, paths=paths)


_STATICS = ("cfg", "max_new", "cache_len", "beams", "pad_id", "mesh", "kv_quant", "prefill_chunk", "paths")
beam_jit = backend.jit(beam_search, static_argnames=_STATICS)
# the same computation as two programs, so that a caller can time the prefill and the search apart
beam_start_jit = backend.jit(beam_start, static_argnames=_STATICS)
# Not donated: a donation only lets an input buffer become an output, and the loop returns finished
# hypotheses, not its state (measured: XLA reports every donated buffer of the state unusable).
beam_loop_jit = backend.jit(beam_loop, static_argnames=("cfg", "max_new", "mesh", "paths"))
