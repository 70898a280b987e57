"""Beam-search parity fixtures with HF transformers (torch CPU, float32), from the GGUF jaxgen loads.

Run in the environment of tools/make_reference.py (torch, transformers, gguf, the model package):

    python tools/make_beam_fixtures.py [--out tests/fixtures]

Writes gemma3-270m-beam.json: per case, the prompt ids, the beam settings, and HF's
`generate(num_beams=k, do_sample=False, num_return_sequences=k, output_scores=True)` sequences (new
ids, EOS included when a beam ended on it, padding removed) with their sequence scores.
"""
import argparse
import json
import pathlib
import sys

from make_reference import PROMPTS, gguf_path

SETTINGS = [  # (prompts, num_beams, max_new_tokens, length_penalty, early_stopping)
    (PROMPTS, 4, 24, 1.0, False),  # HF's defaults
    (PROMPTS[:3], 3, 16, 0.5, True),
    (PROMPTS[3:5], 2, 20, 1.5, "never"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path("gemma3-270m")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]  # jaxgen's default stop ids for Gemma
    cases = []
    for prompts, k, n_new, lp, es in SETTINGS:
        for prompt in prompts:
            ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids])
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, do_sample=False,
                                     num_beams=k, num_return_sequences=k, length_penalty=lp, early_stopping=es,
                                     eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True,
                                     output_scores=True)
            beams = []
            for seq, score in zip(out.sequences, out.sequences_scores):
                new = seq[len(ids):].tolist()
                end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
                beams.append({"ids": new[:end], "score": float(score)})
            cases.append({"prompt": prompt, "prompt_ids": ids, "num_beams": k, "max_new_tokens": n_new,
                          "length_penalty": lp, "early_stopping": es, "stop_ids": eos, "beams": beams})
            print(k, lp, es, repr(tok.decode(beams[0]["ids"])[:60]), beams[0]["score"], file=sys.stderr)
    meta = {"model": "gemma3-270m", "gguf": path.name, "reference": "transformers " + __import__("transformers").__version__
            + ", torch " + torch.__version__ + ", float32, generate(num_beams=k, do_sample=False)"}
    out = pathlib.Path(args.out) / "gemma3-270m-beam.json"
    out.write_text(json.dumps({"meta": meta, "cases": cases}, ensure_ascii=False, indent=1))
    print("wrote", out, file=sys.stderr)


if __name__ == "__main__":
    main()
