"""Orbax checkpoints: params + config + tokenizer in one directory, the fast path for loading.

Layout of DST:  config.toml (the ModelConfig fields), tokenizer.json (the tokenizer's spec),
params/ (an Orbax StandardCheckpointer pytree). Restoring can place every leaf straight onto a
sharding: pass `shardings`, a Params-shaped tree of jax.sharding.Sharding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

from jaxgen.config import ModelConfig, config_from_dict
from jaxgen.errors import first_line


def _toml(cfg: ModelConfig) -> str:
    lines = []
    for k, v in dataclasses.asdict(cfg).items():
        lines.append(f"{k} = " + ("true" if v is True else "false" if v is False else json.dumps(v)))
    return "\n".join(lines) + "\n"


def is_checkpoint(path) -> bool:
    p = pathlib.Path(path)
    return (p / "config.toml").exists() and (p / "params").is_dir()


def save(path, cfg: ModelConfig, params, tokenizer=None) -> pathlib.Path:
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new directory")
    path.mkdir(parents=True, exist_ok=True)
    from jaxgen import quant
    from jaxgen.model import stack_layers

    params = stack_layers(params)  # checkpoints hold the stacked layout (one array per weight kind)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / "params", _stored(params))
    ckpt.wait_until_finished()
    if quant.is_quantized(params):  # how to rebuild the QMatrix leaves at restore
        (path / "quant.json").write_text(json.dumps({"mode": quant.quant_mode(params), "groups": quant.groups_of(params)}))
    if tokenizer is not None:
        (path / "tokenizer.json").write_text(json.dumps(tokenizer.to_dict()))
    (path / "config.toml").write_text(_toml(cfg))  # written last: its presence marks a complete save
    return path


def load_config(path) -> ModelConfig:
    if not is_checkpoint(path):
        raise ValueError(f"{pathlib.Path(path).absolute()} is not a jaxgen Orbax checkpoint (no config.toml + params/)")
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib
    with open(pathlib.Path(path) / "config.toml", "rb") as f:
        return config_from_dict(tomllib.load(f))


def restore(path, dtype=jnp.float32, shardings=None, mesh=None):
    """(cfg, params, tokenizer or None) from an Orbax checkpoint directory, params cast to `dtype`
    (a quantized checkpoint keeps its integers; its scales and norms are cast)."""
    import orbax.checkpoint as ocp

    from jaxgen import quant
    from jaxgen import tokenizer as tok_mod
    from jaxgen.model import param_shapes

    path = pathlib.Path(path).absolute()
    cfg = load_config(path)  # raises if `path` is not a checkpoint
    with _unreadable(path):
        stored = ocp.StandardCheckpointer().metadata(path / "params")
    stored = getattr(stored, "item_metadata", stored)
    if not any(hasattr(x, "dtype") for x in jax.tree.leaves(stored)):
        raise ValueError(f"{path}: the Orbax checkpoint's params metadata lists no arrays; is it complete?")
    stored_dtype = max((x.dtype for x in jax.tree.leaves(stored)),
                       key=lambda d: jnp.dtype(d).kind == "f")  # a float leaf (norms are never quantized)
    target = param_shapes(cfg, stored_dtype)
    # checkpoints written by jaxgen 0.2 store float embedding tables as [D, V]:
    # restored as such, then transposed
    old_tables = _old_table_names(stored, cfg)
    target = target.replace(**{n: jax.ShapeDtypeStruct(getattr(target, n).shape[::-1], stored_dtype) for n in old_tables})
    qfile = path / "quant.json"
    if qfile.exists():
        spec = json.loads(qfile.read_text())
        target = quant.quantized_shapes(target, spec["mode"], spec["groups"])
    if mesh is not None:  # jaxgen.sharding's rules for these (float or quantized) params
        from jaxgen.sharding import param_shardings

        shardings = param_shardings(cfg, mesh, params=target)
    if shardings is None:  # without a sharding Orbax hands back host numpy arrays: place them on device
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, target)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
    from jaxgen.model import LayerParams, Params

    # Restore what the checkpoint holds: fields added to LayerParams since it was written (the
    # mixture-of-experts weights) are None in this config and absent on disk.
    meta = getattr(stored, "tree", stored)
    on_disk = set(meta["layers"]) if isinstance(meta, dict) and isinstance(meta.get("layers"), dict) else None
    item = _stored(target)
    item["layers"] = {f.name: getattr(target.layers, f.name) for f in dataclasses.fields(LayerParams)
                      if on_disk is None or f.name in on_disk or getattr(target.layers, f.name) is not None}
    with _unreadable(path):
        restored = ocp.StandardCheckpointer().restore(path / "params", item)
    layers = restored["layers"]
    missing = [f"layers.{f.name}" for f in dataclasses.fields(LayerParams)
               if getattr(target.layers, f.name) is not None and layers.get(f.name) is None]
    missing += [k for k, v in item.items() if k != "layers" and v is not None and restored.get(k) is None]
    if missing:  # (config.toml edited: qk_norm = true over a checkpoint without q / k norms)
        raise ValueError(f"{path}: config.toml's model has weights the checkpoint does not hold: {missing}")
    params = Params(**{**restored, "layers": LayerParams(**{f.name: layers.get(f.name) for f in
                                                            dataclasses.fields(LayerParams)})})
    if old_tables:  # T:dv_vd
        params = params.replace(**{n: getattr(params, n).T for n in old_tables})
    if params.embed.dtype != jnp.dtype(dtype):
        params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    tokenizer = None
    if (path / "tokenizer.json").exists():
        try:
            tokenizer = tok_mod.from_dict(json.loads((path / "tokenizer.json").read_text()))
        except Exception as e:  # JSON, then the tokenizers library's own parse (a plain Exception)
            raise ValueError(f"{path / 'tokenizer.json'}: not a tokenizer jaxgen wrote ({first_line(e)})") from None
    return cfg, params, tokenizer


@contextlib.contextmanager
def _unreadable(path):
    """Orbax's and TensorStore's errors on a damaged checkpoint (a truncated chunk, garbage metadata: any
    exception type, pages of TensorStore spec) as one line naming the directory."""
    try:
        yield
    except Exception as e:
        first = first_line(e.__cause__ or e)  # (TensorStore's own error, under Orbax's "Encountered error while reading")
        # The restore's other reads fail alike, in coroutines of Orbax's own event loop that are only
        # collected at exit, each then printing "Exception ignored in <coroutine ...>" and a page of
        # TensorStore spec after the one line: those repeats of the error reported here are dropped.
        if getattr(sys.unraisablehook, "func", None) is not _drop_read_errors:  # (once per process)
            sys.unraisablehook = functools.partial(_drop_read_errors, sys.unraisablehook)
        raise ValueError(f"{path}: cannot read the Orbax checkpoint's params ({first}); is it complete?") from None


def _drop_read_errors(hook, unraisable):
    if not str(unraisable.exc_value).startswith("Encountered error while reading array index"):
        hook(unraisable)


def _stored(params) -> dict:
    """The params as the checkpoint holds them: a dict of the weights, without a per-request LoRA
    table (`Params.lora`, which a checkpoint never holds: checkpoints from before it have no such key)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "lora"}


def _old_table_names(meta, cfg: ModelConfig) -> list:
    """Float embedding tables stored as [D, V] (jaxgen 0.2's layout); none in a current checkpoint (and
    none in one from before 0.2, whose [V, D] is the current layout again)."""
    meta = getattr(meta, "tree", meta)  # orbax's TreeMetadata holds a dict of ArrayMetadata
    out = []
    for n in ("embed", "unembed"):
        m = meta.get(n) if isinstance(meta, dict) else getattr(meta, n, None)
        shape = tuple(getattr(m, "shape", ()) or ())
        if shape == (cfg.d_model, cfg.vocab_size) and cfg.vocab_size != cfg.d_model:
            out.append(n)
    return out
