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
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgen.cache import KVCache
from jaxgen.config import ModelConfig
from jaxgen.model import LayerParams, Params, param_shapes

AXES = ("data", "model")
RULES = {"batch": "data", "heads": "model", "kv_heads": "model", "ffn": "model", "vocab": "model"}


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
    post_attn_norm=("layers", "embed"), post_ffn_norm=("layers", "embed"))
_CACHE_AXES = KVCache(
    k_local=("layers", "batch", "seq", "kv_heads", "head_dim"), v_local=("layers", "batch", "seq", "kv_heads", "head_dim"),
    pos_local=("batch", "seq"), k_global=("layers", "batch", "seq", "kv_heads", "head_dim"),
    v_global=("layers", "batch", "seq", "kv_heads", "head_dim"), pos_global=("batch", "seq"), lengths=("batch",))


def _axes_tree(tree_axes, shapes, mesh, rules):
    return jax.tree.map(lambda names, s: NamedSharding(mesh, spec(names, s.shape, mesh, rules)), tree_axes, shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: dict = RULES) -> Params:
    shapes = param_shapes(cfg)
    layer_axes = LayerParams(**{f.name: getattr(_LAYER_AXES, f.name) if getattr(shapes.layers, f.name) is not None else None
                                for f in dataclasses.fields(LayerParams)})
    axes = Params(embed=("vocab", "embed"), layers=layer_axes, final_norm=("embed",),
                  unembed=("vocab", "embed") if shapes.unembed is not None else None)
    return _axes_tree(axes, shapes, mesh, rules)


def cache_shardings(cache_shape: KVCache, mesh: Mesh, rules: dict = RULES) -> KVCache:
    return _axes_tree(_CACHE_AXES, cache_shape, mesh, rules)


def state_shardings(state_shape, mesh: Mesh, rules: dict = RULES):
    """NamedShardings of a generate.DecodeState: every [B, ...] leaf split by rows on `data`."""
    rows = lambda s: NamedSharding(mesh, spec(("batch",) + (None,) * (len(s.shape) - 1), s.shape, mesh, rules))
    return state_shape.replace(
        **{f.name: jax.tree.map(rows, getattr(state_shape, f.name))
           for f in dataclasses.fields(state_shape) if f.name not in ("step", "cache")},
        step=NamedSharding(mesh, P()), cache=cache_shardings(state_shape.cache, mesh, rules))


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh, rules: dict = RULES) -> Params:
    """Place params on their shardings (for Orbax, pass `param_shardings` to restore instead)."""
    return jax.device_put(params, param_shardings(cfg, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))
