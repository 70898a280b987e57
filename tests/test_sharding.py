"""Sharded generation equals single-device generation bit for bit, on meshes of the 8 fake CPU
devices; every param and cache leaf has the sharding the rules give; no recompilation on a rerun."""
import pytest
from jax.sharding import PartitionSpec as P

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


def _collectives(model, **knobs):
    """(dtype, shape, op_name or "") of every collective in the compiled generate program for PROMPTS,
    and the request's Plan."""
    import re

    from jaxgen.engine import generate_jit
    from jaxgen.generate import place, statics

    _, args, p = prepare(model, PROMPTS, max_new_tokens=4, stop_ids=[], **knobs)
    hlo = generate_jit.lower(model.params, **place(model, args), **statics(model, p)).compile().as_text()
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


def test_sampling_runs_on_each_devices_own_rows():
    """On the default mesh (every device on `data`) sampling's top-k moves nothing between devices:
    XLA's partitioner does not split lax.top_k by rows, so each step all-gathered every row's
    candidates to every device, which then chose every row's token (engine.by_rows)."""
    cfg = CONFIGS["qwen"]
    mesh = shd.make_mesh("data=8")
    model = Model(cfg, shd.shard_params(random_params(cfg), cfg, mesh), mesh=mesh)
    moved, _ = _collectives(model, **KNOBS[1])
    assert moved  # the cache writes still exchange each new token's row indices
    assert not [m for m in moved if "top_k" in m[2] or "sort" in m[2]], moved


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
