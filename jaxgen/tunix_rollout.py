"""jaxgen as a Tunix rollout engine (optional extra `tunix`): `JaxgenRollout(model)` implements
`tunix.rl.rollout.base_rollout.BaseRollout` (generate, get_per_token_logps, update_params, pad_id,
eos_id, model), so Tunix's RL learners can sample with jaxgen's compiled loop.

Mapping of Tunix's RolloutConfig: max_tokens_to_generate -> max_new_tokens; temperature, top_p,
top_k (None or -1: off) as they are; seed (an int, an integer array or a PRNG key: its first
integer) -> jaxgen's seed; eos_tokens -> stop_ids (default: the tokenizer's stop ids);
max_prompt_length: prompts longer than it keep their last max_prompt_length tokens, and
`left_padded_prompt_tokens` is [B, max_prompt_length]. `generate(..., stop=[...], n=k)` also takes
jaxgen's stop strings and n samples per prompt. RolloutOutput.logits is an empty list: jaxgen does
not keep per-step [V] logits (Tunix's learners use logprobs); logprobs are the raw model's.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

try:
    from tunix.rl.rollout import base_rollout
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("jaxgen.tunix_rollout needs google-tunix: pip install 'jaxgen[tunix]'") from e

from jaxgen import backend
from jaxgen.generate import generate
from jaxgen.model import Model, Params
from jaxgen.sharding import reshard
from jaxgen.rollout import join, score_completions


def _seed(seed) -> int:
    if seed is None:
        return 0
    a = jnp.asarray(seed) if not isinstance(seed, int) else seed
    if isinstance(a, int):
        return a
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    return int(np.asarray(a).ravel()[-1]) % (2 ** 31)


def _logps(params, prompt_tokens, completion_tokens, pad_id, eos_id, cfg, adapters=None):
    """Log-probs [B, Tc] of right-padded completions after left-padded prompts [B, Tp]."""
    Tp, Tc = prompt_tokens.shape[1], completion_tokens.shape[1]
    plen = jnp.sum(prompt_tokens != pad_id, axis=1)  # [B]; left padding: the pads come first
    # right-align -> left-align the prompts: row b's tokens start at column Tp - plen[b]
    cols = jnp.clip(jnp.arange(Tp)[None, :] + (Tp - plen)[:, None], 0, Tp - 1)
    prompts = jnp.take_along_axis(prompt_tokens, cols, axis=1)
    # a completion runs to its first eos (kept) or its first pad
    ends = (completion_tokens == eos_id) | (completion_tokens == pad_id)
    first = jnp.min(jnp.where(ends, jnp.arange(Tc)[None, :] + (completion_tokens == eos_id), Tc), axis=1)  # [B]
    seq = join(prompts, plen, completion_tokens, first, pad_id)
    return score_completions(params, seq, plen, first, Tc, cfg, adapters)


_logps_jit = backend.jit(_logps, static_argnames=("pad_id", "eos_id", "cfg"))


class JaxgenRollout(base_rollout.BaseRollout):
    """A Tunix rollout worker over a jaxgen Model (with a tokenizer)."""

    def __init__(self, model: Model, **kwargs):
        if model.tokenizer is None:
            raise ValueError("JaxgenRollout needs a model with a tokenizer (Tunix passes text prompts)")
        self._model = model
        self._lora = None  # a LoRA adapter every rollout applies (update_params), or None

    def generate(self, prompts: list[str], rollout_config: base_rollout.RolloutConfig, **kwargs
                 ) -> base_rollout.RolloutOutput:
        c = rollout_config
        tok = self._model.tokenizer
        L = c.max_prompt_length
        ids = [tok.encode(p)[-L:] for p in prompts]
        n = int(kwargs.get("n", 1))
        outs = generate(self._model, ids, max_new_tokens=c.max_tokens_to_generate, temperature=c.temperature,
                        top_p=1.0 if c.top_p is None else c.top_p,
                        top_k=0 if c.top_k in (None, -1) else c.top_k, seed=_seed(c.seed),
                        stop_ids=list(c.eos_tokens) if c.eos_tokens is not None else None,
                        stop=kwargs.get("stop"), n=n, lora=self._lora)
        padded = np.full((len(ids), L), self.pad_id(), np.int32)
        for i, x in enumerate(ids):
            padded[i, L - len(x):] = x
        return base_rollout.RolloutOutput(
            text=[o.text for o in outs], logits=[], tokens=[np.asarray(o.tokens, np.int32) for o in outs],
            left_padded_prompt_tokens=np.repeat(padded, n, axis=0),
            logprobs=[np.asarray(o.logprobs, np.float32) for o in outs] if c.return_logprobs else None)

    def get_per_token_logps(self, prompt_tokens: jax.Array, completion_tokens: jax.Array) -> jax.Array:
        from jaxgen import lora as lora_mod

        B = prompt_tokens.shape[0]
        model = lora_mod.attach(self._model, self._lora, B)  # (the model itself without an adapter)
        adapters = None if self._lora is None else jnp.ones((B,), jnp.int32)  # slot 1: the adapter
        return _logps_jit(model.params, jnp.asarray(prompt_tokens, jnp.int32),
                          jnp.asarray(completion_tokens, jnp.int32), pad_id=self.pad_id(), eos_id=self.eos_id(),
                          cfg=self._model.cfg, adapters=adapters)

    def update_params(self, params, filter_types=None) -> None:
        """New weights from the trainer, put in the rollout's layout, dtypes and shardings device to
        device (`jaxgen.reshard`): a jaxgen Params pytree (stacked layers, as training keeps them, or
        per layer; any mesh or dtype), or a LoRA adapter (a jaxgen.lora.Adapter, or a Tunix / qwix LoRA
        param tree: `jaxgen.lora.from_qwix`), which every later rollout and log-prob then applies
        unmerged (same rank bucket: no recompile)."""
        from jaxgen import lora as lora_mod

        if isinstance(params, Params):
            self._model = dataclasses.replace(self._model, params=reshard(params, self._model))
            return
        adapter = params if isinstance(params, lora_mod.Adapter) else lora_mod.from_qwix(params, self._model.cfg)
        self._lora = reshard(adapter, self._model)

    def pad_id(self) -> int:
        return int(self._model.tokenizer.pad_id)

    def eos_id(self) -> int:
        return int(self._model.tokenizer.eos_id)

    def model(self) -> Model:
        return self._model
