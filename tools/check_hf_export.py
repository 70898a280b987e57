"""Check jaxgen's HF export against transformers: every directory written by
jaxgen.checkpoint.hf_save.save from the tiny fixtures loads in transformers and gives the fixture's
log-probs (what HF computed on the original checkpoint). Two environments, as for the fixtures:

    python -c "import jaxgen; from jaxgen.checkpoint import hf_save; [hf_save.save(jaxgen.load(f'tests/fixtures/hf/{f}'), f'/tmp/exp/{f}') for f in ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma2', 'gemma3_text', 'gemma3')]"
    python tools/check_hf_export.py /tmp/exp          # in the environment with torch + transformers

Seen 2026-12-04 (transformers 5.12.1): the largest difference 9e-7 over every family and prompt (one
forward over the whole sequence here, one per step in the fixtures: float rounding). The exported Gemma 3
multimodal checkpoint loads as Gemma3ForCausalLM: the text model.
"""
import json
import pathlib
import sys

import torch
import transformers

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"


def main():
    root = pathlib.Path(sys.argv[1])
    worst = 0.0
    for d in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").float().eval()
        for case in json.loads((FIXTURES / d.name / "reference.json").read_text())["cases"]:
            ids = case["prompt_ids"] + case["greedy_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            P = len(case["prompt_ids"])
            got = [float(lp[P - 1 + i, t]) for i, t in enumerate(case["greedy_ids"])]
            diff = max(abs(a - b) for a, b in zip(got, case["logprobs"]))
            worst = max(worst, diff)
            print(d.name, type(model).__name__, f"{diff:.2e}")
    print("largest difference", worst)
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()
