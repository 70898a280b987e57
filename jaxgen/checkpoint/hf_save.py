"""Writing a Model as a Hugging Face checkpoint directory: the inverse of jaxgen.checkpoint.hf.

`save(model, DIR)` writes config.json (the form transformers 5 writes, for the family whose config
describes the model exactly: `family_of`), the params as safetensors in HF's names and layouts (every
transpose the reader names, undone here; Gemma's norms as w - 1), and the tokenizer files. `hf.load`
reads it back to the same config and params (tests/test_hf.py); transformers loads it too.
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from jaxgen.checkpoint.hf import GEMMA, expected_names, norms_minus_one
from jaxgen.config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def family_of(cfg: ModelConfig) -> str:
    """The HF family whose config.json describes `cfg` exactly, or a ValueError naming what none has."""
    if cfg.sandwich_norm and cfg.embed_scale and cfg.activation == "gelu_tanh" and not cfg.qkv_bias:
        return "gemma3_text" if cfg.qk_norm else "gemma2"
    if cfg.activation != "silu" or cfg.sandwich_norm or cfg.embed_scale or cfg.attn_logit_softcap \
            or cfg.final_logit_softcap or cfg.query_pre_attn_scalar:
        raise ValueError(f"config {cfg.name!r} matches no HF family jaxgen writes")
    pattern = cfg.layer_pattern
    if cfg.qkv_bias or cfg.qk_norm:
        family = "qwen2" if cfg.qkv_bias and not cfg.qk_norm else "qwen3" if cfg.qk_norm and not cfg.qkv_bias else None
        if family and (not pattern or pattern == "G" * pattern.index("L") + "L" * (len(pattern) - pattern.index("L"))):
            return family
    elif not pattern:
        return "llama"
    elif set(pattern) == {"L"}:
        return "mistral"
    raise ValueError(f"config {cfg.name!r} matches no HF family jaxgen writes (layer_pattern {pattern!r})")


def hf_config(cfg: ModelConfig, tok=None) -> dict:
    """config.json (the form transformers 5 writes) for `cfg`; `config_from_hf` maps it back to cfg."""
    family = family_of(cfg)
    gemma = family in GEMMA
    rope = lambda theta, rtype, factor: {"rope_type": "linear", "factor": factor, "rope_theta": theta} \
        if rtype == "default" and factor != 1.0 else {"rope_type": "default", "rope_theta": theta}
    g = rope(cfg.rope_theta, cfg.rope_type, cfg.rope_scaling)
    if cfg.rope_type == "llama3":
        g = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling,
             "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
             "original_max_position_embeddings": cfg.rope_original_max_len}
    pattern = cfg.layer_pattern or "G" * cfg.n_layers
    d = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
         "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
         "tie_word_embeddings": cfg.tie_embeddings,
         ("hidden_activation" if gemma else "hidden_act"): "gelu_pytorch_tanh" if gemma else "silu",
         "layer_types": ["sliding_attention" if k == "L" else "full_attention" for k in pattern],
         "sliding_window": cfg.sliding_window if "L" in pattern else None,
         "rope_parameters": ({"full_attention": g, "sliding_attention": rope(cfg.rope_local_theta, "default", 1.0)}
                             if family == "gemma3_text" else g)}
    if family in ("llama", "mistral"):  # as transformers writes them: the window says it all
        del d["layer_types"]
        if family == "llama":
            del d["sliding_window"]
    if family in ("qwen2", "qwen3"):
        d.update(use_sliding_window="L" in pattern,
                 max_window_layers=pattern.find("L") if "L" in pattern else cfg.n_layers)
    if gemma:
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim  # transformers' config class wants an int
        d.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                 final_logit_softcapping=cfg.final_logit_softcap or None,
                 attn_logit_softcapping=cfg.attn_logit_softcap or None)
        if family == "gemma2" and "L" in pattern and pattern != "".join("LG"[i % 2] for i in range(cfg.n_layers)):
            raise ValueError(f"config {cfg.name!r}: Gemma 2 alternates sliding and global layers")
    if tok is not None:
        d.update(bos_token_id=tok.bos_id, eos_token_id=list(tok.stop_ids), pad_token_id=tok.pad_id)
    return d


def _hf_tensor(leaf: np.ndarray, how: str, plus_one: bool) -> np.ndarray:
    """A jaxgen leaf (per layer) in HF's layout: the inverse of `_read`."""
    a = np.asarray(leaf)
    if plus_one:  # Gemma stores w - 1
        a = (a.astype(np.float32) - np.float32(1.0))
    if how == "heads":  # [D, X, H] -> [X*H, D]
        a = a.reshape(a.shape[0], -1).T
    elif how == "wo":  # [N, H, D] -> [D, N*H]
        a = a.reshape(-1, a.shape[-1]).T
    elif how == "bias":
        a = a.reshape(-1)
    elif how == "T":
        a = a.T
    return np.ascontiguousarray(a)


def save(model, path, max_shard_bytes: int | None = None) -> pathlib.Path:
    """Write a Model as an HF checkpoint directory (config.json, safetensors, tokenizer files), which
    `load` (and transformers) read back: params in their dtype (Gemma's norms as w - 1), the tokenizer
    as tokenizer.json (BPE) or tokenizer.model (SentencePiece) with tokenizer_config.json (special tokens,
    add_bos_token, the chat template) and generation_config.json (every stop id). max_shard_bytes: split
    the tensors over model-0000i-of-0000n.safetensors files with an index."""
    from safetensors.numpy import save_file

    from jaxgen import quant
    from jaxgen.model import unstack_layers

    path = pathlib.Path(path)
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} exists and is not empty")
    if quant.is_quantized(model.params):
        raise ValueError("quantized params cannot be written as an HF checkpoint (export the float model)")
    if model.cfg.n_experts:
        raise ValueError("writing a mixture-of-experts model as an HF checkpoint is not supported yet")
    cfg, tok = model.cfg, model.tokenizer
    config = hf_config(cfg, tok)
    params = jax.device_get(unstack_layers(model.params))
    gemma = norms_minus_one(cfg)
    dtype = np.asarray(params.embed).dtype
    tensors = {}
    for name, (field, layer, how) in expected_names(cfg).items():
        leaf = getattr(params.layers[layer] if layer is not None else params, field)
        hf_name = name if name == "lm_head.weight" else "model." + name
        tensors[hf_name] = _hf_tensor(leaf, how, gemma and how == "norm").astype(dtype)
    path.mkdir(parents=True, exist_ok=True)
    config["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[str(dtype)]
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards, size = [{}], 0
    for k, v in tensors.items():
        if max_shard_bytes and size and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for n, shard in zip(names, shards):
            save_file(shard, str(path / n), metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tok is not None:
        _save_tokenizer(tok, path)
    return path


def _save_tokenizer(tok, path: pathlib.Path):
    import base64

    spec = tok.to_dict()
    if spec["kind"] == "bpe":
        (path / "tokenizer.json").write_text(spec["tokenizer_json"], encoding="utf-8")
    else:
        (path / "tokenizer.model").write_bytes(base64.b64decode(spec["proto"]))
    special = dict(tok.special_tokens)
    tcfg = {**special, "add_bos_token": bool(tok.add_bos), "add_eos_token": False}
    if spec["kind"] != "bpe":  # (tokenizer.json carries its added tokens; tokenizer.model cannot say which are special)
        tcfg["added_tokens_decoder"] = {str(i): {"content": tok.sp.id_to_piece(i), "lstrip": False, "normalized": False,
                                                 "rstrip": False, "single_word": False, "special": True}
                                        for i in sorted(tok.special_ids)}
    if tok.chat_template:
        (path / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
