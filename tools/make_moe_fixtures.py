"""Tiny random mixture-of-experts HF checkpoints (Qwen3-MoE, Mixtral) with HF transformers' greedy tokens
and log-probs, for tests/test_moe.py.

Run in a separate environment with torch (CPU) and transformers (none is a jaxgen dependency):

    python tools/make_moe_fixtures.py [--out tests/fixtures/hf]

As tools/make_hf_fixtures.py does for the dense families: `from_config` in float32, weights re-drawn
(matrices N(0, 1/fan_in), embeddings N(0, 1), norms 1 + N(0, 0.1); the routers N(0, 1) x 2 / sqrt(D),
so routing is decisive and varied), saved with `save_pretrained`. Qwen3-MoE with norm_topk_prob false
(the published checkpoints' value), 8 experts, 2 per token; Mixtral (its router always renormalizes)
with 4 experts, 2 per token and a sliding window. `config.published.json`: Qwen3-MoE's `num_experts`
as published (transformers 5 writes the same key; Mixtral's is `num_local_experts`).

reference.json: per prompt, HF's greedy continuation (eager attention, a full forward per step), the
log-prob of each chosen token and the smallest top-1 / top-2 logit margin (refused under 1e-3).
"""
import argparse
import json
import math
import pathlib

import torch
import transformers
from make_hf_fixtures import greedy  # (tools/ is the script's directory: on sys.path)
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

V, D = 128, 32
BASE = dict(vocab_size=V, hidden_size=D, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def configs():
    return {
        "qwen3_moe": Qwen3MoeConfig(**BASE, num_hidden_layers=2, head_dim=16, intermediate_size=64,
                                    moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                                    tie_word_embeddings=False),
        "mixtral": MixtralConfig(**BASE, num_hidden_layers=2, head_dim=8, intermediate_size=48, num_local_experts=4,
                                 num_experts_per_tok=2, sliding_window=6, tie_word_embeddings=False,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    }


def reinit(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight") and p.shape[-1] == D and p.shape[0] < 16:  # the router [E, D]
                p.copy_(2.0 * torch.randn(p.shape, generator=g) / math.sqrt(D))
            else:  # [out, in] matrices, or fused experts [E, out, in]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/hf")
    args = ap.parse_args()
    root = pathlib.Path(args.out)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V - 4, (n,), generator=g).tolist() for n in (5, 11, 19)]
    for name, cfg in configs().items():
        cfg.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        reinit(model)
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("*.safetensors*"):
            f.unlink()
        model.save_pretrained(d)
        config = json.loads((d / "config.json").read_text())
        published = dict(config)
        if name == "qwen3_moe":
            published.pop("num_local_experts", None)
            published["num_experts"] = cfg.num_experts
        (d / "config.published.json").write_text(json.dumps(published, indent=2) + "\n")
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
