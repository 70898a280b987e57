"""Generation inside users' JAX code: the pure generate under their own jit, under vmap, fed fresh
params without recompiling; `score` (teacher-forced log-probs) matches generate's logprobs and has
a gradient that improves it."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxgen
from jaxgen.engine import generate_jit, generate_tokens
from jaxgen.generate import prepare

from .conftest import TINY_GEMMA, random_params

PROMPTS = [[1, 5, 9, 2], [3, 3], [7, 8, 9, 10, 11], [4]]


def request(model, **kw):
    _, args, p = prepare(model, PROMPTS, max_new_tokens=10, stop_ids=[], **kw)
    statics = dict(cfg=model.cfg, max_new=p.max_new, cache_len=p.cache_len)
    return args, statics


def test_inside_user_jit_and_fresh_params_do_not_recompile(compile_counter):
    model = jaxgen.Model(TINY_GEMMA, random_params(TINY_GEMMA))
    args, statics = request(model, temperature=1.0, seed=4)

    @jax.jit
    def user_step(params, args):  # e.g. an RL step: perturb params, then roll out with them
        params = jax.tree.map(lambda w: w * 1.0, params)
        return generate_tokens(params, **args, **statics).tokens

    ref = generate_jit(model.params, **args, **statics).tokens
    np.testing.assert_array_equal(user_step(model.params, args), ref)
    fresh = jax.tree.map(lambda w: w + 0.01, model.params)  # "updated" params: same shapes
    jax.block_until_ready(fresh)
    before = compile_counter.count()
    out = generate_jit(fresh, **args, **statics).tokens
    user_step(fresh, args)
    assert compile_counter.count() == before  # params are arguments, never baked in
    assert not np.array_equal(out, ref)  # and they are really used


def test_vmap_over_seeds_equals_separate_calls():
    model = jaxgen.Model(TINY_GEMMA, random_params(TINY_GEMMA))
    args, statics = request(model, temperature=1.0)
    seeds = np.stack([args["seeds"], args["seeds"] + 100])  # [2, B]
    run = lambda s: generate_tokens(model.params, **{**args, "seeds": s}, **statics).tokens
    both = jax.jit(jax.vmap(run))(seeds)
    for i in range(2):
        np.testing.assert_array_equal(both[i], generate_jit(model.params, **{**args, "seeds": seeds[i]}, **statics).tokens)


def test_score_matches_generate_logprobs():
    model = jaxgen.Model(TINY_GEMMA, random_params(TINY_GEMMA, seed=2))
    outs = jaxgen.generate(model, PROMPTS, max_new_tokens=8, temperature=0.9, seed=1, stop_ids=[])
    seqs = [p + o.tokens for p, o in zip(PROMPTS, outs)]
    T = max(map(len, seqs))
    tokens = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    lengths = np.array([len(s) for s in seqs], np.int32)
    got = np.asarray(jax.jit(jaxgen.score, static_argnames="cfg")(model.params, tokens, lengths, cfg=model.cfg))
    for i, (p, o) in enumerate(zip(PROMPTS, outs)):
        np.testing.assert_allclose(got[i, len(p) - 1:len(p) - 1 + len(o.tokens)], o.logprobs, atol=2e-4)
        assert np.all(got[i, lengths[i] - 1:] == 0)


def test_grad_of_score_raises_it():
    cfg = TINY_GEMMA
    params = random_params(cfg, seed=3)
    tokens = jnp.asarray([[1, 5, 9, 2, 7, 7], [3, 3, 4, 0, 0, 0]], jnp.int32)
    lengths = jnp.asarray([6, 3], jnp.int32)
    loss = lambda p: -jaxgen.score(p, tokens, lengths, cfg).sum()
    opt = optax.adam(1e-2)
    state = opt.init(params)
    step = jax.jit(lambda p, s: (lambda g: (optax.apply_updates(p, opt.update(g, s, p)[0]), opt.update(g, s, p)[1]))(jax.grad(loss)(p)))
    first = float(loss(params))
    for _ in range(5):
        params, state = step(params, state)
    assert np.isfinite(first) and float(loss(params)) < first - 0.5


def test_flax_linen_bridge():
    """examples/flax_bridge.py: a linen module's params are jaxgen's param tree; its logits equal
    jaxgen.forward's and the same params drive generate."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "examples" / "flax_bridge.py"
    spec = importlib.util.spec_from_file_location("flax_bridge", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    cfg = TINY_GEMMA
    tokens = jnp.asarray([[1, 5, 9, 2, 7]], jnp.int32)
    positions = jnp.arange(5)[None]
    module = ex.JaxgenLM(cfg)
    variables = module.init(jax.random.key(0), tokens, positions)
    params = variables["params"]["lm"]
    assert isinstance(params, jaxgen.Params)
    logits = module.apply(variables, tokens, positions)
    ref, _ = jaxgen.forward(params, tokens, positions, jaxgen.init_cache(cfg, 1, 5), cfg)
    np.testing.assert_allclose(logits, ref, rtol=1e-6)
    out = jaxgen.generate(jaxgen.Model(cfg, params), [[1, 5, 9, 2, 7]], max_new_tokens=4, stop_ids=[])
    assert out[0].tokens[0] == int(jnp.argmax(logits[0, -1]))  # greedy continues from the module's logits
