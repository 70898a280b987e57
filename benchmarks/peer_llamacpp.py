"""llama.cpp (llama-cpp-python, built from source with GGML_NATIVE) on the benchmark protocol (common.py).

It runs the GGUF as shipped (Q4_K_M weights, Q8_0 embedding): the `dtype` of the spec does not apply and
the row is reported as "q4_k_m". Greedy decode with `Llama.eval` one token at a time (the same loop its
`generate` runs), 2 threads. Only batch 1 is measured: the Python API has no batched decode of several
sequences, so larger batches would only repeat batch 1 sequentially.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import decode_rates, first_and_prefill, report, spec  # noqa: E402


def main():
    s = spec()
    import llama_cpp
    import numpy as np

    threads = os.cpu_count() or 2
    llm = llama_cpp.Llama(model_path=s["gguf"], n_ctx=1024, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def run(batch, n, ids=s["prompt_ids"]):
        assert batch == 1
        llm.reset()
        llm.eval(ids)
        for _ in range(n - 1):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        int(np.argmax(llm.scores[llm.n_tokens - 1]))

    first, prefill = first_and_prefill(run, s)
    decode = {1: decode_rates(run, 1, s["new_tokens"], s["inner"])} if 1 in s["batches"] else {}
    report("llamacpp", dict(s, dtype="q4_k_m"), first_call_s=first, prefill_tps=prefill, decode_tps=decode,
           versions={"llama_cpp": llama_cpp.__version__, "threads": threads})


if __name__ == "__main__":
    main()
