"""Rollouts for policy-gradient training: pure, jittable, in the layout a loss takes.

`rollout(params, prompts, ...)` samples n completions of each prompt from one prefill of it (the
engine's `generate_tokens` with a static n) and returns a `Rollout`: completion tokens [R, M] with
their mask, raw-model logprobs and lengths, and prompt + completion right-padded [R, T + M], the
layout `jaxgen.score` takes (R = P * n rows, prompt-major: rows p * n .. p * n + n - 1 are prompt p's).
`completion_logprobs` re-scores a rollout under (new) params, differentiably, aligned with its
tokens; `group_advantages` normalizes rewards within each prompt's group (GRPO).

All of it runs inside a user's own `jax.jit` (params are traced: updating them never recompiles);
`jaxgen.generate.prepare(model, prompts, n=...)` builds the arguments from text or ids.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgen import sampling as smp
from jaxgen.config import ModelConfig
from jaxgen.engine import generate_tokens
from jaxgen.model import Params, score


@struct.dataclass
class Rollout:
    tokens: jax.Array  # [R, M] int32 completion ids, pad_id past each row's length
    mask: jax.Array  # [R, M] bool: a generated token (a stop token included)
    logprobs: jax.Array  # [R, M] f32 raw-model log-probability of each token (0 where masked)
    lengths: jax.Array  # [R] int32 completion lengths
    finish: jax.Array  # [R] int32 engine finish codes (STOP, LENGTH, STOP_STRING)
    sequences: jax.Array  # [R, T + M] int32 prompt then completion, right-padded with pad_id
    prompt_lengths: jax.Array  # [R] int32 each row's prompt length (where its completion starts)

    @property
    def sequence_lengths(self) -> jax.Array:  # [R]
        return self.prompt_lengths + self.lengths


def rollout(params: Params, prompts: jax.Array, prompt_lengths: jax.Array, sp: smp.SamplingParams,
            max_new_tokens: jax.Array, stop_ids: jax.Array, seeds: jax.Array, *, cfg: ModelConfig, n: int,
            max_new: int, cache_len: int, stop_strings=None, prefix=None, pad_id: int = 0, mesh=None,
            kv_quant: str | None = None, penalties: bool = False,
            candidates: int = smp.DEFAULT_CANDIDATES, adapters: jax.Array | None = None) -> Rollout:
    """n samples of each of the P right-padded prompts [P, T] (lengths [P]); per-row arguments
    (sp, max_new_tokens, stop_ids, seeds, stop_strings' mask) have R = P * n rows. Static: cfg, n,
    max_new (M), cache_len, pad_id, mesh, kv_quant, penalties, candidates. A prefix (engine.Prefix)
    is not part of `sequences`: they hold what follows it. adapters [P]: each prompt's LoRA slot in
    params.lora (jaxgen.lora; score the rollout with the same slots, repeated n times)."""
    out = generate_tokens(params, prompts, prompt_lengths, sp, max_new_tokens, stop_ids, seeds, cfg=cfg,
                          max_new=max_new, cache_len=cache_len, candidates=candidates, pad_id=pad_id, mesh=mesh,
                          kv_quant=kv_quant, penalties=penalties, n=n, stop_strings=stop_strings, prefix=prefix,
                          adapters=adapters)
    M = out.tokens.shape[1]
    mask = jnp.arange(M)[None, :] < out.num_new[:, None]  # [R, M]
    plen = jnp.repeat(prompt_lengths, n)  # [R]
    seq = join(jnp.repeat(prompts, n, axis=0), plen, out.tokens, out.num_new, pad_id)
    return Rollout(tokens=jnp.where(mask, out.tokens, pad_id), mask=mask,
                   logprobs=jnp.where(mask, out.logprobs, 0.0), lengths=out.num_new, finish=out.finish,
                   sequences=seq, prompt_lengths=plen)


def join(prompts: jax.Array, prompt_lengths: jax.Array, completions: jax.Array, lengths: jax.Array,
         pad_id: int = 0) -> jax.Array:
    """[R, T + M] each row's prompt (its first prompt_lengths of prompts [R, T]) then its completion
    (the first lengths of completions [R, M]), right-padded with pad_id: the layout `score` takes."""
    T, M = prompts.shape[1], completions.shape[1]
    t = jnp.arange(T + M)[None, :]  # [1, T + M]
    j = t - prompt_lengths[:, None]  # index into the completion, [R, T + M]
    comp = jnp.take_along_axis(completions, jnp.clip(j, 0, M - 1), axis=1)
    prompt_part = jnp.take_along_axis(prompts, jnp.clip(t, 0, T - 1), axis=1)
    seq = jnp.where(t < prompt_lengths[:, None], prompt_part, jnp.where(j < lengths[:, None], comp, pad_id))
    return seq.astype(jnp.int32)


def completion_logprobs(params: Params, r: Rollout, cfg: ModelConfig, adapters: jax.Array | None = None) -> jax.Array:
    """[R, M] log-probabilities of the rollout's completion tokens under `params` (teacher-forced,
    differentiable; 0 where masked). Under the params that sampled it, equal to r.logprobs.
    adapters [R]: each row's LoRA slot in params.lora (differentiable in the adapter's weights too)."""
    return score_completions(params, r.sequences, r.prompt_lengths, r.lengths, r.tokens.shape[1], cfg, adapters)


def score_completions(params: Params, seq: jax.Array, prompt_lengths: jax.Array, lengths: jax.Array, M: int,
            cfg: ModelConfig, adapters: jax.Array | None = None) -> jax.Array:
    """[R, M] teacher-forced log-probs of the completions inside `join`ed sequences (0 past lengths)."""
    lp = score(params, seq, prompt_lengths + lengths, cfg, adapters)  # [R, T + M - 1]: lp[:, i] predicts token i + 1
    idx = prompt_lengths[:, None] - 1 + jnp.arange(M)[None, :]  # [R, M]
    picked = jnp.take_along_axis(lp, jnp.clip(idx, 0, lp.shape[1] - 1), axis=1)
    return jnp.where(jnp.arange(M)[None, :] < lengths[:, None], picked, 0.0)


def group_advantages(rewards: jax.Array, n: int, eps: float = 1e-6) -> jax.Array:
    """GRPO's advantages: rewards [P * n] (prompt-major groups of n) minus their group's mean, over
    the group's standard deviation (+ eps)."""
    g = rewards.reshape(-1, n)
    return ((g - g.mean(axis=1, keepdims=True)) / (g.std(axis=1, keepdims=True) + eps)).reshape(-1)
