"""lm-eval's own `hf` backend (HFLM) on the local tasks of tests/lm_eval_tasks.py, per request, for
tests/test_lm_eval.py. Two environments, as for the other fixtures:

    python tools/make_lm_eval_fixtures.py export /tmp/lm-eval-models      # jaxgen's: GGUF -> HF directories
    python tools/make_lm_eval_fixtures.py reference /tmp/lm-eval-models   # torch + transformers + lm-eval

`export` writes each model (its GGUF dequantized to float32) as an HF checkpoint directory with
jaxgen.checkpoint.hf_save (the HF-export parity is tools/check_hf_export.py's); `reference` runs
`lm_eval.simple_evaluate(model="hf", pretrained=DIR, dtype=float32, softmax_dtype=float64,
max_length=64, batch_size=1)` on those directories (batch 1: no padding in the reference) with log_samples, plain and with
apply_chat_template=True (multiple choice and generation), and writes tests/fixtures/lm_eval/<model>.json:
per task its metrics and every sample's request arguments and HFLM's responses, plus HF's
apply_chat_template text for a few histories (as HFLM calls it). jaxgen answers the same tasks from
the GGUF (the same weights) and from the exported directory, and must match these.

softmax_dtype=float64 (an HFLM option): torch's float32 log_softmax over Gemma's 262k vocabulary is
biased by about -5e-5 per token (seen 2026-12-05: ' Paris' -0.8330752 in f32, -0.8331235 in f64 from the
same f32 logits; jaxgen's XLA float32 log_softmax gave -0.833128), so a multi-token continuation drifted
past 1e-4 from the float32 reference while agreeing with the exact one.
"""
import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.lm_eval_tasks import MAX_LENGTH, configs  # noqa: E402

MODELS = ("smollm2-135m", "gemma3-270m")
OUT = ROOT / "tests" / "fixtures" / "lm_eval"
CHAT_TASKS = ("jaxgen_mc", "jaxgen_gen")
HISTORIES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}],
    [{"role": "user", "content": "Q: 2 + 2?"}, {"role": "assistant", "content": "A: 4"}],  # continued (no prompt)
]


def export(root: pathlib.Path):
    import jaxgen
    from jaxgen.checkpoint import hf_save

    for name in MODELS:
        hf_save.save(jaxgen.load(name, "float32"), root / name)
        print("wrote", root / name)


def run(model_dir: pathlib.Path, tasks: list[dict], chat: bool) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32", "max_length": MAX_LENGTH,
                                "softmax_dtype": "float64"},
        tasks=tasks, batch_size=1, device="cpu", log_samples=True, apply_chat_template=chat, task_manager=TaskManager(),
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0)
    out = {}
    for t in tasks:
        name = t["task"]
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        out[name] = {"metrics": {k: v for k, v in res["results"][name].items() if isinstance(v, (int, float))},
                     "samples": [{"doc_id": s["doc_id"], "arguments": s["arguments"], "resps": s["resps"]}
                                 for s in samples]}
    return out


def reference(root: pathlib.Path):
    import lm_eval
    import torch
    import transformers

    torch.manual_seed(0)
    for name in MODELS:
        model_dir = root / name
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        doc = {"model": name, "lm_eval": lm_eval.__version__, "transformers": transformers.__version__,
               "torch": torch.__version__, "max_length": MAX_LENGTH, "plain": run(model_dir, configs(), chat=False)}
        if tok.chat_template:  # (the Gemma 3 GGUF carries none: jaxgen's fallback format is not HF's to check)
            doc["chat"] = run(model_dir, [t for t in configs() if t["task"] in CHAT_TASKS], chat=True)
            doc["chat_templates"] = [
                {"messages": h, "add_generation_prompt": h[-1]["role"] == "user",
                 "text": tok.apply_chat_template(h, tokenize=False, add_generation_prompt=h[-1]["role"] == "user",
                                                 continue_final_message=h[-1]["role"] != "user")}
                for h in HISTORIES]
        (OUT / f"{name}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        print("wrote", OUT / f"{name}.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["export", "reference"])
    ap.add_argument("root", type=pathlib.Path, help="where the exported HF directories are (or go)")
    a = ap.parse_args()
    export(a.root) if a.step == "export" else reference(a.root)


if __name__ == "__main__":
    main()
