"""HF transformers `generate` (torch CPU) on the benchmark protocol (see common.py)."""
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import decode_rates, first_and_prefill, report, spec  # noqa: E402


def main():
    s = spec()
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 2)
    path = pathlib.Path(s["gguf"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[s["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()

    def run(batch, n, ids=s["prompt_ids"]):
        x = torch.tensor([ids] * batch)
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(ids) + n

    first, prefill = first_and_prefill(run, s)
    decode = {b: decode_rates(run, b, s["new_tokens"], s["inner"]) for b in s["batches"]}
    report("hf", s, first_call_s=first, prefill_tps=prefill, decode_tps=decode,
           versions={"torch": torch.__version__, "transformers": __import__("transformers").__version__})


if __name__ == "__main__":
    main()
