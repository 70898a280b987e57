"""Train with optax and sample with jaxgen inside the jitted training step.

Phase 1 (supervised): fine-tune a tiny random model on a small text set this script writes (token
sequences that count upwards mod 50), sampling a greedy continuation inside the jitted step every
`sample_every` steps to watch it learn. Phase 2 (GRPO): G completions of each prompt from one prefill
(`jaxgen.rollout.rollout` with n=G), each ended by a stop string (the answer's end: two TARGET tokens in
a row, in this toy vocabulary where token i reads as "i,"); reward = the fraction of the answer's
tokens equal to TARGET; group-normalized advantages and a clipped ratio of the new to the sampling
policy's log-probs (`jaxgen.rollout.completion_logprobs`) over the completion mask. Params are
checkpointed with Orbax every `ckpt_every` steps. Params are arguments of the jitted step, so
updating them never recompiles.

    python examples/train_and_sample.py [--sup-steps 150] [--rl-steps 150] [--out /tmp/jaxgen-example]
"""
import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxgen
from jaxgen import rollout as ro
from jaxgen import sampling as smp
from jaxgen import stops
from jaxgen.checkpoint import orbax
from jaxgen.engine import generate_tokens

CFG = jaxgen.ModelConfig(name="tiny-example", vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=16, d_ff=128, max_seq_len=64, activation="silu", rope_theta=1e4)
TARGET = 42
B, T, M = 16, 8, 8  # batch, prompt length, new tokens
P, G = 4, 4  # GRPO: prompts per step, completions per prompt (P * G = B rows)
TOKEN_TEXT = [f"{i},".encode() for i in range(CFG.vocab_size)]  # what each token reads as
ANSWER_END = f"{TARGET},{TARGET},"  # the stop string: two TARGETs in a row end the answer


def text_set(n=256, length=T + M, seed=0):
    starts = np.random.default_rng(seed).integers(0, 50, n)
    return ((starts[:, None] + np.arange(length)[None, :]) % 50).astype(np.int32)  # [n, length]


def rollout(params, prompts, seeds, temperature):
    """Sample M tokens per row with jaxgen (pure, jittable); return the full sequences and new ids."""
    lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    sp = smp.SamplingParams(**{k: jnp.broadcast_to(v[:1], (prompts.shape[0],) + v.shape[1:])
                               for k, v in vars(smp.make_sampling_params(1, temperature=temperature)).items()})
    out = generate_tokens(params, prompts, lengths, sp, jnp.full_like(lengths, M),
                          jnp.full((prompts.shape[0], 4), -1, jnp.int32), seeds, cfg=CFG, max_new=M,
                          cache_len=T + M)
    return jnp.concatenate([prompts, out.tokens], axis=1), out.tokens


def grpo_rollout(params, prompts, seeds):
    """G samples of each of the P prompts [P, T] from one prefill of it, stopped at ANSWER_END."""
    R = prompts.shape[0] * G
    sp = smp.SamplingParams(**{k: jnp.broadcast_to(v[:1], (R,) + v.shape[1:])
                               for k, v in vars(smp.make_sampling_params(1, temperature=1.0)).items()})
    table = stops.build([[ANSWER_END]], TOKEN_TEXT, CFG.vocab_size, rows=R)  # host numpy: a constant
    table = table.replace(mask=np.full((R,), table.mask[0]))
    return ro.rollout(params, prompts, jnp.full((prompts.shape[0],), T, jnp.int32), sp, jnp.full((R,), M, jnp.int32),
                      jnp.full((R, 8), -1, jnp.int32), seeds, cfg=CFG, n=G, max_new=M, cache_len=T + M,
                      stop_strings=table)


def main(sup_steps=150, rl_steps=150, sample_every=25, ckpt_every=50, out="/tmp/jaxgen-example", lr=3e-3):
    out = pathlib.Path(out)
    params = jaxgen.init_params(CFG, jax.random.key(0))
    opt = optax.adam(lr)
    full = jnp.full((B,), T + M, jnp.int32)

    @jax.jit
    def sup_step(params, state, batch):
        loss = lambda p: -jaxgen.score(p, batch, full, CFG).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    @jax.jit
    def eval_greedy(params, batch, step):  # sampling inside jit, every few steps
        seqs, new = rollout(params, batch[:, :T], step * B + jnp.arange(B, dtype=jnp.uint32), 0.0)
        return jnp.mean(new == batch[:, T:])

    @jax.jit
    def rl_step(params, state, prompts, step):
        r = grpo_rollout(params, prompts, step * B + jnp.arange(B, dtype=jnp.uint32))
        hits = jnp.sum((r.tokens == TARGET) & r.mask, axis=1)
        reward = hits / jnp.maximum(r.lengths, 1)  # [P * G]
        adv = jax.lax.stop_gradient(ro.group_advantages(reward, G))

        def loss(p):  # GRPO / PPO clipped surrogate over the completion tokens
            ratio = jnp.exp(ro.completion_logprobs(p, r, CFG) - r.logprobs)  # [P * G, M]
            obj = jnp.minimum(ratio * adv[:, None], jnp.clip(ratio, 0.8, 1.2) * adv[:, None])
            return -jnp.mean(jnp.sum(obj * r.mask, axis=1) / jnp.maximum(r.lengths, 1))

        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        stopped = jnp.mean(r.finish == 3)  # rows that ended at the stop string
        return optax.apply_updates(params, updates), state, reward.mean(), stopped

    data = text_set()
    state = opt.init(params)
    log = {"sup_loss": [], "greedy_acc": [], "reward": [], "stopped": []}
    rng = np.random.default_rng(1)
    for step in range(sup_steps):
        batch = jnp.asarray(data[rng.integers(0, len(data), B)])
        params, state, loss = sup_step(params, state, batch)
        log["sup_loss"].append(float(loss))
        if step % sample_every == 0 or step == sup_steps - 1:
            log["greedy_acc"].append((step, float(eval_greedy(params, batch, step))))
    state = opt.init(params)
    for step in range(rl_steps):
        prompts = jnp.asarray(data[rng.integers(0, len(data), P), :T])
        params, state, reward, stopped = rl_step(params, state, prompts, step)
        log["reward"].append(float(reward))
        log["stopped"].append(float(stopped))
        if ckpt_every and (step + 1) % ckpt_every == 0:
            orbax.save(out / f"step_{step + 1:05d}", CFG, params)
    return params, log


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sup-steps", type=int, default=150)
    ap.add_argument("--rl-steps", type=int, default=150)
    ap.add_argument("--out", default="/tmp/jaxgen-example")
    a = ap.parse_args()
    _, log = main(a.sup_steps, a.rl_steps, out=a.out)
    r = log["reward"]
    print(json.dumps({"sup_loss_first_last": [log["sup_loss"][0], log["sup_loss"][-1]],
                      "greedy_acc": log["greedy_acc"],
                      "reward_by_25_steps": [round(float(np.mean(r[i:i + 25])), 3) for i in range(0, len(r), 25)],
                      "stopped_last_25_steps": round(float(np.mean(log["stopped"][-25:])), 3)}))
