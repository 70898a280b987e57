"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), exact, inside one compiled loop.

Each step of the `lax.while_loop`: a proposer drafts `gamma` tokens d_1..d_g with probabilities q_i, the
target scores [last, d_1..d_g] in one forward pass of length gamma+1 (distributions p_0..p_g), and
modified rejection sampling accepts d_i while u_i < p_{i-1}(d_i) / q_i(d_i); at the first rejection it
draws from norm(max(0, p_{i-1} - q_i)), or from p_g when all were accepted. The emitted tokens are then
distributed exactly as sampling from the target one token at a time. p and q are the *transformed*
distributions (`sampling.distribution_logits`: penalties with the drafted tokens counted, bias,
temperature, top-k/top-p/min-p; greedy rows one-hot), so with greedy the output is plain greedy decoding.

Proposers: a draft model sharing the vocabulary (its own KV cache, decoded gamma+1 steps per pass), or
prompt lookup: the continuation of the latest earlier occurrence of the last `ngram` tokens of the
prompt + output (a one-hot q; no second model). Rows accept different numbers of tokens: each cache is
rolled back by setting its per-row length (rejected keys stay in their slots and are masked, then
overwritten; ring buffers get gamma+1 extra slots so no key still inside the window is lost).

Random draws are keyed per row by (seed, tokens so far, purpose), so a row's tokens do not depend on the
rest of the batch. They differ from `generate`'s draws (the same distribution, not the same sample).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen import backend
from jaxgen import knobs as kn
from jaxgen import lora as lora_mod
from jaxgen import sampling as smp
from jaxgen.cache import KVCache, init_cache, padded_positions
from jaxgen.config import ModelConfig
from jaxgen.engine import DecodeState, GenerateOutput, append_tokens, output, prefill, record
from jaxgen.generate import fetch, prepare, stop_rows, to_completions
from jaxgen.model import PREFILL_CHUNK, Model, forward, forward_hidden, prefill_hidden, unembed


@struct.dataclass
class SpecState:
    base: DecodeState  # tokens / done / counts / target cache, as in plain decoding
    draft_cache: KVCache | None  # the draft model's cache (None for prompt lookup)
    hist: jax.Array  # [B, T + M] int32 prompt then generated tokens (prompt lookup reads it)
    hist_len: jax.Array  # [B] int32
    passes: jax.Array  # [B] int32 target passes after the prefill while the row was running
    drafted: jax.Array  # [B] int32 tokens drafted for the row (gamma per speculative pass; none in plain steps)
    accepted: jax.Array  # [B] int32 drafted tokens accepted and emitted


@struct.dataclass
class SpecOutput:
    out: GenerateOutput
    passes: jax.Array  # [B] int32
    drafted: jax.Array  # [B] int32
    accepted: jax.Array  # [B] int32


@dataclasses.dataclass(frozen=True)
class Proposer:
    """How drafts are made: `draft` (a Model sharing the target's vocabulary) or prompt lookup."""
    gamma: int = 4
    draft: Any = None  # a Model (or its name, from `parse`), or None for prompt lookup
    ngram: int = 3

    def __post_init__(self):
        if not 1 <= self.gamma <= 32:
            raise ValueError(f"speculative gamma must be in [1, 32], got {self.gamma}")
        if self.draft is None and not 1 <= self.ngram <= 16:
            raise ValueError(f"prompt-lookup ngram must be in [1, 16], got {self.ngram}")

    def context(self, cfg) -> int:
        """The tokens a row may hold, prompt + max_new_tokens + gamma + 1 (a row verifies up to gamma + 1
        tokens past its budget's last position): the target's context, or the draft's if shorter."""
        draft = self.draft.cfg.max_seq_len if self.draft is not None else cfg.max_seq_len
        return min(cfg.max_seq_len, draft)


def parse(spec: str, *, mesh=None, top_logprobs: int = 0) -> Proposer:
    """"draft=MODEL,gamma=4" or "lookup,ngram=3,gamma=8" -> Proposer. A draft model is left as its
    name (so a bad spec fails before anything loads); `with_draft` loads it. mesh / top_logprobs:
    what the run asks for besides, refused here if speculation cannot give it."""
    if mesh or top_logprobs:
        raise ValueError("speculative decoding does not combine with a mesh or top_logprobs yet")
    fields, kind = {}, None
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq and key in ("lookup", "draft"):
            kind = kind or key
            continue
        if key not in ("draft", "gamma", "ngram") or not value:
            raise ValueError(f"bad --speculative part {part!r}: expected draft=MODEL, lookup, gamma=N, ngram=N")
        fields[key] = value
    if "draft" in fields:
        kind = "draft"
    if kind is None:
        raise ValueError(f"--speculative {spec!r}: name a proposer (draft=MODEL or lookup)")
    try:
        gamma, ngram = int(fields.get("gamma", 4 if kind == "draft" else 8)), int(fields.get("ngram", 3))
    except ValueError:
        raise ValueError(f"--speculative {spec!r}: gamma and ngram must be integers") from None
    if kind == "draft":
        if "draft" not in fields:
            raise ValueError("--speculative draft needs a model: draft=MODEL")
        return Proposer(gamma=gamma, draft=fields["draft"])
    return Proposer(gamma=gamma, ngram=ngram)


def with_draft(proposer: Proposer, load) -> Proposer:
    """The proposer with a draft named by `parse` loaded as load(name) -> Model."""
    if isinstance(proposer.draft, str):
        return dataclasses.replace(proposer, draft=load(proposer.draft))
    return proposer


# ---- one speculative step -------------------------------------------------------------------------
def _lookup(hist, hist_len, gamma: int, ngram: int):
    """[B, gamma] proposals: the tokens after the latest earlier occurrence of the last `ngram` tokens,
    and [B] whether there was one."""
    B, N = hist.shape
    idx = jnp.arange(N)
    tail = jnp.stack([jnp.take_along_axis(hist, jnp.maximum(hist_len - ngram + k, 0)[:, None], 1)[:, 0]
                      for k in range(ngram)], axis=1)  # [B, n]
    match = jnp.ones((B, N), bool)
    for k in range(ngram):  # windows starting at s: hist[s + k] == tail[k]
        match &= jnp.roll(hist, -k, axis=1) == tail[:, k:k + 1]
    ok = match & (idx[None, :] + ngram < hist_len[:, None]) & (hist_len[:, None] >= ngram)
    start = jnp.max(jnp.where(ok, idx[None, :], -1), axis=1)  # [B] latest match, -1 = none
    cols = jnp.clip(start[:, None] + ngram + jnp.arange(gamma)[None, :], 0, N - 1)
    prop = jnp.take_along_axis(hist, cols, axis=1)
    last = jnp.take_along_axis(hist, jnp.maximum(hist_len - 1, 0)[:, None], 1)  # no match: repeat the last
    return jnp.where((start >= 0)[:, None], prop, last).astype(jnp.int32), start >= 0


def _keys(seeds, num_new, purpose: int):
    return jax.vmap(lambda k: jax.random.fold_in(k, purpose))(smp.row_keys(seeds, num_new))


def _with_drafts(seen, counts, drafts, upto: int, active):
    """seen / counts as they would be after emitting drafts[:, :upto] (for position upto's penalties);
    (None, None) in a program without penalty history."""
    if not seen.shape[1]:
        return None, None
    if upto == 0:
        return seen, counts
    rows = jnp.arange(seen.shape[0])[:, None]
    d = drafts[:, :upto]
    add = jnp.broadcast_to(active[:, None], d.shape).astype(jnp.int32)
    return seen.at[rows, d].set(True), counts.at[rows, d].add(add)


def _correction_logits(p, lse_p, q, lse_q, drafts, n_acc, gamma: int):
    """[B, V] logits of the token drawn after the n_acc accepted drafts: norm(max(0, p_k - q_k)) at
    the first rejection k = n_acc, or p_gamma (the bonus) when all gamma were accepted. p [B, g+1, V]
    and q [B, g, V] are distribution logits with log-normalizers lse_p / lse_q; q None = one-hot drafts."""
    at = lambda x, i: jnp.take_along_axis(x, i[:, None, None], axis=1)[:, 0]  # row i of [B, n, V] -> [B, V]
    p_at = at(p, n_acc) - jnp.take_along_axis(lse_p, n_acc[:, None], 1)  # [B, V] log p_{n_acc}
    k = jnp.minimum(n_acc, gamma - 1)  # the rejected draft (unused when all were accepted)
    if q is None:
        q_at = jax.nn.one_hot(jnp.take_along_axis(drafts, k[:, None], 1)[:, 0], p.shape[-1])
    else:
        q_at = jnp.exp(at(q, k) - jnp.take_along_axis(lse_q, k[:, None], 1))
    resid = jnp.maximum(jnp.exp(p_at) - q_at, 0.0)
    resid_logits = jnp.where(resid > 0, jnp.log(jnp.where(resid > 0, resid, 1.0)), -jnp.inf)
    # all-zero residual (p == q) cannot be reached by a rejection; guard it anyway
    resid_logits = jnp.where(jnp.any(resid > 0, axis=-1, keepdims=True), resid_logits, p_at)
    return jnp.where((n_acc < gamma)[:, None], resid_logits, p_at)


def _step(params, draft_params, s: SpecState, sp, max_new_tokens, stop_ids, seeds, lookup_drafts=None, *,
          cfg, draft_cfg, gamma: int, candidates: int, pad_id: int, paths=None) -> SpecState:
    """One speculative pass; lookup_drafts [B, gamma] are the prompt-lookup proposals (draft_cfg None)."""
    b = s.base
    B = b.last.shape[0]
    rows = jnp.arange(B)
    gates = backend.resolve(paths).gates
    active = ~b.done
    length = b.cache.lengths  # [B] tokens in the target cache (== position of `last`)
    steps = jnp.arange(gamma + 1)[None, :]
    positions = jnp.where(active[:, None], length[:, None] + steps, -1).astype(jnp.int32)  # [B, g+1]

    # 1. drafts d [B, g] and their distribution logits q [B, g, V] (None: one-hot lookup proposals)
    draft_cache = s.draft_cache
    if draft_cfg is None:
        drafts, q = lookup_drafts, None
    else:
        def draft_step(carry, j):
            cache, tok, seen, counts, out = carry
            pos = jax.lax.dynamic_slice_in_dim(positions, j, 1, axis=1)  # [B, 1]
            h, cache = forward_hidden(draft_params, tok[:, None], pos, cache, draft_cfg, paths=paths)
            logits = unembed(draft_params, h[:, 0], draft_cfg, paths)
            hist = (seen, counts) if seen.shape[1] else (None, None)
            ql = smp.distribution_logits(logits, sp, *hist, candidates, gates)  # [B, V]
            d = smp.categorical(_keys(seeds, b.num_new + j, 1), ql)
            if seen.shape[1]:
                seen = seen.at[rows, d].set(True)
                counts = counts.at[rows, d].add(active.astype(jnp.int32))
            return (cache, d, seen, counts, out), (d, ql)

        # gamma + 1 steps: the last one only writes d_g's keys (its draw is unused)
        carry = (draft_cache, b.last, b.seen, b.counts, None)
        (draft_cache, _, _, _, _), (ds, qs) = jax.lax.scan(draft_step, carry, jnp.arange(gamma + 1))
        drafts, q = ds[:gamma].T, jnp.moveaxis(qs[:gamma], 0, 1)  # [B, g], [B, g, V]

    # 2. the target scores [last, d_1..d_g] in one pass
    inp = jnp.concatenate([b.last[:, None], drafts], axis=1)  # [B, g+1]
    logits, cache = forward(params, inp, positions, b.cache, cfg, paths)  # [B, g+1, V] f32
    p = jnp.stack([smp.distribution_logits(logits[:, i], sp, *_with_drafts(b.seen, b.counts, drafts, i, active),
                                           candidates, gates) for i in range(gamma + 1)], axis=1)  # [B, g+1, V]
    # log-probabilities are gathered (logit - logsumexp), never materialized as [B, g+1, V] arrays
    lse_p = jax.nn.logsumexp(p, axis=-1)  # [B, g+1]

    # 3. accept d_i while u_i < p_{i-1}(d_i) / q_i(d_i)
    lp_d = jnp.take_along_axis(p[:, :gamma], drafts[..., None], axis=2)[..., 0] - lse_p[:, :gamma]  # [B, g]
    lse_q = None
    if q is None:
        lq_d = jnp.zeros_like(lp_d)
    else:
        lse_q = jax.nn.logsumexp(q, axis=-1)  # [B, g]
        lq_d = jnp.take_along_axis(q, drafts[..., None], axis=2)[..., 0] - lse_q
    u = jax.vmap(lambda k: jax.random.uniform(k, (gamma,)))(_keys(seeds, b.num_new, 2))  # [B, g]
    ok = jnp.log(u) < lp_d - lq_d
    n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [B] leading accepts

    # 4. the correction (first rejection) or bonus (all accepted) token
    fix_logits = _correction_logits(p, lse_p, q, lse_q, drafts, n_acc, gamma)
    fix = smp.categorical(_keys(seeds, b.num_new, 3), fix_logits)  # [B]

    # 5. emit d_1..d_{n_acc}, fix; cut at a stop id and at the row's budget (as plain decoding)
    cand = jnp.concatenate([drafts, jnp.zeros((B, 1), jnp.int32)], axis=1)  # [B, g+1]
    cand = cand.at[rows, n_acc].set(fix)
    lse_raw = jax.nn.logsumexp(logits, axis=-1)  # raw-model logprobs of the emitted tokens
    lp_emit = jnp.take_along_axis(logits, cand[..., None], axis=2)[..., 0] - lse_raw  # [B, g+1]
    base, n_emit = append_tokens(b, cand, n_acc + 1, lp_emit, max_new_tokens, stop_ids)
    new_len = jnp.where(active, length + n_emit, length)  # keys of last, d_1..d_{n_emit-1} stay valid
    base = base.replace(cache=cache.replace(lengths=new_len))
    if draft_cache is not None:
        draft_cache = draft_cache.replace(lengths=new_len)
    j = jnp.arange(gamma + 1)[None, :]
    hcols = jnp.where(j < n_emit[:, None], s.hist_len[:, None] + j, s.hist.shape[1])
    hist = s.hist.at[rows[:, None], hcols].set(cand, mode="drop")
    return s.replace(base=base, draft_cache=draft_cache, hist=hist, hist_len=s.hist_len + n_emit,
                     passes=s.passes + active, drafted=s.drafted + gamma * active,
                     accepted=s.accepted + jnp.where(active, jnp.minimum(n_acc, n_emit), 0))


def _plain_step(params, s: SpecState, sp, max_new_tokens, stop_ids, seeds, *, cfg, candidates, pad_id, paths=None):
    """One ordinary decode step (generate's), keeping the speculative bookkeeping."""
    b = s.base
    active = ~b.done
    pos = jnp.where(active, b.cache.lengths, -1)[:, None]
    h, cache = forward_hidden(params, b.last[:, None], pos, b.cache, cfg, paths=paths)
    nb = record(b.replace(cache=cache), unembed(params, h[:, 0], cfg, paths), sp, max_new_tokens, stop_ids, seeds,
                 0, candidates, pad_id, paths)
    rows = jnp.arange(b.last.shape[0])
    hist = s.hist.at[rows, jnp.where(active, s.hist_len, s.hist.shape[1])].set(nb.last, mode="drop")
    return s.replace(base=nb, hist=hist, hist_len=s.hist_len + active, passes=s.passes + active)


def spec_prefill(params, draft_params, prompts, prompt_lengths, sp, max_new_tokens, stop_ids, seeds, *,
                 cfg: ModelConfig, draft_cfg: ModelConfig | None, gamma: int, max_new: int, cache_len: int,
                 candidates: int = smp.DEFAULT_CANDIDATES, pad_id: int = 0, kv_quant: str | None = None,
                 penalties: bool = True, stop_strings=None, prefill_chunk: int = PREFILL_CHUNK,
                 paths=None, adapters=None) -> SpecState:
    """The target's (and the draft's) prefill and the first new token, as engine.prefill does
    (stop strings included: `append_tokens` cuts a block at the token that completes one).
    adapters [B]: the target's LoRA slots (jaxgen.lora); the draft runs without adapters (it only
    proposes: the target's verification keeps the output exact)."""
    B, T = prompts.shape
    extra = gamma + 1
    # ring buffers with gamma + 1 spare slots: a pass writes that far ahead before rolling back
    base = prefill(params, prompts, prompt_lengths, sp, max_new_tokens, stop_ids, seeds, cfg=cfg,
                   max_new=max_new, cache_len=cache_len, candidates=candidates, pad_id=pad_id, cache_extra=extra,
                   kv_quant=kv_quant, penalties=penalties, stop_strings=stop_strings, prefill_chunk=prefill_chunk,
                   paths=paths, adapters=adapters)
    draft_cache = None
    if draft_cfg is not None:
        draft_cache = init_cache(draft_cfg, B, cache_len, draft_params.embed.dtype, extra=extra, kv_quant=kv_quant)
        _, draft_cache = prefill_hidden(draft_params, prompts, padded_positions(prompt_lengths, T), draft_cache,
                                        draft_cfg, prefill_chunk, paths)
    hist = jnp.concatenate([prompts, jnp.full((B, max_new), pad_id, jnp.int32)], axis=1)  # [B, T + M]
    hist = hist.at[jnp.arange(B), prompt_lengths].set(base.tokens[:, 0])
    return SpecState(base=base, draft_cache=draft_cache, hist=hist, hist_len=prompt_lengths + base.num_new,
                     passes=jnp.zeros((B,), jnp.int32), drafted=jnp.zeros((B,), jnp.int32),
                     accepted=jnp.zeros((B,), jnp.int32))


def spec_decode(params, draft_params, s: SpecState, sp, max_new_tokens, stop_ids, seeds, *, cfg: ModelConfig,
                draft_cfg: ModelConfig | None, gamma: int, ngram: int, candidates: int = smp.DEFAULT_CANDIDATES,
                pad_id: int = 0, paths=None) -> SpecOutput:
    """Speculative passes in a `lax.while_loop` until every row is done."""
    spec = lambda s, drafts=None: _step(params, draft_params, s, sp, max_new_tokens, stop_ids, seeds, drafts,
                                        cfg=cfg, draft_cfg=draft_cfg, gamma=gamma, candidates=candidates,
                                        pad_id=pad_id, paths=paths)
    plain = lambda s: _plain_step(params, s, sp, max_new_tokens, stop_ids, seeds, cfg=cfg, candidates=candidates,
                                  pad_id=pad_id, paths=paths)

    def lookup_step(s):  # no match in any running row: one plain token, not a pass of gamma + 1
        drafts, found = _lookup(s.hist, s.hist_len, gamma, ngram)
        return jax.lax.cond(jnp.any(found & ~s.base.done), lambda s: spec(s, drafts), plain, s)

    step = lookup_step if draft_cfg is None else spec
    s = jax.lax.while_loop(lambda s: ~jnp.all(s.base.done), step, s)
    return SpecOutput(out=output(s.base), passes=s.passes, drafted=s.drafted, accepted=s.accepted)


def speculative_tokens(params, draft_params, prompts, prompt_lengths, sp, max_new_tokens, stop_ids, seeds, *,
                       cfg: ModelConfig, draft_cfg: ModelConfig | None, gamma: int, ngram: int, max_new: int,
                       cache_len: int, candidates: int = smp.DEFAULT_CANDIDATES, pad_id: int = 0,
                       kv_quant: str | None = None, penalties: bool = True, stop_strings=None,
                       prefill_chunk: int = PREFILL_CHUNK, paths=None, adapters=None) -> SpecOutput:
    """Like engine.generate_tokens, decoding speculatively (static: gamma, ngram, draft_cfg; a
    draft_cfg of None means prompt lookup and draft_params is ignored)."""
    s = spec_prefill(params, draft_params, prompts, prompt_lengths, sp, max_new_tokens, stop_ids, seeds, cfg=cfg,
                     draft_cfg=draft_cfg, gamma=gamma, max_new=max_new, cache_len=cache_len, candidates=candidates,
                     pad_id=pad_id, kv_quant=kv_quant, penalties=penalties, stop_strings=stop_strings,
                     prefill_chunk=prefill_chunk, paths=paths, adapters=adapters)
    return spec_decode(params, draft_params, s, sp, max_new_tokens, stop_ids, seeds, cfg=cfg, draft_cfg=draft_cfg,
                       gamma=gamma, ngram=ngram, candidates=candidates, pad_id=pad_id, paths=paths)


_DECODE_STATIC = ("cfg", "draft_cfg", "gamma", "ngram", "candidates", "pad_id", "paths")
speculative_jit = backend.jit(speculative_tokens, static_argnames=_DECODE_STATIC + ("max_new", "cache_len", "kv_quant",
                                                                                "penalties", "prefill_chunk"))
# The two phases as separate programs, so `generate(..., timings=)` can time them apart.
spec_prefill_jit = backend.jit(spec_prefill, static_argnames=("cfg", "draft_cfg", "gamma", "max_new", "cache_len",
                                                          "candidates", "pad_id", "kv_quant", "penalties",
                                                          "prefill_chunk", "paths"))
# Not donated (as beam_loop_jit): the loop returns the tokens, not its state, so XLA could use no donated
# buffer, and JAX printed "Some donated buffers were not usable" on every `jaxgen generate --speculative`.
# Returning the state to make the donation usable aliases it but saves nothing: measured with
# compiled.memory_analysis() on a tiny model (4 rows, 1.33 MB of state), temp 3.99 MB either way.
spec_decode_jit = backend.jit(spec_decode, static_argnames=_DECODE_STATIC)


@dataclasses.dataclass
class SpecStats:
    """Summed over rows. The first new token of each row comes from the prefill, not from a pass;
    prompt lookup's plain fallback steps are passes that drafted nothing."""
    passes: int  # target forward passes after the prefill (speculative and plain fallback steps)
    drafted: int  # tokens drafted (gamma per speculative pass)
    accepted: int  # drafted tokens accepted and emitted
    new_tokens: int  # all new tokens, the prefill's included
    prefill_tokens: int  # new tokens that came from the prefill (one per row)
    gamma: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (a fallback step drafts none, so it does not count)."""
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per target pass, the prefill's token excluded: at most gamma + 1."""
        return (self.new_tokens - self.prefill_tokens) / max(self.passes, 1)


def generate(model: Model, prompts, proposer: Proposer, *, candidates: int = smp.DEFAULT_CANDIDATES,
             timings: dict | None = None, **request):
    """`jaxgen.generate` decoded speculatively. Returns (completions, SpecStats). Same knobs; the
    first new token comes from the prefill, the rest from speculative passes. If `timings` is a dict
    it receives compile_s, prefill_s, decode_s (device-synchronized) and new_tokens, as from
    `generate.stream`."""
    if model.mesh is not None:
        raise ValueError("speculative decoding runs unsharded for now (give a model without a mesh)")
    request = kn.host_values(request)
    if request.get("top_logprobs"):
        raise ValueError("top_logprobs is not reported by speculative decoding")
    if request.get("n", 1) != 1:
        raise ValueError("speculative decoding takes one sample per prompt (n=1) for now")
    if request.get("prefix") is not None:
        raise ValueError("speculative decoding does not take a shared prefix yet (prepend it to the prompts)")
    if any(request.get(k) is not None for k in ("regex", "json_schema", "choices")):
        # drafts are not checked against the automaton: refused rather than inexact
        raise ValueError("speculative decoding does not take a constraint (regex / json_schema / choices) yet")
    request.pop("top_logprobs", None)
    include_stop = request.pop("include_stop", False)
    d = proposer.draft
    if isinstance(d, str):
        raise ValueError(f"draft model {d!r} is a name: load it first (speculative.with_draft)")
    if d is not None and d.cfg.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({d.cfg.vocab_size}) differs from the target's "
                         f"({model.cfg.vocab_size}); a draft must share the tokenizer")
    # LoRA: the target runs with the adapters; the draft without (it only proposes tokens)
    model = lora_mod.attach(model, request.get("lora"), len(prompts) if isinstance(prompts, (list, tuple)) else 1)
    ids, args, p = prepare(model, prompts, candidates=candidates, **request)
    g = proposer.gamma
    context = proposer.context(model.cfg)  # bounds each row (n == 1: one decode row per prompt row)
    need = int(np.max(args["prompt_lengths"] + args["max_new_tokens"])) + g + 1
    if need > context:
        raise ValueError(f"prompt + max_new_tokens + gamma + 1 = {need} tokens exceeds the context of {context}")
    cache_len = min(p.cache_len + g + 1, context)
    dp = d.params if d is not None else None
    statics = dict(cfg=model.cfg, draft_cfg=d.cfg if d is not None else None, gamma=g, candidates=candidates,
                   paths=model.paths)
    lens = dict(max_new=p.max_new, cache_len=cache_len, kv_quant=model.kv_quant, penalties=p.penalties,
                prefill_chunk=model.prefill_chunk)
    if timings is None:
        res = speculative_jit(model.params, dp, **args, **statics, ngram=proposer.ngram, **lens)
    else:  # the same two phases as two programs, compiled ahead and timed apart (as generate.stream)
        loop_args = {k: args[k] for k in ("sp", "max_new_tokens", "stop_ids", "seeds")}
        t0 = time.perf_counter()
        lowered = spec_prefill_jit.lower(model.params, dp, **args, **statics, **lens)
        prefill_c = lowered.compile()
        decode_c = spec_decode_jit.lower(model.params, dp, lowered.out_info, **loop_args, **statics,
                                         ngram=proposer.ngram).compile()
        t1 = time.perf_counter()
        s = jax.block_until_ready(prefill_c(model.params, dp, **args))
        t2 = time.perf_counter()
        res = jax.block_until_ready(decode_c(model.params, dp, s, **loop_args))
        timings.update(compile_s=t1 - t0, prefill_s=t2 - t1, decode_s=time.perf_counter() - t2)
    res = fetch(res)
    n = len(ids)
    num_new = res.out.num_new[:n]
    stats = SpecStats(passes=int(np.sum(res.passes[:n])), drafted=int(np.sum(res.drafted[:n])),
                      accepted=int(np.sum(res.accepted[:n])), new_tokens=int(np.sum(num_new)),
                      prefill_tokens=int(np.sum(num_new > 0)), gamma=g)
    if timings is not None:
        timings["new_tokens"] = stats.new_tokens
    strings = stop_rows(request.get("stop"), n)
    return to_completions(model, prompts, res.out, n, 1, strings, include_stop), stats
