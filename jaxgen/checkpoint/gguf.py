"""GGUF import: config checks, params and tokenizer arrays, read with the `gguf` package.

The reader and the dequantizers are gguf's (`GGUFReader`, `gguf.quants.dequantize`); this module only
maps names and layouts. Every tensor name is accounted for (missing or unexpected names are an error),
every shape is asserted, and every transpose or permute is named where it happens:

  GGUF stores a linear layer y = W x as W [out, in] (numpy view), jaxgen stores [in, out...] so that
  einsums contract the leading axis: q/k/v/gate/up are transposed ("T:in_out"), attn_output and
  ffn_down likewise. The token embedding is [V, D] in the file and in jaxgen (a quantized one is
  transposed to the QMatrix's [D, V]: "T:vd_dv").
  llama-architecture files have q/k rows permuted for interleaved RoPE pairs; we undo it
  ("unpermute_rope") so every family rotates halves.
"""
from __future__ import annotations

import contextlib
import pathlib

import jax
import numpy as np

from jaxgen.config import ModelConfig
from jaxgen.errors import first_line

ARCHS = ("gemma3", "llama", "qwen2")
_LAYER_MAP = {  # gguf blk.N.<name>.weight|bias -> LayerParams field
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv",
    "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm", "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up", "ffn_down.weight": "w_down", "attn_q.bias": "bq", "attn_k.bias": "bk",
    "attn_v.bias": "bv", "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_ffn_norm",
}


def open_gguf(path):
    """A GGUFReader, with clear errors for a missing, truncated or corrupt file."""
    from gguf import GGUFReader

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises assorted errors on bad headers; name the file instead
        raise ValueError(f"{path}: corrupt or truncated GGUF header ({type(e).__name__}: {e})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"{path}: truncated GGUF: tensor data needs {end} bytes, the file has {size}")
    return reader


@contextlib.contextmanager
def reading(path):
    """Errors raised from inside a corrupt file's fields and tensors (a missing key, a field of the
    wrong type, an index past an array) as one ValueError naming the file, not a traceback. Clear
    errors (ValueError), memory and OS errors pass as they are."""
    try:
        yield
    except (ValueError, MemoryError, OSError):
        raise
    except Exception as e:
        raise ValueError(f"{path}: corrupt GGUF ({type(e).__name__}: {first_line(e)})"
                         ) from None


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def architecture(reader) -> str:
    arch = field(reader, "general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; jaxgen supports {list(ARCHS)}")
    return arch


def check_config(reader, cfg: ModelConfig) -> None:
    """Assert that the GGUF header agrees with the preset on every field the header carries."""
    arch = architecture(reader)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    header = {
        "vocab_size": field(reader, f"{arch}.vocab_size", n_vocab),
        "d_model": field(reader, f"{arch}.embedding_length"),
        "n_layers": field(reader, f"{arch}.block_count"),
        "n_heads": field(reader, f"{arch}.attention.head_count"),
        "n_kv_heads": field(reader, f"{arch}.attention.head_count_kv"),
        "d_ff": field(reader, f"{arch}.feed_forward_length"),
        "head_dim": field(reader, f"{arch}.attention.key_length",
                          field(reader, f"{arch}.embedding_length", 0) // max(field(reader, f"{arch}.attention.head_count", 1), 1)),
        "rope_theta": field(reader, f"{arch}.rope.freq_base"),
        "sliding_window": field(reader, f"{arch}.attention.sliding_window"),
        "norm_eps": field(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
    }
    bad = []
    for k, v in header.items():
        if v is None:
            continue
        want = getattr(cfg, k)
        same = abs(float(v) - want) <= 1e-6 * abs(want) + 1e-12 if isinstance(want, float) else int(v) == want
        if not same:
            bad.append(f"{k}: file {v} vs preset {want}")
    if bad:
        raise ValueError(f"GGUF header disagrees with config {cfg.name!r}: " + "; ".join(bad))


def _dequantize(t, dtype) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    qt = t.tensor_type
    if qt in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        x = np.asarray(t.data)
    else:
        try:
            x = quants.dequantize(t.data, qt)
        except NotImplementedError:
            raise ValueError(f"tensor {t.name}: GGUF quantization type {qt.name} is not supported by gguf's "
                             f"dequantizers") from None
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
    return x.reshape(shape).astype(dtype, copy=False)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows [n_heads, H/2, 2] (interleaved pairs) -> [n_heads, 2, H/2]
    (halves), the layout `apply_rope` rotates. w: [out = n_heads * H, in]."""
    out, d_in = w.shape
    h = out // n_heads
    return w.reshape(n_heads, h // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def load_params(reader, cfg: ModelConfig, dtype=np.float32, quant: str | None = None):
    """Params (numpy leaves, in `dtype`) from a GGUF reader, with key and shape assertions.

    quant "int8" / "int4": the projection matrices and embeddings come out as jaxgen.quant QMatrix
    leaves, quantized tensor by tensor (only one layer's matrix is ever in float), and with "int8" a
    Q8_0 embedding / output table is taken as its int8 values and groups of 32 with no float step."""
    from jaxgen import quant as qmod
    from jaxgen.model import LayerParams, Params, param_shapes

    arch = architecture(reader)
    check_config(reader, cfg)
    expect = param_shapes(cfg)
    tensors = {t.name: t for t in reader.tensors}
    L, D, N, K, H = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    want = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not cfg.tie_embeddings else set())
    fields = [f for f in _LAYER_MAP.values() if getattr(expect.layers, f) is not None]
    want |= {f"blk.{i}.{g}" for i in range(L) for g, f in _LAYER_MAP.items() if f in fields}
    have = set(tensors) - {"rope_freqs.weight"}  # precomputed RoPE tables some files carry
    if cfg.tie_embeddings and "output.weight" in have:
        raise ValueError(f"{cfg.name}: the GGUF has a separate output.weight but the config ties embeddings")
    if have != want:
        raise ValueError(f"GGUF tensor names do not match config {cfg.name!r}: missing "
                         f"{sorted(want - have)[:8]}, unexpected {sorted(have - want)[:8]}")

    def get(name, shape):
        x = _dequantize(tensors[name], dtype)
        if x.shape != shape:
            raise ValueError(f"GGUF tensor {name} has shape {x.shape}, expected {shape} for {cfg.name}")
        return x

    def layer_tensor(field_name, i):
        g = next(k for k, v in _LAYER_MAP.items() if v == field_name)
        name = f"blk.{i}.{g}"
        if field_name in ("wq", "wk"):
            heads = N if field_name == "wq" else K
            w = get(name, (heads * H, D))  # [out, in]
            if arch == "llama":
                w = unpermute_rope(w, heads)
            return w.T.reshape(D, heads, H)  # T:in_out -> [D, heads, H]
        if field_name == "wv":
            return get(name, (K * H, D)).T.reshape(D, K, H)  # T:in_out
        if field_name == "wo":
            return get(name, (D, N * H)).T.reshape(N, H, D)  # T:in_out -> [N, H, D]
        if field_name in ("w_gate", "w_up"):
            return get(name, (cfg.d_ff, D)).T  # T:in_out -> [D, F]
        if field_name == "w_down":
            return get(name, (D, cfg.d_ff)).T  # T:in_out -> [F, D]
        if field_name in ("bq", "bk"):
            heads = N if field_name == "bq" else K
            b = get(name, (heads * H,))
            if arch == "llama":
                b = unpermute_rope(b[:, None], heads)[:, 0]
            return b.reshape(heads, H)
        if field_name == "bv":
            return get(name, (K * H,)).reshape(K, H)
        shape = getattr(expect.layers, field_name).shape[1:]
        return get(name, shape)

    def gguf_name(field_name, i):
        return f"blk.{i}." + next(k for k, v in _LAYER_MAP.items() if v == field_name)

    def direct(name):  # int8 in groups of 32 is Q8_0's own format: take it as stored
        return bits == 8 and qmod.DEFAULT_GROUP[quant] == 32 and tensors[name].tensor_type.name == "Q8_0"

    def q8_matrix(name, rope_heads=0):
        values, scales = q8_0_int8(reader, name)  # [out, in], [out, in/32]
        if rope_heads:  # llama q/k rows are (head, dim) pairs: the same permutation on both
            values, scales = unpermute_rope(values, rope_heads), unpermute_rope(scales, rope_heads)
        # T:in_out for both: QMatrix matrices are [in, out]
        return qmod.QMatrix(q=np.ascontiguousarray(values.T), scale=scales.T.astype(dtype), bits=8)

    def layer_q8(field_name, i):
        heads = {"wq": N, "wk": K}.get(field_name, 0) if arch == "llama" else 0
        return q8_matrix(gguf_name(field_name, i), heads)

    bits = {"int8": 8, "int4": 4}.get(quant) if quant else None
    if quant and bits is None:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {qmod.MODES}")
    layers = {}
    for f in fields:
        if bits and f in qmod.LAYER_MATS:  # quantized one layer at a time, then stacked on L
            per = [layer_q8(f, i) if direct(gguf_name(f, i)) else
                   qmod.quantize(qmod.as_matrix(f, layer_tensor(f, i)[None])[0], bits, qmod.DEFAULT_GROUP[quant], dtype)
                   for i in range(L)]
            layers[f] = jax.tree.map(lambda *a: np.stack(a), *per)
            continue
        shape = getattr(expect.layers, f).shape
        buf = np.empty(shape, dtype)  # filled layer by layer: peak memory stays near the model size
        for i in range(L):
            buf[i] = layer_tensor(f, i)
        layers[f] = buf
    V = cfg.vocab_size

    def table(name):  # [V, D] in the file -> [V, D] float, or the [D, V] QMatrix
        if not bits:
            return np.ascontiguousarray(get(name, (V, D)))
        if direct(name):  # the unembedding contracts D: D is the QMatrix's input axis
            m = q8_matrix(name)
            assert m.shape == (D, V), (name, m.shape)
            return m
        return qmod.quantize(np.ascontiguousarray(get(name, (V, D)).T), bits, qmod.DEFAULT_GROUP[quant], dtype)

    return Params(embed=table("token_embd.weight"), layers=LayerParams(**layers),
                  final_norm=get("output_norm.weight", (D,)),
                  unembed=None if cfg.tie_embeddings else table("output.weight"))


def q8_0_int8(reader, name: str):
    """A Q8_0 tensor as int8 values [rows, cols] and f16 scales [rows, cols / 32], without a float
    round trip (for the quantized path). Q8_0 blocks are (f16 scale, 32 x int8)."""
    from gguf import GGMLQuantizationType

    t = next(t for t in reader.tensors if t.name == name)
    if t.tensor_type != GGMLQuantizationType.Q8_0:
        raise ValueError(f"{name} is {t.tensor_type.name}, not Q8_0")
    rows = int(t.shape[1])
    blocks = np.asarray(t.data).reshape(rows, -1, 34)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0]  # [rows, cols/32]
    values = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)  # [rows, cols]
    return values, scales


def tokenizer_fields(reader) -> dict:
    """The tokenizer arrays and ids from the header, as plain Python data."""
    toks = reader.fields["tokenizer.ggml.tokens"]
    out = {
        "model": field(reader, "tokenizer.ggml.model"),
        "pre": field(reader, "tokenizer.ggml.pre"),
        "tokens": [bytes(toks.parts[i]).decode("utf-8", errors="replace") for i in toks.data],
        "bos_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "unk_id": field(reader, "tokenizer.ggml.unknown_token_id"),
        "pad_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "add_bos": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_space_prefix": bool(field(reader, "tokenizer.ggml.add_space_prefix", False)),
        "chat_template": field(reader, "tokenizer.chat_template"),
    }
    for key in ("scores", "token_type"):
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        if f is not None:
            out[key] = np.concatenate([f.parts[i] for i in f.data]).tolist()
    merges = reader.fields.get("tokenizer.ggml.merges")
    if merges is not None:
        out["merges"] = [bytes(merges.parts[i]).decode("utf-8") for i in merges.data]
    return out

