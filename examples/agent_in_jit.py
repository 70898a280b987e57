"""A multi-turn agent episode whose environment is a JAX function, all inside one `jax.jit`.

The "agent" (a tiny random model: the point is the plumbing) writes a reply; the environment, a
calculator written in jax.numpy, reads the reply's tokens and answers with their sum as a tool
result: [TOOL, tens, units, END]; the agent continues on its kept KV cache (only the 4 new tokens
are prefilled). Four turns run in one compiled program with no host round trip
(`jaxgen.conversation.begin` / `extend`), and the same episode through the host API
(`jaxgen.conversation.Conversation`) gives the same tokens. The RL mask (which tokens the model
generated) comes with it.

    python examples/agent_in_jit.py [--turns 4] [--rows 8]
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import conversation as cv
from jaxgen import sampling as smp
from jaxgen.config import ModelConfig
from jaxgen.model import Model, init_params

CFG = ModelConfig(name="agent-toy", vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=128, max_seq_len=512, activation="silu", rope_theta=1e4)
TOOL, END = 60, 61  # the tool result's markers; digits are tokens 0..9
NEW, MAX_LEN = 8, 256  # new tokens per reply, cache slots per row


def calculator(tokens, num_new):
    """The environment, in jax.numpy (numpy works too): [B, M] replies -> [B, 4] tool results."""
    xp = jnp if isinstance(tokens, jax.Array) else np
    keep = xp.arange(tokens.shape[1])[None, :] < num_new[:, None]
    total = xp.sum(xp.where(keep, tokens, 0), axis=1) % 100
    return xp.stack([xp.full_like(total, TOOL), total // 10, total % 10, xp.full_like(total, END)], 1).astype(xp.int32)


def episode_in_jit(params, prompts, lengths, turns: int, temperature: float = 0.8):
    """Every turn inside one program: returns each turn's replies [turns, B, M] and lengths."""
    B = prompts.shape[0]
    sp = smp.make_sampling_params(B, temperature=temperature)
    mnt, stop_ids = jnp.full((B,), NEW, jnp.int32), jnp.full((B, 8), -1, jnp.int32)
    # row i of turn t: seed t * 1_000_003 + i, what Conversation's default seed (the turn) gives it
    seeds = lambda t: jnp.asarray([(t * 1_000_003 + i) % 2 ** 31 for i in range(B)], jnp.uint32)
    state, ep = cv.begin(params, prompts, lengths, sp, mnt, stop_ids, seeds(0), cfg=CFG, max_new=16,
                         cache_len=MAX_LEN)
    replies, counts = [state.tokens], [state.num_new]
    for t in range(1, turns):
        result = calculator(state.tokens, state.num_new)  # the environment, traced
        state, ep = cv.extend(params, ep, result, jnp.full((B,), 4, jnp.int32), sp, mnt, stop_ids, seeds(t),
                              cfg=CFG, max_new=16)
        replies.append(state.tokens)
        counts.append(state.num_new)
    return jnp.stack(replies), jnp.stack(counts)


def main(turns: int = 4, rows: int = 8, seed: int = 0):
    params = init_params(CFG, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(10, 60, size=k)] for k in rng.integers(3, 12, size=rows)]
    tok = np.zeros((rows, 16), np.int32)
    for i, p in enumerate(prompts):
        tok[i, :len(p)] = p
    run = jax.jit(episode_in_jit, static_argnames=("turns",))
    replies, counts = jax.device_get(run(params, tok, np.array([len(p) for p in prompts], np.int32), turns=turns))

    # the same episode through the host API, the environment applied to the host's copies
    conv = cv.Conversation(Model(CFG, params), max_len=MAX_LEN)
    out = conv.generate(prompts, temperature=0.8, max_new_tokens=NEW, stop_ids=[])
    host = [out]
    for _ in range(1, turns):
        toks = np.array([c.tokens for c in out])
        out = conv.generate([list(map(int, r)) for r in calculator(toks, np.array([len(c.tokens) for c in out]))],
                            temperature=0.8, max_new_tokens=NEW, stop_ids=[])
        host.append(out)
    same = all([list(map(int, replies[t, i, :counts[t, i]])) for i in range(rows)] == [c.tokens for c in host[t]]
               for t in range(turns))
    h = conv.histories()
    print(f"{turns} turns x {rows} rows in one jit == the host API: {same}")
    print(f"row 0: {h['lengths'][0]} tokens, {int(h['generated'][0].sum())} generated (the RL mask), "
          f"tool results {[list(map(int, r)) for r in np.asarray(h['tokens'][0])[~h['generated'][0]][len(prompts[0]):].reshape(-1, 4)]}")
    return same, conv


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8)
    a = ap.parse_args()
    main(a.turns, a.rows)
