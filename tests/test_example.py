"""examples/train_and_sample.py, shortened: supervised loss falls, greedy samples taken inside the
jitted step get better, the GRPO reward rises (G samples per prompt from one prefill, ended by a stop
string), and Orbax checkpoints restore the params."""
import importlib.util
import pathlib

import chex
import jax
import numpy as np

from jaxgen.checkpoint import orbax

PATH = pathlib.Path(__file__).parent.parent / "examples" / "train_and_sample.py"


def test_train_and_sample_short(tmp_path):
    spec = importlib.util.spec_from_file_location("train_and_sample", PATH)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    params, log = ex.main(sup_steps=60, rl_steps=40, sample_every=20, ckpt_every=20, out=tmp_path)
    loss = log["sup_loss"]
    assert np.mean(loss[-5:]) < 0.5 * np.mean(loss[:5])
    assert log["greedy_acc"][-1][1] > log["greedy_acc"][0][1] + 0.3
    r = log["reward"]
    assert np.mean(r[-10:]) > np.mean(r[:5]) + 0.3, r
    assert np.mean(log["stopped"][-10:]) > 0.5 > np.mean(log["stopped"][:3])  # answers end at the stop string
    cfg, restored, _ = orbax.restore(tmp_path / "step_00040")
    assert cfg == ex.CFG
    chex.assert_trees_all_equal(params, restored)


def test_agent_episode_in_jit():
    """examples/agent_in_jit.py: a calculator environment in jax.numpy, several turns in one jit ==
    the same episode through the host API; the history's mask covers the replies only."""
    spec = importlib.util.spec_from_file_location("agent_in_jit", PATH.parent / "agent_in_jit.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    same, conv = ex.main(turns=3, rows=4)
    assert same
    h = conv.histories()
    assert (h["generated"].sum(axis=1) == 3 * ex.NEW).all()
    for i in range(4):  # after the first reply, every environment token is a tool result [TOOL, d, d, END]
        g = h["generated"][i, :h["lengths"][i]]
        env = h["tokens"][i, :h["lengths"][i]][np.argmax(g):][~g[np.argmax(g):]].reshape(-1, 4)
        assert len(env) == 2 and (env[:, 0] == ex.TOOL).all() and (env[:, 3] == ex.END).all()
