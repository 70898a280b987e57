"""Sharding as data: a Mesh with named axes, a short logical-axis rule map, and the NamedSharding of
every param, cache and decode-state leaf.

Mesh axes: `data` (batch rows) and `model` (heads / kv-heads / ffn / vocab). A logical axis maps to
its mesh axis only when the dimension divides evenly by that axis' size; otherwise it is replicated.
So GQA with fewer kv heads than the model axis (Gemma 3 270M: 1 kv head) replicates K/V projections
and the KV cache across `model` while the query heads, the FFN and the vocabulary stay split: every
model shard needs the whole (single) kv head for its query heads, and replicating it costs 1/N of
the attention weights, where splitting head_dim instead would add an all-reduce per attention score.

Multi-host: call `jax.distributed.initialize()` first (on TPU pods it needs no arguments); the mesh
then spans every process's devices and the same functions apply.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgen.cache import SCALES, KVCache
from jaxgen.config import ModelConfig
from jaxgen.model import LayerParams, Params, param_shapes
from jaxgen.quant import LAYER_MATS as _QUANT_LAYER_MATS, MOE_MATS as _QUANT_MOE_MATS, QMatrix, present

AXES = ("data", "model")
# experts split over `model` (expert parallelism: a device holds E / model whole experts; the router
# and each expert's FFN width are then not split: one mesh axis per array dimension)
RULES = {"batch": "data", "heads": "model", "kv_heads": "model", "ffn": "model", "vocab": "model", "expert": "model"}


def parse_mesh(text: str | None, n_devices: int) -> dict[str, int]:
    """"data=2,model=4" -> {"data": 2, "model": 4}; a missing axis takes what is left; None -> all data."""
    sizes = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"bad mesh axis {part!r}: expected data=N and/or model=N (N >= 1)")
        sizes[name] = int(value)
    known = int(np.prod(list(sizes.values()))) if sizes else 1
    missing = [a for a in AXES if a not in sizes]
    if n_devices % known:
        raise ValueError(f"mesh {sizes} does not divide the {n_devices} devices")
    for i, a in enumerate(missing):
        sizes[a] = n_devices // known if i == 0 else 1
    if sizes["data"] * sizes["model"] != n_devices:
        raise ValueError(f"mesh {sizes} has {sizes['data'] * sizes['model']} devices, but there are {n_devices}")
    return sizes


def make_mesh(shape: str | dict | None = None, devices=None) -> Mesh:
    """A (data, model) Mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = shape if isinstance(shape, dict) else parse_mesh(shape, len(devices))
    if sizes.get("data", 1) * sizes.get("model", 1) != len(devices):
        raise ValueError(f"mesh {sizes} does not match {len(devices)} devices")
    grid = np.array(devices).reshape(sizes.get("data", 1), sizes.get("model", 1))
    return Mesh(grid, AXES)


def spec(logical: tuple, shape: tuple, mesh: Mesh, rules: dict = RULES) -> P:
    """PartitionSpec of one array: each logical axis -> its mesh axis when the dim divides evenly
    (and the mesh axis is not already used by an earlier dim), else replicated."""
    used, out = set(), []
    for name, dim in zip(logical, shape):
        axis = rules.get(name)
        if axis and axis not in used and mesh.shape[axis] > 1 and dim % mesh.shape[axis] == 0:
            out.append(axis)
            used.add(axis)
        else:
            out.append(None)
    return P(*out)


# Logical axes of every param leaf (the order of its dims).
_LAYER_AXES = LayerParams(
    attn_norm=("layers", "embed"), wq=("layers", "embed", "heads", "head_dim"),
    wk=("layers", "embed", "kv_heads", "head_dim"), wv=("layers", "embed", "kv_heads", "head_dim"),
    wo=("layers", "heads", "head_dim", "embed"), ffn_norm=("layers", "embed"),
    w_gate=("layers", "embed", "ffn"), w_up=("layers", "embed", "ffn"), w_down=("layers", "ffn", "embed"),
    bq=("layers", "heads", "head_dim"), bk=("layers", "kv_heads", "head_dim"), bv=("layers", "kv_heads", "head_dim"),
    q_norm=("layers", "head_dim"), k_norm=("layers", "head_dim"),
    post_attn_norm=("layers", "embed"), post_ffn_norm=("layers", "embed"),
    router=("layers", "embed", None), we_gate=("layers", "expert", "embed", "ffn"),
    we_up=("layers", "expert", "embed", "ffn"), we_down=("layers", "expert", "ffn", "embed"))
_CACHE_AXES = KVCache(
    k_local=("layers", "batch", "seq", "kv_heads", "head_dim"), v_local=("layers", "batch", "seq", "kv_heads", "head_dim"),
    pos_local=("batch", "seq"), k_global=("layers", "batch", "seq", "kv_heads", "head_dim"),
    v_global=("layers", "batch", "seq", "kv_heads", "head_dim"), pos_global=("batch", "seq"), lengths=("batch",),
    k_local_scale=("layers", "batch", "seq", "kv_heads"), v_local_scale=("layers", "batch", "seq", "kv_heads"),
    k_global_scale=("layers", "batch", "seq", "kv_heads"), v_global_scale=("layers", "batch", "seq", "kv_heads"),
    adapter=("batch",))


def _axes_tree(tree_axes, shapes, mesh, rules):
    return jax.tree.map(lambda names, s: NamedSharding(mesh, spec(names, s.shape, mesh, rules)), tree_axes, shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: dict = RULES, params=None) -> Params:
    """NamedShardings of the params. `params` (arrays or ShapeDtypeStructs) is needed for quantized
    params: a QMatrix leaf (jaxgen.quant) takes the split of the float matrix it replaces, for its
    integers and its scales alike (wq [L, D, N, H] split on N -> q [L, D, N*H] and scale [L, D/g, N*H]
    split on the merged axis; the embedding [V, D] split on V -> its [D, V] q and scale [., V] split on V; expert
    matrices [L, E, I, O] keep their axes, so their integers and scales split on E like the floats).
    Per-layer (unstacked) params get each layer's share of the stacked rule."""
    if params is not None and isinstance(params.layers, tuple):
        from jaxgen.model import stack_layers

        out = param_shardings(cfg, mesh, rules, jax.eval_shape(stack_layers, params))
        drop_l = lambda sh: NamedSharding(mesh, P(*tuple(sh.spec)[1:]))
        return out.replace(layers=tuple(jax.tree.map(drop_l, out.layers) for _ in params.layers))
    shapes = param_shapes(cfg)
    layer_axes = LayerParams(**{f.name: getattr(_LAYER_AXES, f.name) if getattr(shapes.layers, f.name) is not None else None
                                for f in dataclasses.fields(LayerParams)})
    axes = Params(embed=("vocab", "embed"), layers=layer_axes, final_norm=("embed",),
                  unembed=("vocab", "embed") if shapes.unembed is not None else None)
    out = _axes_tree(axes, shapes, mesh, rules)
    if params is None or not isinstance(params.embed, QMatrix):
        return out

    def q(float_sharding, qm, name):
        fs = tuple(float_sharding.spec) + (None,) * (len(shapes.embed.shape) + 2)
        if name in ("embed", "unembed"):  # the float [V, D] quantized as [D, V] (quant.quantize_params)
            i_ax, o_ax = fs[1], fs[0]
            lead = ()
        elif name == "wo":  # [L, N, H, D] -> [L, N*H, D]
            lead, i_ax, o_ax = (None,), fs[1], fs[3]
        else:  # [L, D, ...out] -> [L, D, prod(out)]
            lead, i_ax, o_ax = (None,), fs[1], next((a for a in fs[2:] if a), None)

        def sh(arr):
            dims = arr.shape[len(lead):]
            ok = lambda ax, d: ax if ax and d % mesh.shape[ax] == 0 else None
            return NamedSharding(mesh, P(*lead, ok(i_ax, dims[0]), ok(o_ax, dims[1])))
        return jax.tree.map(sh, qm)

    def q_experts(float_sharding, qm):  # [L, E, I, O] kept as is: integers and scales split like the floats
        fs = tuple(float_sharding.spec) + (None,) * 4
        ok = lambda ax, d: ax if ax and d % mesh.shape[ax] == 0 else None
        return jax.tree.map(lambda arr: NamedSharding(mesh, P(*(ok(ax, d) for ax, d in zip(fs, arr.shape)))), qm)

    layers = out.layers.replace(**{n: q(getattr(out.layers, n), getattr(params.layers, n), n)
                                   for n in present(params.layers, _QUANT_LAYER_MATS)},
                                **{n: q_experts(getattr(out.layers, n), getattr(params.layers, n))
                                   for n in present(params.layers, _QUANT_MOE_MATS)})
    unembed = None if out.unembed is None else q(out.unembed, params.unembed, "unembed")
    return out.replace(embed=q(out.embed, params.embed, "embed"), layers=layers, unembed=unembed)


def cache_shardings(cache_shape: KVCache, mesh: Mesh, rules: dict = RULES) -> KVCache:
    axes = _CACHE_AXES.replace(**{f: None for f in SCALES + ("adapter",) if getattr(cache_shape, f) is None})
    return _axes_tree(axes, cache_shape, mesh, rules)


def stack_shardings(cache, mesh: Mesh | None, rules: dict = RULES) -> tuple | None:
    """The NamedShardings of cache.stacks() (a KVCache or its shape) on `mesh`, which model.forward_hidden
    keeps the stacks in from layer to layer; None without a mesh."""
    if mesh is None:
        return None
    return cache_shardings(jax.eval_shape(lambda: cache), mesh, rules).stacks()


def state_shardings(state_shape, mesh: Mesh, rules: dict = RULES):
    """NamedShardings of an engine.DecodeState: every [B, ...] leaf split by rows on `data`, and the
    [B, V] penalty history also by vocabulary on `model`, as the logits it adjusts are (split by rows
    alone, it was all-gathered whole inside the decode loop, every step: XLA's "involuntary full
    rematerialization" warning); the stop-string and constraint tables (read by every row) replicated."""
    rows = lambda s: NamedSharding(mesh, spec(("batch",) + (None,) * (len(s.shape) - 1), s.shape, mesh, rules))
    vocab = lambda s: NamedSharding(mesh, spec(("batch", "vocab"), s.shape, mesh, rules))
    full = lambda s: NamedSharding(mesh, P())
    st = state_shape.stops
    stops = st.replace(token_class=full(st.token_class), next_state=full(st.next_state), hit=full(st.hit),
                       mask=rows(st.mask))
    return state_shape.replace(
        **{f.name: jax.tree.map(rows, getattr(state_shape, f.name))
           for f in dataclasses.fields(state_shape)
           if f.name not in ("step", "cache", "stops", "cons", "seen", "counts")},
        seen=vocab(state_shape.seen), counts=vocab(state_shape.counts),
        step=NamedSharding(mesh, P()), stops=stops, cache=cache_shardings(state_shape.cache, mesh, rules),
        cons=jax.tree.map(full, state_shape.cons))  # constraint tables: read by every row


def by_rows(f, mesh: Mesh | None, B: int):
    """f over arrays whose leading axis is the B rows, run on each `data` shard's rows by itself
    (the `model` axis left to the compiler). Why: XLA's partitioner does not split lax.top_k by rows,
    so sampling on a mesh all-gathered every row's candidates to every device each step (and every
    device chose every row's token); a row's choice depends on its row alone, so the rows' shards
    give the same tokens."""
    data = 1 if mesh is None else mesh.shape.get("data", 1)
    if data == 1 or B % data:
        return f
    return jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data"), axis_names={"data"})


def top_k(x: jax.Array, k: int, mesh: Mesh | None = None, local=jax.lax.top_k) -> tuple[jax.Array, jax.Array]:
    """lax.top_k(x, k) of x [B, V] laid out as the logits (rows on `data`, vocabulary on `model`):
    each device takes the k best of its own rows' vocabulary slice, and the model shards' k * model
    candidates are gathered and merged. Why: XLA gathers a split operand whole before a top_k (rows
    and vocabulary: beam search moved every row's logits, [B, V], every step); this moves
    [B / data, k * model]. Exact, ties included: lax.top_k prefers the lower index, and the merge
    sees the shards in vocabulary order. Also inside `by_rows` (rows already split). `local`: each
    device's search, lax.top_k or a function equal to it (sampling.top_candidates, two-level)."""
    B, V = x.shape
    data = 1 if mesh is None else mesh.shape.get("data", 1)
    model = 1 if mesh is None else mesh.shape.get("model", 1)
    rows = "data" if data > 1 and B % data == 0 else None
    context = jax.sharding.get_abstract_mesh()
    if mesh is not None and "data" in getattr(context, "manual_axes", ()):  # inside by_rows: x is a shard's rows
        mesh, rows = context, None
    # the merge moves k * model values and ids per row: split only where that is less than the row
    vocab = "model" if model > 1 and V % model == 0 and 2 * k * model < V else None
    if rows is None and vocab is None:
        return local(x, k)

    def shard(a):  # [B / data, V / model]
        val, idx = local(a, k)
        if vocab is None:
            return val, idx
        idx = idx + jax.lax.axis_index("model") * a.shape[1]  # ids in the whole vocabulary
        val, idx = (jax.lax.all_gather(t, "model", axis=1, tiled=True) for t in (val, idx))  # [., k * model]
        val, j = jax.lax.top_k(val, k)
        return val, jnp.take_along_axis(idx, j, axis=1)

    # check_vma=False: the merged result is the same on every model shard (an all_gather's output is
    # not inferred replicated), which out_specs without `model` states
    return jax.shard_map(shard, mesh=mesh, in_specs=P(rows, vocab), out_specs=P(rows),
                         axis_names={a for a in (rows, vocab) if a}, check_vma=False)(x)


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh, rules: dict = RULES) -> Params:
    """Place params (float or quantized) on their shardings (for Orbax, pass `param_shardings` to
    restore instead)."""
    return jax.device_put(params, param_shardings(cfg, mesh, rules, params))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def reshard(params, model):
    """Weight sync for RL: params from a training state, put in the sampling `model`'s layout, dtypes
    and shardings, device to device (no host round trip), ready for `generate` without a recompile.

    params: a jaxgen Params pytree as a trainer holds it: on any mesh (e.g. FSDP over 8 devices) or
    none, in any float dtype, with stacked ([L, ...]) or per-layer layers; or a jaxgen.lora.Adapter
    (cast to the model's float dtype and replicated on its mesh). Float params for a quantized model
    are quantized as its params are (mode and groups). The dtype cast runs on the source devices, so
    only the target's bytes move. Raises one line if the params are not the model's shapes."""
    from jaxgen import lora as lora_mod
    from jaxgen import quant
    from jaxgen.model import stack_layers, unstack_layers

    old = model.params
    dtype = lora_mod.float_dtype(old)
    if isinstance(params, lora_mod.Adapter):
        lora_mod.check(params, model.cfg)
        where = (NamedSharding(model.mesh, P()) if model.mesh is not None else
                 jax.tree.leaves(old)[0].sharding)
        return jax.device_put(jax.tree.map(lambda a: jnp_cast(a, dtype), params), where)
    if not isinstance(params, Params):
        raise ValueError(f"reshard takes jaxgen Params or a jaxgen.lora.Adapter, got {type(params).__name__}")
    params, old = params.replace(lora=None), old.replace(lora=None)
    requant = quant.is_quantized(old) and not quant.is_quantized(params)
    want = param_shapes(model.cfg, dtype) if requant else jax.eval_shape(stack_layers, old)
    got = jax.eval_shape(stack_layers, params)
    if jax.tree.structure(got) != jax.tree.structure(want) or any(
            g.shape != w.shape for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))):
        bad = next((f"{jax.tree_util.keystr(p)} {list(g.shape)} (the model's: {list(w.shape)})" for (p, g), w in
                    zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)) if g.shape != w.shape),
                   "a different set of params")
        raise ValueError(f"reshard: the params do not fit {model.cfg.name}: {bad}")
    if requant:  # float training params for a quantized sampler: quantized as its params are
        params = _quantize_like(stack_layers(params), old)
    params = unstack_layers(params) if isinstance(old.layers, tuple) else stack_layers(params)
    targets = jax.tree.map(lambda a: a.sharding, old)
    cast = jax.tree.map(lambda a, o: jnp_cast(a, o.dtype), params, old)
    return jax.device_put(cast, targets)


def jnp_cast(a, dtype):
    """a in `dtype` (a no-op when it is already), computed where a lives."""
    return a if a.dtype == dtype else a.astype(dtype)


def _quantize_like(params: Params, old: Params) -> Params:
    """Float params quantized as the (quantized) `old` params are: their mode, in their groups."""
    from jaxgen import quant

    mode, groups = quant.quant_mode(old), set(quant.groups_of(old).values())
    if len(groups) > 1:
        raise ValueError(f"reshard: the model's matrices are quantized in different groups ({sorted(groups)}); "
                         "quantize the params as the model was loaded and pass those")
    return quant.quantize_params(params, mode, groups.pop())
