"""Sharded generation equals single-device generation bit for bit, on meshes of the 8 fake CPU
devices; every param and cache leaf has the sharding the rules give; no recompilation on a rerun."""
import dataclasses
import itertools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxgen
from jaxgen import sharding as shd
from jaxgen.engine import prefill_jit
from jaxgen.generate import prepare
from jaxgen.model import Model

from .conftest import CONFIGS, random_params

PROMPTS = [[1, 5, 9], [3] * 11, [7, 2], [4, 4, 8, 15, 16, 23, 42], [9], [10, 11, 12, 13], [6, 6], [2, 3, 5, 7, 11]]
MESHES = [(8, 1), (1, 8), (2, 4), (4, 2)]
KNOBS = [dict(), dict(temperature=0.9, top_p=0.9, top_k=20, seed=3, repetition_penalty=1.2, frequency_penalty=0.3)]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    cfg = CONFIGS[request.param]
    params = random_params(cfg, seed=11)
    base = Model(cfg, params)
    ref = [[o.tokens for o in jaxgen.generate(base, PROMPTS, max_new_tokens=12, stop_ids=[], **k)] for k in KNOBS]
    return cfg, params, ref


def test_parse_mesh():
    assert shd.parse_mesh("data=2,model=4", 8) == {"data": 2, "model": 4}
    assert shd.parse_mesh("model=8", 8) == {"model": 8, "data": 1}
    assert shd.parse_mesh(None, 8) == {"data": 8, "model": 1}
    for bad, msg in [("data=3", "does not divide"), ("pipe=2", "bad mesh axis"), ("data=2,model=2", "has 4 devices")]:
        with pytest.raises(ValueError, match=msg):
            shd.parse_mesh(bad, 8)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
def test_sharded_equals_single_device(case, mesh_shape, compile_counter):
    cfg, params, ref = case
    mesh = shd.make_mesh({"data": mesh_shape[0], "model": mesh_shape[1]})
    model = Model(cfg, shd.shard_params(params, cfg, mesh), mesh=mesh)
    for knobs, want in zip(KNOBS, ref):
        got = [o.tokens for o in jaxgen.generate(model, PROMPTS, max_new_tokens=12, stop_ids=[], **knobs)]
        assert got == want, knobs
    before = compile_counter.count()
    jaxgen.generate(model, PROMPTS[::-1], max_new_tokens=12, stop_ids=[], temperature=0.5, seed=9)
    assert compile_counter.count() == before  # same shapes, other knobs and prompts: no recompilation


def _collectives(model, top_logprobs=0, beams=0, candidates=256, **knobs):
    """(dtype, shape, op_name or "") of every collective in the compiled generate program for PROMPTS
    (the beam search program with `beams` > 0), and the request's Plan."""
    import re

    from jaxgen.beam import beam_jit
    from jaxgen.engine import generate_jit
    from jaxgen.generate import place, statics

    _, args, p = prepare(model, PROMPTS, max_new_tokens=4, stop_ids=[], n=max(beams, 1), candidates=candidates, **knobs)
    if beams:
        zeros = np.zeros(p.batch, np.int32)
        args = {k: v for k, v in args.items() if k not in ("sp", "seeds")}
        args.update(width=zeros + beams, length_penalty=zeros.astype(np.float32), early_stopping=zeros)
        lowered = beam_jit.lower(model.params, **place(model, args), cfg=model.cfg, max_new=p.max_new,
                                 cache_len=p.cache_len, beams=beams, mesh=model.mesh)
    else:
        lowered = generate_jit.lower(model.params, **place(model, args), **statics(model, p, top_logprobs, candidates))
    hlo = lowered.compile().as_text()
    found = re.findall(r"= (\w+)\[([\d,]*)\]\S* (?:all-gather|all-reduce|all-to-all|collective-permute)\("
                       r"(?:.*op_name=\"([^\"]*)\")?", hlo)
    return [(dtype, tuple(int(d) for d in shape.split(",") if d), op) for dtype, shape, op in found], p


@pytest.mark.parametrize("layers", ["stacked", "unrolled"])
def test_no_collective_moves_the_cache_or_the_penalty_history(layers):
    """On a data=2,model=4 mesh with 2 kv heads (which the rules replicate over `model`) and penalties on,
    no collective of the sharded program moves a KV cache stack ([L, B, S, K, H]: GSPMD split it by
    kv-head groups inside the layer loop and gathered it whole every decode step) or a row's whole
    vocabulary of the penalty history (split by rows alone, it was gathered every step too)."""
    from jaxgen.model import unstack_layers

    cfg = CONFIGS["gemma"]
    assert cfg.n_kv_heads == 2 and cfg.n_heads == 4
    mesh = shd.make_mesh("data=2,model=4")
    params = random_params(cfg)
    params = unstack_layers(params) if layers == "unrolled" else params
    model = Model(cfg, shd.shard_params(params, cfg, mesh), mesh=mesh)
    moved, p = _collectives(model, **KNOBS[1])
    assert p.penalties
    dims = [(dtype, shape) for dtype, shape, _ in moved]
    assert dims  # the program does communicate (the query heads and the vocabulary are split)
    assert not [d for d in dims if len(d[1]) == 5], "a cache stack crosses the mesh"
    assert not [d for d in dims if d[0] in ("pred", "s32") and d[1][1:] == (cfg.vocab_size,)], "penalty history"


@pytest.mark.parametrize("name,beams", [("gemma", 0), ("qwen", 4)])
def test_data_parallel_programs_move_only_the_done_flag(name, beams):
    """On the default mesh (every device on `data`) rows are independent, and the compiled program
    (prefill and decode loop) moves nothing between devices but the loop's "every row done" flag.
    Before: sampling's and top_logprobs' top-k gathered every row to every device (sharding.by_rows),
    and every cache, position, token and penalty-history write all-gathered every row's slots and
    values, with rows as scatter indices (now cache.row_scatter: rows a batching dimension): 4 collectives per
    layer per step."""
    cfg = CONFIGS[name]
    mesh = shd.make_mesh("data=8")
    model = Model(cfg, shd.shard_params(random_params(cfg), cfg, mesh), mesh=mesh)
    moved, _ = _collectives(model, beams=beams, **({} if beams else dict(top_logprobs=3, **KNOBS[1])))
    assert moved and all(dtype == "pred" and shape == () for dtype, shape, _ in moved), moved


def test_sampling_top_logprobs_and_beam_search_move_no_rows_vocabulary():
    """On a data=2,model=4 mesh (vocabulary split on `model`), neither sampling's candidates, nor
    top_logprobs, nor beam search's ranking of each beam's continuations gathers the logits: each device
    takes the best of its own rows' vocabulary slice and only those cross the mesh (sharding.top_k;
    before, every step all-gathered [rows, V]). Tokens, top log-probs and beams equal one device's."""
    cfg = dataclasses.replace(CONFIGS["gemma"], vocab_size=4096)  # 2 k model < V for k = 256 candidates
    params = random_params(cfg, seed=5)
    mesh = shd.make_mesh("data=2,model=4")
    model = Model(cfg, shd.shard_params(params, cfg, mesh), mesh=mesh)
    sampled = dict(temperature=0.9, top_k=20, seed=4)
    for request in (dict(beams=4), dict(top_logprobs=5, **sampled)):
        moved, _ = _collectives(model, **request)
        assert moved
        assert not [m for m in moved if cfg.vocab_size in m[1]], (request, moved)
    base = Model(cfg, params)
    kw = dict(max_new_tokens=6, stop_ids=[])
    for request in (dict(top_logprobs=5, **sampled), dict(num_beams=4, return_beams=True)):
        want, got = (jaxgen.generate(m, PROMPTS[:4], **kw, **request) for m in (base, model))
        assert [c.tokens for c in got] == [c.tokens for c in want], request
        top = lambda out: [[i for step in c.top_logprobs for i, _ in step] for c in out if c.top_logprobs]
        assert top(got) == top(want)


def test_two_level_candidates_on_a_mesh_move_each_shards_best_not_its_blocks():
    """Sampling's candidates where each model shard's vocabulary slice is large enough for the
    two-level search (V / model >= 4 C blocks of 64): each shard finds its C best and only those cross
    the mesh. Before, the block maxima were merged and the C chosen blocks of 64 logits gathered from
    whichever shard held them ([rows, C, 64] all-reduced every step). Tokens equal one device's."""
    C = 16
    cfg = dataclasses.replace(CONFIGS["gemma"], vocab_size=4 * 4 * C * 64)  # model = 4 shards of 4 C blocks
    params = random_params(cfg, seed=6)
    mesh = shd.make_mesh("data=2,model=4")
    model = Model(cfg, shd.shard_params(params, cfg, mesh), mesh=mesh)
    sampled = dict(temperature=0.9, top_k=10, seed=4, candidates=C)
    moved, _ = _collectives(model, **sampled)
    rows = len(PROMPTS) // 2
    assert ("f32", (rows, C * 4)) in [m[:2] for m in moved]  # the merge of each shard's C best
    assert not [m for m in moved if C * 64 in m[1] or m[1][-2:] == (C, 64)], moved
    want, got = (jaxgen.generate(m, PROMPTS, max_new_tokens=6, stop_ids=[], **sampled)
                 for m in (Model(cfg, params), model))
    assert [c.tokens for c in got] == [c.tokens for c in want]


@pytest.mark.parametrize("mesh_shape", MESHES + [(2, 2)], ids=[f"{d}x{m}" for d, m in MESHES + [(2, 2)]])
def test_top_k_on_a_mesh_equals_lax_top_k(mesh_shape):
    """sharding.top_k (each shard's k best, merged) == lax.top_k, values and ids, ties (lower id first),
    -inf and NaN included; rows that do not divide `data`, and k whose merge would move more than the
    row itself (2 k model >= V), fall back to lax.top_k. The same with each shard's search two-level
    (sampling.top_candidates, as sampling's candidates on a mesh) where its slice has >= 4 k blocks."""
    from functools import partial

    from jaxgen.sampling import top_candidates

    devices = np.asarray(jax.devices()[:mesh_shape[0] * mesh_shape[1]])
    mesh = shd.make_mesh({"data": mesh_shape[0], "model": mesh_shape[1]}, devices=devices)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (16, 256)).astype(np.float32)  # few values: ties everywhere
    x[8:] = rng.normal(size=(8, 256))  # and rows whose best ids are spread over the shards
    x[1] = np.nan
    x[2, ::5] = np.nan
    x[3, 40:] = -np.inf
    x[4] = -np.inf
    x[5:8, rng.choice(256, 6, replace=False)] = 9.0  # blocks ranked first by one large value, anywhere
    two_level = partial(top_candidates, block=2)  # a shard of 256 / model ids: 128 / model blocks
    for (rows, k), local in itertools.product(((16, 7), (16, 12), (16, 128 // mesh_shape[1]), (6, 5), (16, 3)),
                                              (jax.lax.top_k, two_level)):
        a = jax.device_put(x[:rows], NamedSharding(mesh, P("data" if rows % mesh_shape[0] == 0 else None, "model")))
        got = jax.jit(lambda a: shd.top_k(a, k, mesh, local=local))(a)
        want = jax.lax.top_k(x[:rows], k)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"rows={rows} k={k} {local}")


def test_param_and_cache_shardings_follow_the_rules():
    cfg = CONFIGS["gemma"]  # N=4 query heads, K=2 kv heads, F=64, V=64
    mesh = shd.make_mesh("data=2,model=4")
    params = shd.shard_params(random_params(cfg), cfg, mesh)
    spec = lambda a: P(*(tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))))  # trailing Nones
    assert spec(params.layers.wq) == P(None, None, "model", None)  # heads split
    assert spec(params.layers.wk) == P(None, None, None, None)  # 2 kv heads on 4 shards: replicated
    assert spec(params.layers.wo) == P(None, "model", None, None)
    assert spec(params.layers.w_gate) == P(None, None, "model") and spec(params.layers.w_down) == P(None, "model", None)
    assert spec(params.embed) == P("model", None)  # [V, D]: vocab split
    assert spec(params.layers.attn_norm) == P(None, None)
    model = Model(cfg, params, mesh=mesh)
    _, args, p = prepare(model, PROMPTS[:3], max_new_tokens=4)
    assert p.batch % 2 == 0
    from jaxgen.generate import place
    state = prefill_jit(params, **place(model, args), cfg=cfg, max_new=p.max_new, cache_len=p.cache_len, mesh=mesh)
    assert spec(state.cache.k_local) == P(None, "data", None, None, None)
    assert spec(state.cache.pos_global) == P("data", None)
    assert spec(state.tokens) == P("data", None)
    assert spec(state.seen) == spec(state.counts) == P("data", "model")  # [B, V] like the logits it adjusts
    mesh2 = shd.make_mesh("data=4,model=2")  # now the 2 kv heads split
    cache = shd.cache_shardings(state.cache, mesh2)
    assert tuple(cache.k_global.spec)[:4] == (None, "data", None, "model")
