"""LoRA adapters at sampling time: PEFT adapter directories in, one or many adapters per batch, unmerged
inside the compiled loop (or merged into the weights).

A LoRA adapter adds a low-rank update to some of a layer's projections: y = x @ W + s * (x @ A) @ B,
with A [I, r], B [r, O] and s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). Here s is folded into B
when the adapter is read, so an adapter is just the (A, B) pairs of its target modules.

- `load_lora(DIR)` reads a PEFT directory (adapter_config.json + adapter_model.safetensors) into an
  `Adapter`; `from_qwix` converts a Tunix / qwix LoRA param tree to the same pytree.
- `table(adapters, cfg)` stacks adapters into a `LoraTable` (slot 0: no adapter), which rides in
  `Params.lora`; each KV-cache row names its slot (`KVCache.adapter` [B]), and `delta` gathers the
  row's A and B (the S-LoRA / Punica idea: one batch, many adapters). The table's shapes are buckets
  (adapter slots, rank), and its values are traced arrays: a new adapter, or new values of one, of the
  same buckets and target modules never recompiles.
- Why the slot lives in the cache: a row's keys and values were computed with its adapter, so they
  are valid only for it; every path that copies, reorders or refills cache rows (n samples, beam
  search, continuous batching, multi-turn) carries the slot with them.
- `attach(model, lora, P)`: what the front ends call: the table of a request's adapters on the model's
  params and each prompt's slot.
- `merge_lora(params, adapter)`: W + s * A @ B in the weights (float params), for the merged path.

Axis legend as in jaxgen/model.py; here also M (adapter slots of a table) and R (rank).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.config import ModelConfig
from jaxgen.errors import first_line

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections an adapter may target
HF_MODULES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
              "down_proj": "down"}
RANK_BUCKETS = (8, 16, 32, 64, 128, 256, 512)  # a table's rank R: adapters of ranks 9..16 share a program
SLOT_BUCKETS = (2, 4, 8, 16, 32, 64, 128)  # a table's slots M (slot 0: no adapter)


@struct.dataclass
class LoraWeights:
    """One target projection's low-rank pair, layers stacked (scale folded into b)."""
    a: jax.Array  # [L, I, R] (an Adapter) or [L, M, I, R] (a LoraTable)
    b: jax.Array  # [L, R, O] or [L, M, R, O]


@struct.dataclass
class Adapter:
    """One LoRA adapter: a LoraWeights per target projection (None: not targeted)."""
    q: LoraWeights | None = None  # I = D, O = N * H
    k: LoraWeights | None = None  # I = D, O = K * H
    v: LoraWeights | None = None  # I = D, O = K * H
    o: LoraWeights | None = None  # I = N * H, O = D
    gate: LoraWeights | None = None  # I = D, O = F
    up: LoraWeights | None = None  # I = D, O = F
    down: LoraWeights | None = None  # I = F, O = D
    rank: int = struct.field(pytree_node=False, default=0)
    scale: float = struct.field(pytree_node=False, default=1.0)  # alpha / r (or / sqrt(r)), folded into b
    name: str = struct.field(pytree_node=False, default="")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in TARGETS if getattr(self, t) is not None)


@struct.dataclass
class LoraTable:
    """Adapters stacked for a batch (`table`): slot 0 is zeros (rows without an adapter)."""
    q: LoraWeights | None = None  # a [L, M, D, R], b [L, M, R, N * H]
    k: LoraWeights | None = None
    v: LoraWeights | None = None
    o: LoraWeights | None = None
    gate: LoraWeights | None = None
    up: LoraWeights | None = None
    down: LoraWeights | None = None


def dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target projection."""
    D, F, NH, KH = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q": (D, NH), "k": (D, KH), "v": (D, KH), "o": (NH, D), "gate": (D, F), "up": (D, F), "down": (F, D)}


# ---- reading PEFT directories ---------------------------------------------------------------------
MAX_LAYERS = 1024  # deeper than any decoder jaxgen loads: a layer index past it is a corrupt file
# adapter_config.json keys that do not change what the saved weights compute (initialization, training
# and bookkeeping), or that the tensors in the file already spell out (which modules and layers).
_BENIGN = {"peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping",
           "lora_dropout", "peft_version", "megatron_core", "qalora_group_size", "r", "lora_alpha",
           "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "use_rslora",
           "init_lora_weights", "eva_config", "loftq_config"}
# init_lora_weights values that leave the base weights as they are (pissa, olora, corda, loftq and
# lora_ga rewrite the base weights: the adapter is then valid only with those)
_INITS = (True, False, "gaussian", "eva", "orthogonal")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\."
                  r"(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_SKIPPED = re.compile(r"(vision_tower|vision_model|multi_modal_projector|audio_tower)\.")  # never run by jaxgen


def _fail(path, msg):
    raise ValueError(f"{path}: {msg}")


def load_lora(path, model=None, name: str | None = None) -> Adapter:
    """A PEFT LoRA adapter directory as an Adapter (float32 numpy leaves; `attach` / `merge_lora` cast
    them to the model's dtype). With `model` (a jaxgen Model or ModelConfig) its shapes are checked now,
    else when it is first used. Refused, one line each: other PEFT methods (DoRA, a LoRA bias, per-module
    rank / alpha patterns, modules_to_save, ...), embedding or lm_head adapters, and base-rewriting inits."""
    p = pathlib.Path(path)
    if not (p / "adapter_config.json").is_file():
        _fail(p, "not a PEFT adapter directory (no adapter_config.json)")
    try:
        c = json.loads((p / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        _fail(p / "adapter_config.json", f"not JSON ({e})")
    where = p / "adapter_config.json"
    if not isinstance(c, dict):
        _fail(where, f"must be a JSON object, got {type(c).__name__}")
    if c.get("peft_type", "LORA") != "LORA":
        _fail(where, f"peft_type {c.get('peft_type')!r} is not supported (only LORA)")
    if c.get("init_lora_weights", True) not in _INITS:
        _fail(where, f"init_lora_weights {c['init_lora_weights']!r} rewrites the base weights; merge or convert the "
                     "adapter first (peft's path_initial_model_for_weight_conversion)")
    for k, v in c.items():
        if k not in _BENIGN and v not in (None, False, {}, [], "", 0, "none"):  # (bias: "none")
            _fail(where, f"{k} = {json.dumps(v)[:80]} is not supported (plain LoRA on q/k/v/o/gate/up/down only)")
    r, alpha = c.get("r"), c.get("lora_alpha", c.get("r"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        _fail(where, f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        _fail(where, f"lora_alpha must be a finite number, got {alpha!r}")  # (NaN would make every output NaN)
    scale = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
    files = [p / "adapter_model.safetensors"]
    if not files[0].is_file():
        _fail(p, "no adapter_model.safetensors (adapter_model.bin is not read: pickles are never loaded)")
    from safetensors.numpy import load_file

    try:
        tensors = load_file(files[0])
    except Exception as e:  # SafetensorError: bad header length, offsets past the end, bad JSON
        _fail(files[0], f"corrupt safetensors ({first_line(e)})")
    pairs: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, arr in tensors.items():
        if _SKIPPED.search(key):
            continue
        m = _KEY.match(key)
        if not m or m.group(2) not in HF_MODULES:
            _fail(files[0], f"tensor {key} is not a LoRA pair of a decoder layer's q/k/v/o/gate/up/down projection")
        layer, mod, ab = int(m.group(1)), HF_MODULES[m.group(2)], m.group(3)
        depth = getattr(model, "cfg", model).n_layers if model is not None else MAX_LAYERS
        if layer >= depth:  # (checked before its [layers, in, r] arrays are allocated below)
            _fail(files[0], f"tensor {key}: layer {layer} is past " + (f"the model's {depth} layers" if model is not None
                                                                    else f"any model's depth ({depth} layers)"))
        if arr.ndim != 2 or arr.shape[0 if ab == "A" else 1] != r:
            _fail(files[0], f"{key} has shape {list(arr.shape)}, expected {'[r, in]' if ab == 'A' else '[out, r]'} "
                            f"with r = {r}")
        pairs.setdefault(mod, {}).setdefault(layer, {})[ab] = arr
    if not pairs:
        _fail(files[0], "no LoRA weights of a decoder layer")
    n_layers = 1 + max(layer for per in pairs.values() for layer in per)
    out = {}
    for mod, per in pairs.items():
        shapes = {(ab["A"].shape[1], ab["B"].shape[0]) for ab in per.values() if {"A", "B"} <= set(ab)}
        for layer, ab in per.items():
            if set(ab) != {"A", "B"}:
                _fail(files[0], f"layer {layer} {mod}_proj has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        if len(shapes) != 1:
            _fail(files[0], f"{mod}_proj's LoRA shapes differ between layers: {sorted(shapes)}")
        (I, O), = shapes
        # HF stores A [r, in] and B [out, r] (x @ A.T @ B.T): transpose both to jaxgen's x @ a @ b.
        # Layers the adapter leaves out (layers_to_transform) are zeros: no update.
        a = np.zeros((n_layers, I, r), np.float32)
        b = np.zeros((n_layers, r, O), np.float32)
        for layer, ab in per.items():
            a[layer] = ab["A"].astype(np.float32).T
            b[layer] = scale * ab["B"].astype(np.float32).T
        out[mod] = LoraWeights(a=a, b=b)
    adapter = Adapter(**out, rank=r, scale=float(scale), name=name or p.name)
    if model is not None:
        check(adapter, getattr(model, "cfg", model))
    return adapter


def check(adapter: Adapter, cfg: ModelConfig, where: str | None = None) -> None:
    """Raise one line if the adapter does not fit the model (layers, in / out features)."""
    where = where or f"adapter {adapter.name!r}"
    want = dims(cfg)
    if cfg.n_experts and (mlp := [t for t in ("gate", "up", "down") if t in adapter.targets]):
        raise ValueError(f"{where}: targets {'/'.join(mlp)}_proj, but {cfg.name}'s MLPs are experts (LoRA on "
                         "experts is not supported; attention projections are)")
    for t in adapter.targets:
        w = getattr(adapter, t)
        L, I, R = w.a.shape
        if L > cfg.n_layers:
            raise ValueError(f"{where}: has LoRA weights for layer {L - 1}, but {cfg.name} has {cfg.n_layers} layers")
        if (I, w.b.shape[2]) != want[t]:
            raise ValueError(f"{where}: {t}_proj LoRA maps {I} -> {w.b.shape[2]} features, but {cfg.name}'s {t}_proj "
                             f"maps {want[t][0]} -> {want[t][1]} (an adapter of another model?)")


# ---- a batch's table ------------------------------------------------------------------------------
def _bucket(n: int, buckets, what: str) -> int:
    from jaxgen.knobs import bucket

    return bucket(n, buckets, what)


def table(adapters: list[Adapter], cfg: ModelConfig, dtype=jnp.float32, rank: int | None = None,
          slots: int | None = None) -> LoraTable:
    """The adapters stacked into a LoraTable of `slots` slots (default: a SLOT_BUCKETS bucket of
    len + 1) at rank `rank` (default: a RANK_BUCKETS bucket of the largest rank), slot i + 1 holding
    adapters[i]. Ranks are padded with zeros (exact: a zero column of A meets a zero row of B); a
    target one adapter has and another has not is zeros in the other's slot. Host numpy, `dtype`."""
    for ad in adapters:
        check(ad, cfg)
    R = rank or _bucket(max(ad.rank for ad in adapters), RANK_BUCKETS, "LoRA rank")
    M = slots or _bucket(len(adapters) + 1, SLOT_BUCKETS, "adapters per batch")
    targets = [t for t in TARGETS if any(getattr(ad, t) is not None for ad in adapters)]
    L, want = cfg.n_layers, dims(cfg)
    out = {}
    for t in targets:
        I, O = want[t]
        a = np.zeros((L, M, I, R), np.float32)
        b = np.zeros((L, M, R, O), np.float32)
        for i, ad in enumerate(adapters):
            w = getattr(ad, t)
            if w is None:
                continue
            n, r = w.a.shape[0], w.a.shape[2]
            a[:n, i + 1, :, :r] = np.asarray(w.a, np.float32)
            b[:n, i + 1, :r, :] = np.asarray(w.b, np.float32)
        out[t] = LoraWeights(a=a.astype(dtype), b=b.astype(dtype))
    return LoraTable(**out)


def float_dtype(params):
    """The params' float dtype (the table's)."""
    e = params.embed
    return e.dtype if hasattr(e, "dtype") and jnp.issubdtype(e.dtype, jnp.floating) else jnp.float32


def slots(lora, P: int, universe: list | None = None) -> tuple[list[Adapter], np.ndarray | None]:
    """(the table's adapters, each prompt's slot [P] int32) for a request's `lora`: an Adapter for
    every prompt, or a list of P entries, each an Adapter or None. Distinct adapters (by identity) take
    slots 1, 2, ... in order of appearance, or their place in `universe` + 1 (a run that shares one
    table across calls: `jaxgen batch`). (adapters, None) when no prompt has one."""
    universe = list(universe or [])
    if lora is None:
        return universe, None
    per = list(lora) if isinstance(lora, (list, tuple)) else [lora] * P
    if len(per) != P:
        raise ValueError(f"lora has {len(per)} entries but there are {P} prompts (give one adapter, or one "
                         "adapter or None per prompt)")
    from jaxgen.knobs import problem

    for x in per:
        if isinstance(x, str):
            raise ValueError(f"lora {x!r} is a name (what a jaxgen batch row gives): here pass the adapter itself, "
                             "from jaxgen.load_lora")
        if x is not None and not isinstance(x, Adapter):
            raise ValueError(problem("lora", x))
    distinct = universe or []
    for x in per:
        if x is not None and not any(x is d for d in distinct):
            if universe:
                raise ValueError(f"adapter {x.name!r} is not one of this run's adapters")
            distinct.append(x)
    if all(x is None for x in per):  # (a run's shared table still needs every row's slot: 0)
        return distinct, np.zeros(P, np.int32) if universe else None
    rows = np.array([0 if x is None else 1 + next(i for i, d in enumerate(distinct) if d is x) for x in per], np.int32)
    return distinct, rows


def attach(model, lora, P: int, universe: list | None = None):
    """The model with a LoraTable of the request's adapters (`slots`) in its params, replicated on its
    mesh; the model itself when no prompt has one. The front ends call it before `generate.prepare`,
    which puts each prompt's slot (`slots`, the same rule) in the program's arguments."""
    adapters, rows = slots(lora, P, universe)
    if rows is None and not universe:
        return model
    t = jax.tree.map(jnp.asarray, table(adapters, model.cfg, float_dtype(model.params)))
    if model.mesh is not None:  # read by every row: replicated
        from jax.sharding import NamedSharding, PartitionSpec

        t = jax.device_put(t, NamedSharding(model.mesh, PartitionSpec()))
    return dataclasses.replace(model, params=model.params.replace(lora=t))


# ---- in the forward pass --------------------------------------------------------------------------
# A table of at most this many columns (slots x rank) is applied as two dense matmuls with the other
# slots' columns masked out; a larger one by a per-row gather of each row's pair. Measured on Gemma 3
# 270M f32, 8 prompts x n=8, 32 decode steps (2-core CPU): one rank-16 adapter (2 slots, 32 columns)
# dense +8% decode time over the base model, gathered +17%; eight (16 slots, 256 columns) dense +27%,
# gathered +21%.
DENSE_COLUMNS = 64


def delta(x: jax.Array, w: LoraWeights, rows: jax.Array) -> jax.Array:
    """Each row's low-rank update (x @ a[row]) @ b[row] [B, T, O] (f32) of x [B, T, I], one layer's
    table pair w (a [M, I, R], b [M, R, O]) and the rows' slots [B].

    Small tables (M * R <= DENSE_COLUMNS): x @ [every slot's A] as one [I, M * R] matmul, the columns
    of the other slots zeroed per row, then @ [every slot's B] [M * R, O]: plain dense matmuls, the
    fast path for one or a few adapters (see DENSE_COLUMNS). Large tables: each row's A and B gathered
    (B x (I + O) x R values) and applied as batched matmuls, where reading every slot would cost more.
    The masked columns contribute exact zeros, so both equal the row's adapter alone."""
    M, I, R = w.a.shape
    if M * R <= DENSE_COLUMNS:
        a = jnp.moveaxis(w.a, 0, 1).reshape(I, M * R)  # [I, M * R], slot-major columns
        t = jnp.einsum("bti,ic->btc", x, a.astype(x.dtype), preferred_element_type=jnp.float32)
        own = jnp.repeat(rows[:, None] == jnp.arange(M)[None, :], R, axis=1)  # [B, M * R]
        t = jnp.where(own[:, None, :], t, 0.0)
        return jnp.einsum("btc,co->bto", t, w.b.reshape(M * R, -1).astype(jnp.float32),
                          preferred_element_type=jnp.float32)
    a = jnp.take(w.a, rows, axis=0)  # [B, I, R]
    b = jnp.take(w.b, rows, axis=0)  # [B, R, O]
    t = jnp.einsum("bti,bir->btr", x, a.astype(x.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("btr,bro->bto", t, b.astype(jnp.float32), preferred_element_type=jnp.float32)


# ---- merged ---------------------------------------------------------------------------------------
_FIELDS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}


def merge_lora(params, adapter: Adapter, cfg: ModelConfig | None = None):
    """Params with the adapter merged into the weights: W + s * A @ B per targeted projection (in float32,
    stored in W's dtype), for stacked or per-layer params. Float params only (a quantized matrix has no
    room for an update: merge before quantizing)."""
    from jaxgen import quant
    from jaxgen.model import stack_layers, unstack_layers

    per_layer = isinstance(params.layers, tuple)
    stacked = stack_layers(params)
    layers = stacked.layers
    changes = {}
    for t in adapter.targets:
        w = getattr(layers, _FIELDS[t])
        if isinstance(w, quant.QMatrix):
            raise ValueError("merge_lora needs float params (a quantized matrix cannot take the update): merge, then "
                             "quantize; or pass the adapter unmerged (generate(..., lora=adapter))")
        lw = getattr(adapter, t)
        L = w.shape[0]
        if lw.a.shape[0] > L or (cfg is not None and lw.a.shape[0] > cfg.n_layers):
            raise ValueError(f"adapter {adapter.name!r} has more layers ({lw.a.shape[0]}) than the params ({L})")
        upd = jnp.einsum("lir,lro->lio", jnp.asarray(lw.a, jnp.float32), jnp.asarray(lw.b, jnp.float32))
        upd = jnp.pad(upd, ((0, L - upd.shape[0]), (0, 0), (0, 0)))
        w_in = w.shape[1] * w.shape[2] if t == "o" else w.shape[1]  # wo [L, N, H, D]; the others [L, I, ...out]
        if (w_in, int(np.prod(w.shape[1:])) // w_in) != upd.shape[1:]:
            raise ValueError(f"adapter {adapter.name!r}: {t}_proj LoRA is {upd.shape[1]} -> {upd.shape[2]}, the params' "
                             f"{_FIELDS[t]} is {list(w.shape[1:])}")
        changes[_FIELDS[t]] = (w.astype(jnp.float32) + upd.reshape(w.shape)).astype(w.dtype)
    out = stacked.replace(layers=layers.replace(**changes))
    return unstack_layers(out) if per_layer else out


# ---- other sources and writing --------------------------------------------------------------------
# Tunix / qwix module names -> targets. qwix's LoRA of a weight w keeps w's lhs-shared dims (contracting,
# in w's order) then the rank in `<w>_lora_a`, and the rank then w's remaining (output) dims in
# `<w>_lora_b`; `kv_einsum` (Gemma: w [2, K, D, H]) holds k and v on its first output dim.
_QWIX = {"q_proj": ("q",), "q_einsum": ("q",), "k_proj": ("k",), "v_proj": ("v",), "kv_einsum": ("k", "v"),
         "o_proj": ("o",), "attn_vec_einsum": ("o",), "gate_proj": ("gate",), "up_proj": ("up",),
         "down_proj": ("down",)}
_QWIX_KEY = re.compile(r"layers\.(\d+)\.(?:.*\.)?(\w+)\.(\w+)_lora_(a|b)$")


def from_qwix(tree, cfg: ModelConfig, alpha: float | None = None, rank: int | None = None,
              name: str = "qwix") -> Adapter:
    """A Tunix / qwix LoRA param tree (nested dicts or an nnx.State holding `<w>_lora_a` /
    `<w>_lora_b` per decoder-layer projection, as `qwix.apply_lora_to_model` creates them, or
    `nnx.state(model, nnx.LoRAParam)`) as an Adapter. qwix scales the update by alpha / rank, which
    live in its LoraProvider rule, not in the params: pass alpha (default: rank, a scale of 1)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        while parts and parts[-1] in ("value", "raw_value"):  # nnx Variable wrappers
            parts.pop()
        flat[".".join(parts)] = leaf
    pairs: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, leaf in flat.items():
        m = _QWIX_KEY.search(key)
        if not m or m.group(2) not in _QWIX:
            raise ValueError(f"qwix LoRA param {key}: not a decoder layer's q/k/v/o/gate/up/down projection "
                             f"({', '.join(sorted(_QWIX))})")
        pairs.setdefault(m.group(2), {}).setdefault(int(m.group(1)), {})[m.group(4)] = np.asarray(leaf, np.float32)
    if not pairs:
        raise ValueError("no qwix LoRA params (<weight>_lora_a / _lora_b under layers.<i>) in the tree")
    r = rank or next(iter(next(iter(pairs.values())).values()))["a"].shape[-1]
    scale = (alpha if alpha is not None else r) / r
    L, want = cfg.n_layers, dims(cfg)
    out: dict[str, LoraWeights] = {}
    for mod, per in pairs.items():
        targets = _QWIX[mod]
        for t_i, t in enumerate(targets):
            I, O = want[t]
            a = np.zeros((L, I, r), np.float32)
            b = np.zeros((L, r, O), np.float32)
            for layer, ab in per.items():
                if set(ab) != {"a", "b"} or layer >= L:
                    raise ValueError(f"qwix LoRA {mod} of layer {layer}: needs both lora_a and lora_b of a layer < {L}")
                la = ab["a"].reshape(-1, r)  # [prod(contracting), r]
                lb = ab["b"].reshape(r, len(targets), -1)[:, t_i]  # [r, prod(out)] (kv: k then v)
                if la.shape[0] != I or lb.shape[1] != O:
                    raise ValueError(f"qwix LoRA {mod} of layer {layer} maps {la.shape[0]} -> {lb.shape[1]} features, "
                                     f"{cfg.name}'s {t}_proj {I} -> {O}")
                a[layer], b[layer] = la, scale * lb
            out[t] = LoraWeights(a=a, b=b)
    return Adapter(**out, rank=r, scale=float(scale), name=name)


def random_adapter(cfg: ModelConfig, key, rank: int = 8, targets=TARGETS, scale: float = 1.0,
                   name: str = "random") -> Adapter:
    """An adapter of random A, B ~ N(0, 1 / fan_in) (tests and benchmarks: peft's B = 0 would be a no-op)."""
    want = dims(cfg)
    out = {}
    for t, k in zip(targets, jax.random.split(key, len(targets))):
        I, O = want[t]
        ka, kb = jax.random.split(k)
        a = np.asarray(jax.random.normal(ka, (cfg.n_layers, I, rank), jnp.float32)) / math.sqrt(I)
        b = np.asarray(jax.random.normal(kb, (cfg.n_layers, rank, O), jnp.float32)) * scale / math.sqrt(rank)
        out[t] = LoraWeights(a=a, b=b)
    return Adapter(**out, rank=rank, scale=1.0, name=name)


def save_lora(adapter: Adapter, path) -> pathlib.Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that
    `load_lora` (and peft, on the HF model of the same config) reads back as this adapter: the folded
    scale is written into B, with lora_alpha = r (a scale of 1)."""
    from safetensors.numpy import save_file

    p = pathlib.Path(path)
    p.mkdir(parents=True, exist_ok=True)
    inv = {v: k for k, v in HF_MODULES.items()}
    tensors = {}
    for t in adapter.targets:
        w = getattr(adapter, t)
        part = "self_attn" if t in ("q", "k", "v", "o") else "mlp"
        for i in range(np.shape(w.a)[0]):
            stem = f"base_model.model.model.layers.{i}.{part}.{inv[t]}"
            tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(np.asarray(w.a[i], np.float32).T)
            tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(np.asarray(w.b[i], np.float32).T)
    save_file(tensors, p / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": adapter.rank, "lora_alpha": adapter.rank, "use_rslora": False,
              "target_modules": sorted(inv[t] for t in adapter.targets), "bias": "none", "lora_dropout": 0.0,
              "task_type": "CAUSAL_LM"}
    (p / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return p
