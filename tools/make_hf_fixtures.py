"""Tiny random HF checkpoints of every family jaxgen loads, with HF transformers' greedy tokens and
log-probs, for tests/test_hf.py.

Run in a separate environment with torch (CPU) and transformers (none is a jaxgen dependency):

    python tools/make_hf_fixtures.py [--out tests/fixtures/hf]

For each family: a config (transformers `from_config`, float32), weights re-drawn so the model is not
near-uniform (matrices N(0, 1/fan_in), embeddings N(0, 1/D) x sqrt(D) for non-Gemma, norms 1 + N(0, 0.1),
Gemma's stored w - 1 as N(0, 0.1)), saved with `save_pretrained` (safetensors; Llama in two shards).
`config.json` is the form transformers 5 writes (rope_parameters, layer_types); `config.published.json`
is the same model in the form published checkpoints carry (top-level rope_theta / rope_scaling,
sliding_window_pattern, no layer_types), written here by hand from the same values.

reference.json: per prompt (random ids), HF's greedy continuation (eager attention, the reference
implementation: sdpa drops Gemma 2's attention softcap; a full forward each step, no cache),
the log-prob of each chosen token and the smallest top-1 / top-2 logit margin (the script refuses a
fixture whose margin is under 1e-3: a near tie is no test of greedy equality).
A tokenizer directory (tiny BPE trained here + a family chat template) with apply_chat_template outputs
is written by --chat into chat.json.
"""
import argparse
import json
import math
import pathlib

import torch
import transformers
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3Config, Gemma3TextConfig, LlamaConfig,
                          MistralConfig, Qwen2Config, Qwen3Config)

V, D, F, N, K, H = 128, 32, 64, 4, 2, 8
BASE = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_attention_heads=N, num_key_value_heads=K,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SHARDS = {"llama": "20KB"}  # saved in several shards: the index path


def configs():
    """name -> (config, published-form edits applied to the transformers-5 config.json dict)."""
    out = {}
    out["llama"] = LlamaConfig(**BASE, num_hidden_layers=2, head_dim=16, tie_word_embeddings=False,
                               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64})
    out["mistral"] = MistralConfig(**BASE, num_hidden_layers=2, head_dim=8, sliding_window=6,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    # Qwen2.5 ships use_sliding_window false with a sliding_window number: no window.
    out["qwen2"] = Qwen2Config(**BASE, num_hidden_layers=2, use_sliding_window=False, sliding_window=4,
                               max_window_layers=1, tie_word_embeddings=False)
    out["qwen3"] = Qwen3Config(**BASE, num_hidden_layers=2, head_dim=16, tie_word_embeddings=True)
    out["gemma2"] = Gemma2Config(**BASE, num_hidden_layers=4, head_dim=H, sliding_window=6, query_pre_attn_scalar=12,
                                 attn_logit_softcapping=4.0, final_logit_softcapping=6.0)
    text = dict(**BASE, num_hidden_layers=6, head_dim=H, sliding_window=6, query_pre_attn_scalar=8,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    out["gemma3_text"] = Gemma3TextConfig(**text)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    out["gemma3"] = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                 image_token_index=V - 1, boi_token_index=V - 3, eoi_token_index=V - 2)
    return out


def published(d: dict) -> dict:
    """The published form of a transformers-5 config.json dict (see the module docstring)."""
    d = json.loads(json.dumps(d))
    if "dtype" in d:
        d["torch_dtype"] = d.pop("dtype")
    if "text_config" in d:
        d["text_config"] = published(d["text_config"])
        return d
    rope = d.pop("rope_parameters", None) or {}
    types = d.pop("layer_types", None)
    if "full_attention" in rope:  # Gemma 3: per layer type
        d["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    d["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        d["rope_scaling"] = rope
    if d.get("model_type") == "gemma3_text":
        period = types.index("full_attention") + 1
        assert types == (["sliding_attention"] * (period - 1) + ["full_attention"]) * (len(types) // period)
        d["sliding_window_pattern"] = period
        d.pop("_sliding_window_pattern", None)
    if d.get("model_type") == "qwen2":
        d["sliding_window"] = 4  # as Qwen2.5 publishes it: a number, with use_sliding_window false
    return d


def reinit(model, gemma: bool):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name or "multi_modal" in name:
                continue
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                scale = 1.0 / math.sqrt(p.shape[1]) * (1.0 if gemma else math.sqrt(p.shape[1]))
                p.copy_(scale * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:  # biases
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def greedy(model, ids, steps):
    ids = list(ids)
    out, logps, margin = [], [], float("inf")
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            top = torch.topk(logits, 2).values
            margin = min(margin, float(top[0] - top[1]))
            logp = torch.log_softmax(logits, -1)
            t = int(torch.argmax(logits))
            out.append(t)
            logps.append(float(logp[t]))
            ids.append(t)
    return out, logps, margin


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/hf")
    args = ap.parse_args()
    root = pathlib.Path(args.out)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V - 4, (n,), generator=g).tolist() for n in (5, 11, 19)]
    for name, cfg in configs().items():
        cfg.dtype = torch.float32
        # eager attention: the reference implementation (sdpa drops Gemma 2's attention softcap)
        cls = transformers.Gemma3ForConditionalGeneration if name == "gemma3" else AutoModelForCausalLM
        model = cls.from_config(cfg, attn_implementation="eager") if cls is AutoModelForCausalLM else \
            cls._from_config(cfg, attn_implementation="eager")
        model = model.float().eval()
        reinit(model, gemma=name.startswith("gemma"))
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("*.safetensors*"):
            f.unlink()
        model.save_pretrained(d, max_shard_size=SHARDS.get(name, "50GB"))
        config = json.loads((d / "config.json").read_text())
        (d / "config.published.json").write_text(json.dumps(published(config), indent=2) + "\n")
        cases = []
        for p in prompts:
            toks, logps, margin = greedy(model, p, 10)
            assert margin > 1e-3, (name, p, margin)
            cases.append({"prompt_ids": p, "greedy_ids": toks, "logprobs": logps, "min_margin": margin})
        (d / "reference.json").write_text(json.dumps({
            "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, float32, eager "
                         f"attention, greedy with a full forward per step", "cases": cases}, indent=1) + "\n")
        print(name, "ok", min(c["min_margin"] for c in cases), sorted(p.name for p in d.iterdir()))


if __name__ == "__main__":
    main()
