"""Hugging Face checkpoint directories: config.json -> ModelConfig, safetensors -> Params, tokenizer files.

A directory holds `config.json`, `model.safetensors` or shards `model-0000i-of-0000n.safetensors` named by
`model.safetensors.index.json`, and tokenizer files (jaxgen.tokenizer.from_hf_dir). Files are read with
`safetensors` (memory-mapped; `get_slice` reads only the rows a device needs), never unpickled:
`pytorch_model.bin` / `.pt` directories are refused.

config.json comes in two forms, both read: the published one (top-level `rope_theta` / `rope_scaling`,
`sliding_window_pattern`, no `layer_types`) and the one transformers 5 writes (`rope_parameters`,
per layer type for Gemma 3, `layer_types`). Keys a checkpoint leaves out take the defaults of its
transformers config class (`DEFAULTS`, from transformers 5.12: a published Gemma 3 multimodal config
lists only what differs). Anything jaxgen does not implement (a rope type, biases on o_proj, a
quantized checkpoint) is one error naming the key and its value.

Layouts (HF `nn.Linear` stores W [out, in]; jaxgen [in, out...], see jaxgen/model.py):
  q_proj [N*H, D] -> wq [D, N, H]      ("T": transpose, then split the out axis into heads)
  k_proj / v_proj [K*H, D] -> [D, K, H]  o_proj [D, N*H] -> wo [N, H, D]
  gate_proj / up_proj [F, D] -> [D, F]   down_proj [D, F] -> [F, D]   q/k/v biases [X*H] -> [X, H]
  embed_tokens / lm_head [V, D] -> embed / unembed [V, D] as they are ("as_is")
  mixture of experts (qwen3_moe: mlp.gate / mlp.experts.{j}.gate_proj ...; mixtral: block_sparse_moe.gate /
  experts.{j}.w1 w3 w2): router [E, D] -> [D, E]; expert j's [out, in] -> we_*[j] [in, out] ("T" per expert)
  Gemma norms store w - 1 and apply (1 + w): the +1 is folded in here (in float32; kept float32).
HF's RoPE rotates halves, as jaxgen does: no permutation (unlike llama GGUF files).
Writing a directory (the inverse) is jaxgen.checkpoint.hf_save.
"""
from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np

from jaxgen.config import ModelConfig
from jaxgen.errors import first_line
from jaxgen.model import LayerParams, Params, param_shapes

# transformers 5.12 config-class defaults of the keys read below (ModelConfig fields left to them).
_COMMON = dict(num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-6, attention_bias=False, mlp_bias=False,
               rope_theta=10000.0, hidden_act="silu")
DEFAULTS = {
    "llama": dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, tie_word_embeddings=False),
    "mistral": dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    tie_word_embeddings=False, sliding_window=4096),
    "qwen2": dict(_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "qwen3": dict(_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, head_dim=128, max_position_embeddings=32768, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "gemma2": dict(_COMMON, vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(_COMMON, vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                        sliding_window=4096, sliding_window_pattern=6, rope_theta=1_000_000.0,
                        rope_local_base_freq=10000.0, final_logit_softcapping=None, attn_logit_softcapping=None),
    # mixture of experts (transformers 5.25 defaults; Qwen3-MoE's expert count is read from num_experts
    # or num_local_experts, whichever the file has: see _experts)
    "qwen3_moe": dict(_COMMON, vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=None, max_position_embeddings=32768,
                      tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                      moe_intermediate_size=768, num_experts_per_tok=8, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "mixtral": dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    tie_word_embeddings=False, rope_theta=1e6, sliding_window=None, num_experts_per_tok=2,
                    num_local_experts=8),
}
MOE = ("qwen3_moe", "mixtral")
FAMILIES = tuple(DEFAULTS) + ("gemma3",)  # gemma3: the multimodal checkpoint; its text_config is gemma3_text
GEMMA = ("gemma2", "gemma3_text")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# Parts of a multimodal checkpoint that text generation does not use (kept out of "unexpected").
IGNORED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
# Prefixes of the language model's weights: plain, published Gemma 3 multimodal, transformers 5 multimodal.
TEXT_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
MAX_PARAMS = 2 * 10 ** 12  # a config.json claiming more is refused before anything is read


def is_hf_dir(path) -> bool:
    return (pathlib.Path(path) / "config.json").is_file()


def _fail(path, msg):
    raise ValueError(f"{path}: {msg}")


def read_config_json(path) -> dict:
    path = pathlib.Path(path)
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(path / "config.json", f"not readable JSON ({e})")
    if not isinstance(raw, dict):
        _fail(path / "config.json", "not a JSON object")
    return raw


def text_config(raw: dict, where="config.json") -> tuple[str, dict]:
    """(family, keys with the family's defaults filled in) of a config.json."""
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{where}: model_type {family!r} is not supported; jaxgen loads {list(FAMILIES)}")
    if "quantization_config" in raw:
        q = raw["quantization_config"]
        raise ValueError(f"{where}: quantization_config quant_method "
                         f"{q.get('quant_method') if isinstance(q, dict) else q!r}: quantized checkpoints are not "
                         f"supported (load the float checkpoint; jaxgen quantizes with quant='int8' / 'int4')")
    if family == "gemma3":
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{where}: a gemma3 checkpoint needs a text_config object")
        family, raw = "gemma3_text", {**text, "model_type": "gemma3_text"}
    return family, {**DEFAULTS[family], **{k: v for k, v in raw.items() if v is not None or k in (
        "sliding_window", "final_logit_softcapping", "attn_logit_softcapping")}}


def _num(d: dict, key: str, where, default=None, positive=True) -> float:
    """A finite number (> 0, or >= 0) from a config dict, or one line naming the key and value."""
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{where}: {key} {v!r} must be a {'positive' if positive else 'non-negative'} number")
    return float(v)


def _int(d: dict, key: str, where, default=None, minimum: int = 1) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{where}: {key} {v!r} must be an integer >= {minimum}")
    return v


def _bool(d: dict, key: str, where, default=False) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{where}: {key} {v!r} must be true or false")
    return v


def _rope(c: dict, kind: str, where: str) -> dict:
    """A layer kind's RoPE as {"theta", "type", "factor", ...}: from rope_parameters (transformers 5,
    maybe keyed by layer type) or rope_theta / rope_scaling (published)."""
    for key in ("rope_parameters", "rope_scaling"):
        if c.get(key) is not None and not isinstance(c[key], dict):
            raise ValueError(f"{where}: {key} {c[key]!r} must be an object")
    params = c.get("rope_parameters")
    if isinstance(params, dict) and kind in params and isinstance(params[kind], dict):
        params = params[kind]
    if isinstance(params, dict) and ("rope_type" in params or "rope_theta" in params):
        key, p = "rope_parameters", dict(params)
    else:
        key, p = "rope_scaling", dict(c.get("rope_scaling") or {})
        local = kind == "sliding_attention" and "rope_local_base_freq" in c
        theta = c.get("rope_local_base_freq") if local else c.get("rope_theta")
        p.setdefault("rope_theta", theta)
        if local:
            p = {"rope_theta": theta}  # published Gemma 3: rope_scaling applies to global layers only
    where = f"{where}: {key}"
    rtype = p.get("rope_type", p.get("type", "default"))
    out = {"theta": _num(p, "rope_theta", where), "type": "default", "factor": 1.0}
    if rtype == "linear":
        out["factor"] = _num(p, "factor", where)
    elif rtype == "llama3":
        out.update(type="llama3", factor=_num(p, "factor", where), low=_num(p, "low_freq_factor", where),
                   high=_num(p, "high_freq_factor", where), original=_int(p, "original_max_position_embeddings", where))
        if out["high"] <= out["low"]:
            raise ValueError(f"{where}: high_freq_factor must be greater than low_freq_factor")
    elif rtype != "default":
        raise ValueError(f"{where} rope_type {rtype!r} is not supported (jaxgen implements default, "
                         f"linear and llama3 RoPE)")
    return out


def _layer_pattern(family: str, c: dict, n_layers: int, where: str) -> tuple[str, int]:
    """(layer_pattern, sliding_window): from layer_types, else the family's published rule."""
    window = c.get("sliding_window")
    types = c.get("layer_types")
    if types is not None:
        letters = {"sliding_attention": "L", "full_attention": "G"}
        if not isinstance(types, list):
            raise ValueError(f"{where}: layer_types {types!r} must be a list")
        bad = [t for t in types if not isinstance(t, str) or t not in letters]
        if bad or len(types) != n_layers:
            raise ValueError(f"{where}: layer_types {bad[0] if bad else types!r} is not supported "
                             f"(expected {n_layers} of {sorted(letters)})")
        pattern = "".join(letters[t] for t in types)
        if family in ("qwen2", "qwen3", "qwen3_moe") and not _bool(c, "use_sliding_window", where):
            pattern = "G" * n_layers  # Qwen: no window unless use_sliding_window, whatever the rest says
    elif family == "gemma2":  # even layers slide, odd layers are global
        pattern = "".join("L" if i % 2 == 0 else "G" for i in range(n_layers))
    elif family == "gemma3_text":
        p = _int(c, "sliding_window_pattern", where)
        pattern = "".join("G" if (i + 1) % p == 0 else "L" for i in range(n_layers))
    elif family in ("mistral", "mixtral"):
        pattern = "L" * n_layers if window else "G" * n_layers
    elif family in ("qwen2", "qwen3", "qwen3_moe") and _bool(c, "use_sliding_window", where) and window:
        first = _int(c, "max_window_layers", where, minimum=0)
        pattern = "".join("L" if i >= first else "G" for i in range(n_layers))
    else:
        pattern = "G" * n_layers
    if "L" in pattern and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{where}: sliding_window {window!r} must be a positive integer for sliding layers")
    return ("" if "L" not in pattern else pattern), (window if "L" in pattern else 0)


def config_from_hf(raw: dict, name: str = "hf", where: str = "config.json") -> ModelConfig:
    """A ModelConfig from config.json's keys (either form). One small mapping for every family; what
    differs by family is named where it happens. Every value read is type-checked: a bad one is one
    ValueError line naming the key (fuzzed in tests/test_fuzz.py)."""
    try:
        return _config_from_hf(raw, name, where)
    except ValueError:
        raise
    except Exception as e:  # a safety net: a value of a shape no check above anticipated
        raise ValueError(f"{where}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def _config_from_hf(raw: dict, name: str, where: str) -> ModelConfig:
    family, c = text_config(raw, where)
    gemma = family in GEMMA
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key) and family != "qwen2":  # Llama / Qwen3 attention_bias also biases o_proj
            raise ValueError(f"{where}: {key} true is not supported for {family}")
    if c.get("use_bidirectional_attention"):
        raise ValueError(f"{where}: use_bidirectional_attention true (an embedding model) is not supported")
    act_key = "hidden_activation" if gemma else "hidden_act"
    if not isinstance(c.get(act_key), str) or c[act_key] not in ACTIVATIONS:
        raise ValueError(f"{where}: {act_key} {c.get(act_key)!r} is not supported (jaxgen: {sorted(ACTIVATIONS)})")
    ints = {}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        v = c.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {key} {v!r} must be a positive integer")
        ints[key] = v
    heads = ints["num_attention_heads"]
    kv = _int(c, "num_key_value_heads", where) if c.get("num_key_value_heads") is not None else heads
    head_dim = _int(c, "head_dim", where) if c.get("head_dim") is not None else ints["hidden_size"] // heads
    D, L, F, V = ints["hidden_size"], ints["num_hidden_layers"], ints["intermediate_size"], ints["vocab_size"]
    if head_dim < 1 or head_dim % 2 or heads % kv:
        raise ValueError(f"{where}: head_dim {head_dim} must be even and num_attention_heads {heads} a multiple "
                         f"of num_key_value_heads {kv}")
    E, k, Fe, norm_topk = _experts(family, c, where)
    n_params = V * D * 2 + L * (D * (heads + 2 * kv) * head_dim + heads * head_dim * D + 3 * D * (E * Fe or F))
    if n_params > MAX_PARAMS:
        raise ValueError(f"{where}: the shapes describe {n_params:.3g} parameters (more than {MAX_PARAMS:.0e}): "
                         f"a corrupt config.json?")
    pattern, window = _layer_pattern(family, c, L, where)
    g = _rope(c, "full_attention", where)
    local = _rope(c, "sliding_attention", where) if "L" in pattern else {**g, "type": "default", "factor": 1.0}
    if local["type"] != "default" or local["factor"] != 1.0:
        raise ValueError(f"{where}: scaled RoPE on sliding-window layers is not supported")
    cap = lambda key: 0.0 if c.get(key) is None else _num(c, key, where, positive=False)  # null: no softcap
    return ModelConfig(
        name=name, vocab_size=V, d_model=D, n_layers=L, n_heads=heads, n_kv_heads=kv, head_dim=head_dim, d_ff=F,
        max_seq_len=ints["max_position_embeddings"], norm_eps=_num(c, "rms_norm_eps", where),
        activation=ACTIVATIONS[c[act_key]],
        rope_theta=g["theta"], rope_local_theta=local["theta"], rope_type=g["type"], rope_scaling=g["factor"],
        rope_low_freq_factor=g.get("low", 1.0), rope_high_freq_factor=g.get("high", 4.0),
        rope_original_max_len=g.get("original", 8192), sliding_window=window, layer_pattern=pattern,
        query_pre_attn_scalar=_num(c, "query_pre_attn_scalar", where) if gemma else 0.0,
        qk_norm=family in ("qwen3", "qwen3_moe", "gemma3_text"), sandwich_norm=gemma, qkv_bias=family == "qwen2",
        tie_embeddings=_bool(c, "tie_word_embeddings", where), embed_scale=gemma,
        final_logit_softcap=cap("final_logit_softcapping"), attn_logit_softcap=cap("attn_logit_softcapping"),
        n_experts=E, n_experts_per_tok=k, d_ff_expert=Fe, norm_topk_prob=norm_topk)


def _experts(family: str, c: dict, where) -> tuple[int, int, int, bool]:
    """(n_experts, n_experts_per_tok, d_ff_expert, norm_topk_prob) of a mixture-of-experts family, else
    zeros. Qwen3-MoE publishes num_experts (and moe_intermediate_size); transformers 5 writes
    num_local_experts; Mixtral's experts are intermediate_size wide and its router always renormalizes."""
    if family not in MOE:
        return 0, 0, 0, False
    key = "num_experts" if c.get("num_experts") is not None else "num_local_experts"
    E = _int(c, key, where, default=128 if family == "qwen3_moe" else None)
    k = _int(c, "num_experts_per_tok", where)
    if k > E:
        raise ValueError(f"{where}: num_experts_per_tok {k} must be at most {key} {E}")
    if family == "mixtral":
        return E, k, _int(c, "intermediate_size", where), True
    if _int(c, "decoder_sparse_step", where) != 1 or c.get("mlp_only_layers"):
        raise ValueError(f"{where}: dense MLP layers among the sparse ones (decoder_sparse_step "
                         f"{c.get('decoder_sparse_step')}, mlp_only_layers {c.get('mlp_only_layers')}) are not supported")
    if c.get("shared_expert_intermediate_size"):
        raise ValueError(f"{where}: shared experts (shared_expert_intermediate_size) are not supported")
    return E, k, _int(c, "moe_intermediate_size", where), _bool(c, "norm_topk_prob", where)


# ---- weights --------------------------------------------------------------------------------------
_LAYER_NAMES = {  # HF name under layers.{i}. -> (LayerParams field, how)
    "self_attn.q_proj.weight": ("wq", "heads"), "self_attn.k_proj.weight": ("wk", "heads"),
    "self_attn.v_proj.weight": ("wv", "heads"), "self_attn.o_proj.weight": ("wo", "wo"),
    "self_attn.q_proj.bias": ("bq", "bias"), "self_attn.k_proj.bias": ("bk", "bias"),
    "self_attn.v_proj.bias": ("bv", "bias"),
    "self_attn.q_norm.weight": ("q_norm", "norm"), "self_attn.k_norm.weight": ("k_norm", "norm"),
    "mlp.gate_proj.weight": ("w_gate", "T"), "mlp.up_proj.weight": ("w_up", "T"),
    "mlp.down_proj.weight": ("w_down", "T"),
    "input_layernorm.weight": ("attn_norm", "norm"),
}
_NORM_AFTER_ATTN = {  # post_attention_layernorm is the MLP's input norm in Llama-style models
    False: {"post_attention_layernorm.weight": ("ffn_norm", "norm")},
    True: {"post_attention_layernorm.weight": ("post_attn_norm", "norm"),
           "pre_feedforward_layernorm.weight": ("ffn_norm", "norm"),
           "post_feedforward_layernorm.weight": ("post_ffn_norm", "norm")},
}
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16"}


def norms_minus_one(cfg: ModelConfig) -> bool:
    """Whether the checkpoint stores norm weights as w - 1 (applied as 1 + w): Gemma 2 / 3, the only
    families config_from_hf gives sandwich norms."""
    return cfg.sandwich_norm


# Mixture-of-experts MLPs, as published: the router [E, D] and each expert's three [out, in] matrices.
_MOE_NAMES = {
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts.{j}.", {"we_gate": "gate_proj", "we_up": "up_proj",
                                                         "we_down": "down_proj"}),
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{j}.", {"we_gate": "w1", "we_up": "w3",
                                                                                 "we_down": "w2"}),
}


def expected_names(cfg: ModelConfig, family: str | None = None) -> dict[str, tuple[str, int | None, str]]:
    """HF tensor name (without prefix) -> (jaxgen field, layer or None, how) for this config. A
    mixture-of-experts family's expert matrices are read per expert: how "E<j>" (transposed into
    expert j of the layer's [E, ...] stack)."""
    shapes = param_shapes(cfg)
    names = {"embed_tokens.weight": ("embed", None, "as_is"), "norm.weight": ("final_norm", None, "norm")}
    per_layer = {**_LAYER_NAMES, **_NORM_AFTER_ATTN[cfg.sandwich_norm]}
    if cfg.n_experts:
        router, expert, mats = _MOE_NAMES[family or "qwen3_moe"]
        per_layer[router] = ("router", "T")
        for j in range(cfg.n_experts):
            for field, mat in mats.items():
                per_layer[expert.format(j=j) + mat + ".weight"] = (field, f"E{j}")
    for i in range(cfg.n_layers):
        for hf_name, (field, how) in per_layer.items():
            if getattr(shapes.layers, field) is not None:
                names[f"layers.{i}.{hf_name}"] = (field, i, how)
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ("unembed", None, "as_is")
    return names


def _hf_shape(shape: tuple, how: str) -> tuple:
    """The HF tensor shape holding a jaxgen leaf of `shape` (per layer)."""
    if how == "heads":  # [D, X, H] <- [X*H, D]
        return (shape[1] * shape[2], shape[0])
    if how == "wo":  # [N, H, D] <- [D, N*H]
        return (shape[2], shape[0] * shape[1])
    if how == "bias":  # [X, H] <- [X*H]
        return (shape[0] * shape[1],)
    if how == "T":
        return (shape[1], shape[0])
    return shape


def _read(sl, how: str, shape: tuple, index: tuple, dtype, plus_one: bool) -> np.ndarray:
    """The part `index` (a tuple of slices of the jaxgen leaf `shape`) of a jaxgen leaf, read from the
    HF tensor's slice object `sl` (only the rows and columns it covers) and laid out the jaxgen way."""
    idx = tuple(index) + (slice(None),) * (len(shape) - len(index))
    r = [range(*s.indices(n)) for s, n in zip(idx, shape)]
    span = lambda rg: slice(rg.start, rg.stop) if rg.step == 1 else None
    if how in ("heads", "wo", "bias"):
        head, last = (r[1], r[2]) if how == "heads" else (r[0], r[1])
        if len(last) != (shape[2] if how == "heads" else shape[1]):
            raise ValueError("a split of head_dim is not supported")  # jaxgen's rules never split it
        H = len(last)
        rows = slice(head.start * H, head.stop * H)  # heads are contiguous blocks of H rows
        if how == "heads":  # [X*H, D] rows, D columns -> [D', X', H]
            a = np.asarray(sl[rows, span(r[0])]).T.reshape(len(r[0]), len(head), H)
        elif how == "wo":  # [D, N*H]: D rows, N*H columns -> [N', H, D']
            a = np.asarray(sl[span(r[2]), rows]).T.reshape(len(head), H, len(r[2]))
        else:
            a = np.asarray(sl[rows]).reshape(len(head), H)
    elif how == "T":
        a = np.asarray(sl[span(r[1]), span(r[0])]).T
    elif how == "as_is":  # the [V, D] tables
        a = np.asarray(sl[span(r[0]), span(r[1])])
    else:  # norms: [X]
        a = np.asarray(sl[span(r[0])])
    if plus_one:  # Gemma's (1 + w), folded in float32
        return a.astype(np.float32) + np.float32(1.0)
    return a.astype(dtype, copy=False)  # a view when the dtype is already right: device_put copies once


class Files:
    """The checkpoint's safetensors files, opened (memory-mapped) once: name -> slice object."""

    def __init__(self, path: pathlib.Path):
        from safetensors import safe_open

        self.path = path
        bins = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise TypeError("weight_map must map tensor names to file names")
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                _fail(index, f"not a safetensors index ({type(e).__name__}: {e})")
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        elif bins:
            _fail(path, f"holds {bins[0]}, a pickled PyTorch checkpoint, which jaxgen never loads (unpickling runs "
                        f"code): convert it to safetensors (transformers: model.save_pretrained(dir, "
                        f"safe_serialization=True))")
        else:
            _fail(path, "no model.safetensors or model.safetensors.index.json")
        self.handles, self.where = {}, {}
        for name in files:
            f = path / name
            if pathlib.Path(name).name != name or not f.is_file():
                _fail(index, f"names shard {name!r}, which is not a file in the directory")
            try:
                h = safe_open(str(f), framework="numpy")
                keys = list(h.keys())
            except Exception as e:  # SafetensorError: bad header length, offsets past the end, bad JSON
                _fail(f, f"corrupt safetensors ({first_line(e)})")
            self.handles[name] = h
            for k in keys:
                if k in self.where:
                    _fail(f, f"tensor {k} is also in {self.where[k]}")
                self.where[k] = name
        if index.is_file():
            for k, shard in weight_map.items():
                if self.where.get(k) != shard:
                    _fail(index, f"says {k} is in {shard}, but it is not there")

    def slice(self, key: str):
        return self.handles[self.where[key]].get_slice(key)


def load_params(path, cfg: ModelConfig, dtype=None, mesh=None, device=None, family: str | None = None):
    """Params (one LayerParams per layer) from the directory's safetensors files: every expected tensor
    present with its shape, nothing unexpected (vision parts of a multimodal checkpoint aside), before
    anything is read. dtype None keeps the checkpoint's float dtype (bf16 stays bf16). Gemma's folded
    norms stay float32. mesh: each leaf is made by `jax.make_array_from_callback` on its sharding
    (jaxgen.sharding rules), every device's part read straight from the file: no host holds the model.
    device (no mesh): each leaf goes there as soon as it is read (the host holds one tensor at a time);
    None: host numpy leaves. family: config.json's model_type (the expert tensors' names of a
    mixture-of-experts family). Returns (params, the checkpoint's dtype)."""
    import jax.numpy as jnp

    path = pathlib.Path(path)
    files = Files(path)
    prefixes = [p for p in TEXT_PREFIXES if any(k.startswith(p) for k in files.where)]
    prefix = max(prefixes, key=len) if prefixes else ""
    present = {}
    for k in files.where:
        if k.startswith(IGNORED_PREFIXES):
            continue
        short = k[len(prefix):] if prefix and k.startswith(prefix) else k
        present["lm_head.weight" if k == "language_model.lm_head.weight" else short] = k
    want = expected_names(cfg, family)
    if cfg.tie_embeddings:
        present.pop("lm_head.weight", None)  # a tied head saved anyway: the same values as the embedding
    missing = sorted(set(want) - set(present), key=_natural)
    extra = sorted(set(present) - set(want), key=_natural)
    if missing or extra:
        what = f"missing tensor {prefix}{missing[0]}" if missing else f"unexpected tensor {present[extra[0]]}"
        more = len(missing) + len(extra) - 1
        _fail(path, what + (f" (and {more} more names that do not match config.json)" if more else ""))
    shapes = param_shapes(cfg)
    dtypes = set()
    specs = {}
    for short, (field, layer, how) in want.items():
        key = present[short]
        sl = files.slice(key)
        leaf = getattr(shapes.layers if layer is not None else shapes, field)
        shape = leaf.shape[1:] if layer is not None else leaf.shape
        expert = int(how[1:]) if how.startswith("E") else None  # one expert's matrix of a [E, ...] stack
        if tuple(sl.get_shape()) != _hf_shape(shape[1:] if expert is not None else shape, "T" if expert is not None else how):
            _fail(path / files.where[key], f"tensor {key} has shape {list(sl.get_shape())}, config.json says "
                                           f"{list(_hf_shape(shape[1:] if expert is not None else shape, 'T' if expert is not None else how))}")
        if sl.get_dtype() not in FLOAT_DTYPES:
            _fail(path / files.where[key], f"tensor {key} has dtype {sl.get_dtype()}: quantized or integer "
                                           f"checkpoints are not supported")
        dtypes.add(sl.get_dtype())
        if expert is not None:  # the experts' keys in order: read into one [E, ...] leaf
            keys = specs.setdefault((field, layer), ([None] * cfg.n_experts, "experts", shape))[0]
            keys[expert] = key
        else:
            specs[(field, layer)] = (key, how, shape)
    ckpt_dtype = jnp.dtype(FLOAT_DTYPES[max(dtypes, key=["F16", "BF16", "F32"].index)])
    target = jnp.dtype(dtype) if dtype is not None else ckpt_dtype
    gemma = norms_minus_one(cfg)

    shardings = None
    if mesh is not None:
        from jaxgen.sharding import param_shardings

        stacked = param_shapes(cfg, target)
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked.layers)
        shardings = param_shardings(cfg, mesh, params=stacked.replace(layers=(one,) * cfg.n_layers))

    def leaf(field, layer):
        key, how, shape = specs[(field, layer)]
        plus_one = gemma and how == "norm"
        dt = np.float32 if plus_one else target
        def read(index):
            if how != "experts":
                return _read(files.slice(key), how, shape, index, dt, plus_one)
            # [E, ...]: each expert's matrix from its own tensor (T)
            idx = tuple(index) + (slice(None),) * (len(shape) - len(index))
            return np.stack([_read(files.slice(key[j]), "T", shape[1:], idx[1:], dt, False)
                             for j in range(*idx[0].indices(shape[0]))])
        if shardings is None:
            host = read(())
            return host if device is None else jax.device_put(host, device)
        sharding = getattr(shardings.layers[layer] if layer is not None else shardings, field)
        return jax.make_array_from_callback(shape, sharding, read)

    fields = LayerParams.__dataclass_fields__
    layers = tuple(LayerParams(**{f: (leaf(f, i) if (f, i) in specs else None) for f in fields})
                   for i in range(cfg.n_layers))
    params = Params(embed=leaf("embed", None), layers=layers, final_norm=leaf("final_norm", None),
                    unembed=leaf("unembed", None) if not cfg.tie_embeddings else None)
    return params, ckpt_dtype


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in name.replace(".", " . ").split()]


def load(path, dtype=None, mesh=None, name: str | None = None, need_tokenizer: bool = False, device=None):
    """(cfg, params, tokenizer or None, checkpoint dtype) of an HF checkpoint directory."""
    from jaxgen.tokenizer import from_hf_dir

    path = pathlib.Path(path)
    raw = read_config_json(path)
    cfg = config_from_hf(raw, name or path.name, str(path / "config.json"))
    tok = from_hf_dir(path, raw)  # before the weights: a bad tokenizer file fails fast
    if tok is None and need_tokenizer:
        _fail(path, "no tokenizer files (tokenizer.json or tokenizer.model): text prompts need one (token-id "
                    "prompts work through the Python API)")
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        _fail(path, f"the tokenizer has {tok.vocab_size} tokens, more than vocab_size {cfg.vocab_size}")
    if tok is not None and (bad := [i for i in tok.stop_ids if not 0 <= i < cfg.vocab_size]):
        # (else every request failed later on "stop_ids", a knob the user never passed)
        _fail(path, f"end-of-sequence id(s) {bad} (eos_token_id of generation_config.json / config.json) are "
                    f"outside the vocabulary of {cfg.vocab_size}")
    params, ckpt_dtype = load_params(path, cfg, dtype, mesh, device, family=text_config(raw)[0])
    return cfg, params, tok, ckpt_dtype
