"""The pure rollout API: n samples == generate(n=...), the score layout (prompt then completion),
re-scoring equals the sampled logprobs, group advantages, no retrace when params change; and the
Tunix rollout interface (tunix.rl.rollout.base_rollout) when google-tunix is installed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import rollout as ro
from jaxgen.generate import generate, prepare
from tests.conftest import random_params

from .test_cli import ckpt  # noqa: F401  (the module-scoped tiny checkpoint fixture)

PROMPTS = [[5, 9, 2, 33, 7, 1, 8, 8, 21, 40, 3], [17, 4], [60, 2, 2, 9, 11, 12, 13]]
KW = dict(max_new_tokens=9, stop_ids=[7, 11], temperature=1.0, top_k=30, seed=4)
N = 3


def _rollout(model):
    _, args, p = prepare(model, PROMPTS, n=N, **KW)
    fn = jax.jit(lambda params, args: ro.rollout(params, **args, cfg=model.cfg, n=p.n, max_new=p.max_new,
                                                 cache_len=p.cache_len, penalties=p.penalties))
    return fn, args


def test_rollout_equals_generate_and_rescoring(tiny_model, compile_counter):
    fn, args = _rollout(tiny_model)
    r = jax.device_get(fn(tiny_model.params, args))
    want = generate(tiny_model, PROMPTS, n=N, **KW)
    assert any(c.finish_reason == "stop" for c in want)
    for i, c in enumerate(want):
        k = len(c.tokens)
        assert r.lengths[i] == k and r.mask[i].sum() == k and list(r.tokens[i, :k]) == c.tokens
        np.testing.assert_allclose(r.logprobs[i, :k], c.logprobs, atol=1e-5)
        assert not r.logprobs[i, k:].any()
        prompt = PROMPTS[i // N]
        L = len(prompt) + k
        assert list(r.sequences[i, :L]) == prompt + c.tokens and r.sequence_lengths[i] == L
        assert (r.sequences[i, L:] == 0).all()
    # the layout `score` takes: re-scored under the same params, the sampled logprobs come back
    np.testing.assert_allclose(ro.completion_logprobs(tiny_model.params, r, tiny_model.cfg), r.logprobs, atol=1e-4)
    # new params are a traced argument: the jitted rollout does not compile again
    fresh = jax.block_until_ready(random_params(tiny_model.cfg, seed=9))  # (its own small programs first)
    before = compile_counter.count()
    fn(fresh, args)
    assert compile_counter.count() == before


def test_group_advantages():
    rewards = jnp.asarray([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
    got = np.asarray(ro.group_advantages(rewards, 3))
    g = np.asarray(rewards).reshape(2, 3)
    want = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.allclose(got[3:], 0)  # a group with one reward has no signal


def test_tunix_rollout_interface(ckpt):
    """JaxgenRollout is a Tunix BaseRollout: generate maps RolloutConfig onto jaxgen's knobs (same
    tokens as jaxgen.generate), get_per_token_logps of its own output equals the sampled logprobs,
    update_params changes what it samples."""
    pytest.importorskip("tunix.rl.rollout.base_rollout")
    from tunix.rl.rollout import base_rollout

    import jaxgen
    from jaxgen.checkpoint import registry
    from jaxgen.tunix_rollout import JaxgenRollout

    model = registry.load(str(ckpt[2]))
    worker = JaxgenRollout(model)
    assert isinstance(worker, base_rollout.BaseRollout)
    cfg = base_rollout.RolloutConfig(max_tokens_to_generate=6, temperature=0.9, top_k=20, top_p=0.95, seed=3,
                                     max_prompt_length=16, eos_tokens=[], return_logprobs=True)
    prompts = ["the cat sat", "a"]
    out = worker.generate(prompts, cfg)
    want = jaxgen.generate(model, prompts, max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.95, seed=3,
                           stop_ids=[])
    assert [list(t) for t in out.tokens] == [w.tokens for w in want] and out.text == [w.text for w in want]
    assert out.left_padded_prompt_tokens.shape == (2, 16)
    comp = np.full((2, 6), worker.pad_id(), np.int32)
    for i, t in enumerate(out.tokens):
        comp[i, :len(t)] = t
    lp = np.asarray(worker.get_per_token_logps(out.left_padded_prompt_tokens, comp))
    for i, t in enumerate(out.tokens):
        np.testing.assert_allclose(lp[i, :len(t)], out.logprobs[i], atol=1e-4)
    worker.update_params(random_params(model.cfg, seed=11))
    assert [list(t) for t in worker.generate(prompts, cfg).tokens] != [list(t) for t in out.tokens]
