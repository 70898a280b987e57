"""Google's `gemma` library (gm.nn.Gemma3_270M + gm.text.Sampler) on the benchmark protocol (see
common.py), with the GGUF weights dequantized into its param tree. Runs in .benchmarks/gemma (Python
3.12); jaxgen's GGUF reader is borrowed from the repository for the dequantization and name mapping."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import clock, decode_rates, report, spec  # noqa: E402


def gemma_params(path, dtype):
    """The GGUF as gemma's param tree. jaxgen's loader gives [in, out] matrices and full norm
    multipliers; gemma wants its own einsum layouts and norm scales without the +1."""
    import jax.numpy as jnp
    import numpy as np

    from jaxgen.checkpoint import gguf
    from jaxgen.config import load_config

    cfg = load_config("gemma3-270m")
    p = gguf.load_params(gguf.open_gguf(path), cfg, np.float32)
    ly = p.layers
    cast = lambda x: jnp.asarray(x, dtype)
    out = {"embedder": {"input_embedding": cast(p.embed)}, "final_norm": {"scale": cast(p.final_norm - 1)}}
    for i in range(cfg.n_layers):
        out[f"layer_{i}"] = {
            "attn": {
                "_query_norm": {"scale": cast(ly.q_norm[i] - 1)}, "_key_norm": {"scale": cast(ly.k_norm[i] - 1)},
                "q_einsum": {"w": cast(ly.wq[i].transpose(1, 0, 2))},  # [D,N,H] -> [N,D,H]
                "kv_einsum": {"w": cast(np.stack([ly.wk[i].transpose(1, 0, 2), ly.wv[i].transpose(1, 0, 2)]))},
                "attn_vec_einsum": {"w": cast(ly.wo[i])},  # [N,H,D]
            },
            "mlp": {"gating_einsum": cast(np.stack([ly.w_gate[i].T, ly.w_up[i].T])),  # [2,F,D]
                    "linear": cast(ly.w_down[i])},  # [F,D]
            "pre_attention_norm": {"scale": cast(ly.attn_norm[i] - 1)},
            "post_attention_norm": {"scale": cast(ly.post_attn_norm[i] - 1)},
            "pre_ffw_norm": {"scale": cast(ly.ffn_norm[i] - 1)},
            "post_ffw_norm": {"scale": cast(ly.post_ffn_norm[i] - 1)},
        }
    return out


def main():
    s = spec()
    import jax
    import jax.numpy as jnp
    from gemma import gm

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[s["dtype"]]
    params = gemma_params(s["gguf"], dtype)
    model = gm.nn.Gemma3_270M(dtype=dtype) if "dtype" in gm.nn.Gemma3_270M.__dataclass_fields__ else gm.nn.Gemma3_270M()
    tok = gm.text.Gemma3Tokenizer(path=s["sp_model"])
    n = s["new_tokens"]
    prompt = tok.decode(s["prompt_ids"][1:])
    long = tok.decode(s["prefill_ids"][1:])
    # Fair settings (not its 4096 defaults): a 256 cache, small pad buckets, EOS forbidden so every
    # row decodes the full length.
    mk = lambda cache, pads: gm.text.Sampler(model=model, params=params, tokenizer=tok, cache_length=cache,
                                             max_out_length=n, pad_length=pads, forbidden_tokens=[1, 106])
    dec, pre = mk(256, (16, 32, 64)), mk(1024, (len(s["prefill_ids"]) + 8,))

    def run(batch, k, sampler=dec, text=prompt):
        out = sampler.sample([text] * batch, max_new_tokens=k)
        jax.block_until_ready(out) if not isinstance(out, (list, str)) else None

    t = clock()
    run(1, n)
    first = clock() - t
    run(1, 1, pre, long)
    t = clock()
    run(1, 1, pre, long)
    prefill = len(s["prefill_ids"]) / (clock() - t)
    decode = {b: decode_rates(run, b, n, s["inner"]) for b in s["batches"]}
    report("gemma", s, first_call_s=first, prefill_tps=prefill, decode_tps=decode,
           versions={"gemma": __import__("gemma").__version__, "jax": jax.__version__})


if __name__ == "__main__":
    main()
