"""Random PEFT LoRA adapters for the tiny HF checkpoints (tests/fixtures/hf, tools/make_hf_fixtures.py),
with HF transformers + peft's greedy tokens and log-probs, for tests/test_lora.py.

Run in a separate environment with torch (CPU), transformers and peft (none is a jaxgen dependency):

    python tools/make_lora_fixtures.py [--hf tests/fixtures/hf] [--out tests/fixtures/lora]

Each adapter: `get_peft_model(base, LoraConfig(...))`, then every lora_A / lora_B weight re-drawn
N(0, 1 / fan_in) (peft's default B = 0 would make the adapter a no-op), saved with `save_pretrained`
(adapter_config.json + adapter_model.safetensors). The adapters cover: every target module (llama,
gemma3_text), a few (qwen2: q / v, with rsLoRA's alpha / sqrt(r) scale; llama "small": q / v / down at
another rank), and Gemma 3's multimodal key layout with target_modules as a regex string (gemma3).

reference.json per adapter: per prompt (the HF fixture's prompts), peft's greedy continuation (eager
attention, a full forward per step, no cache), the log-prob of each chosen token and the smallest
top-1 / top-2 logit margin (a fixture under 1e-3 is refused: a near tie is no test of greedy equality).
"""
import argparse
import json
import math
import pathlib

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from make_hf_fixtures import greedy  # (tools/ is the script's directory: on sys.path)
from transformers import AutoModelForCausalLM

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (base fixture, LoraConfig keywords)
ADAPTERS = {
    "llama-all": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL)),
    "llama-small": ("llama", dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen2-rslora": ("qwen2", dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True)),
    "gemma3_text-all": ("gemma3_text", dict(r=4, lora_alpha=16, target_modules=ALL)),
    "gemma3-regex": ("gemma3", dict(r=4, lora_alpha=8,
                                    target_modules=r".*language_model.*\.(q_proj|k_proj|o_proj|up_proj)")),
}


def load_base(path: pathlib.Path):
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    cls = getattr(transformers, arch) if arch == "Gemma3ForConditionalGeneration" else AutoModelForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", default="tests/fixtures/hf")
    ap.add_argument("--out", default="tests/fixtures/lora")
    args = ap.parse_args()
    hf, root = pathlib.Path(args.hf), pathlib.Path(args.out)
    for seed, (name, (family, kw)) in enumerate(ADAPTERS.items()):
        base = load_base(hf / family)
        model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **kw)).eval()
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:  # A [r, in], B [out, r]
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d)
        cases = []
        for c in json.loads((hf / family / "reference.json").read_text())["cases"]:
            toks, logps, margin = greedy(model, c["prompt_ids"], 10)
            assert margin > 1e-3, (name, c["prompt_ids"], margin)
            cases.append({"prompt_ids": c["prompt_ids"], "greedy_ids": toks, "logprobs": logps, "min_margin": margin})
        (d / "reference.json").write_text(json.dumps({
            "base": family, "reference": f"transformers {transformers.__version__}, peft {peft.__version__}, torch "
                                         f"{torch.__version__}, float32, eager attention, greedy with a full forward "
                                         "per step", "cases": cases}, indent=1) + "\n")
        print(name, "ok", min(c["min_margin"] for c in cases), sorted(p.name for p in d.iterdir()))


if __name__ == "__main__":
    main()
