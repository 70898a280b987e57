"""GGUF import and Orbax checkpoints on tiny files written here with gguf's own GGUFWriter: the name
map, every transpose and the llama q/k permutation are checked against the params that were written;
bad files and bad names fail with a message naming the problem."""
import dataclasses
import re

import chex
import jax
import numpy as np
import pytest

import jaxgen
from jaxgen.checkpoint import gguf as G
from jaxgen.checkpoint import orbax as O
from jaxgen.checkpoint import registry
from jaxgen.config import ModelConfig
from jaxgen.model import stack_layers
from jaxgen.tokenizer import BPETokenizer

from .conftest import random_params

# Llama-architecture (q/k stored permuted for interleaved RoPE), tied embeddings, GQA 4/2.
TINY_LLAMA = ModelConfig(
    name="tiny-llama", vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
    d_ff=48, max_seq_len=128, activation="silu", rope_theta=1e4, norm_eps=1e-5)


def byte_vocab():
    """GPT-2's byte -> printable-unicode table: 256 byte tokens, then 2 merges and an end token."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b), cs.append(256 + n)
            n += 1
    table = dict(zip(bs, map(chr, cs)))
    tokens = [table[b] for b in range(256)] + ["Ġt", "Ġth", "<|endoftext|>"]
    return tokens, ["Ġ t", "Ġt h"]


def permute_rope(w, n_heads):
    """llama.cpp's conversion permutation (the inverse of the loader's unpermute_rope)."""
    out, d_in = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def write_gguf(path, cfg, params, arch="llama"):
    """Write `params` the way llama.cpp lays them out: linear weights [out, in], q/k permuted."""
    import gguf

    p = jax.tree.map(np.asarray, params)
    L, D, N, K, H = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L), w.add_embedding_length(D), w.add_head_count(N), w.add_head_count_kv(K)
    w.add_feed_forward_length(cfg.d_ff), w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps), w.add_context_length(cfg.max_seq_len)
    tokens, merges = byte_vocab()
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("gpt2"), w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3]), w.add_token_merges(merges)
    w.add_eos_token_id(258), w.add_add_bos_token(False)
    w.add_tensor("token_embd.weight", p.embed)  # [V, D] as GGUF stores it
    w.add_tensor("output_norm.weight", p.final_norm)
    ly = p.layers
    for i in range(L):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", ly.attn_norm[i])
        w.add_tensor(b + "attn_q.weight", permute_rope(ly.wq[i].reshape(D, N * H).T, N))  # [D,N,H] -> [out, in]
        w.add_tensor(b + "attn_k.weight", permute_rope(ly.wk[i].reshape(D, K * H).T, K))
        w.add_tensor(b + "attn_v.weight", ly.wv[i].reshape(D, K * H).T)
        w.add_tensor(b + "attn_output.weight", ly.wo[i].reshape(N * H, D).T)  # [N,H,D] -> [D, N*H]
        w.add_tensor(b + "ffn_norm.weight", ly.ffn_norm[i])
        w.add_tensor(b + "ffn_gate.weight", ly.w_gate[i].T)
        w.add_tensor(b + "ffn_up.weight", ly.w_up[i].T)
        w.add_tensor(b + "ffn_down.weight", ly.w_down[i].T)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    params = random_params(TINY_LLAMA, seed=3)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", TINY_LLAMA, params)
    return path, params


def test_gguf_params_round_trip(tiny_file):
    path, params = tiny_file
    reader = G.open_gguf(path)
    assert G.architecture(reader) == "llama"
    got = G.load_params(reader, TINY_LLAMA)
    for (kp, a), b in zip(jax.tree.flatten_with_path(params)[0], jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(kp))


def test_gguf_tokenizer_and_generation_from_file(tiny_file):
    path, params = tiny_file
    tok = jaxgen.tokenizer.from_gguf_fields(G.tokenizer_fields(G.open_gguf(path)))
    assert isinstance(tok, BPETokenizer)
    ids = tok.encode(" the tea")
    assert ids[0] == 257 and tok.decode(ids) == " the tea"  # the "Ġth" merge applies
    assert tok.stop_ids == (258,)


def test_header_disagreeing_with_config_is_named(tiny_file):
    path, _ = tiny_file
    with pytest.raises(ValueError, match=r"d_model: file 32 vs preset 64"):
        G.load_params(G.open_gguf(path), dataclasses.replace(TINY_LLAMA, d_model=64))


def test_missing_and_extra_tensors_are_named(tmp_path):
    cfg = dataclasses.replace(TINY_LLAMA, tie_embeddings=False)  # wants output.weight, the file lacks it
    path = write_gguf(tmp_path / "t.gguf", TINY_LLAMA, random_params(TINY_LLAMA))
    with pytest.raises(ValueError, match=r"missing \['output.weight'\]"):
        G.load_params(G.open_gguf(path), cfg)


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ValueError, match="not a GGUF file"):
        G.open_gguf(p)
    with pytest.raises(FileNotFoundError, match="not found"):
        G.open_gguf(tmp_path / "nope.gguf")


def test_truncated_gguf(tiny_file, tmp_path):
    path, _ = tiny_file
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])  # tensor data cut short
    with pytest.raises(ValueError, match="truncated GGUF"):
        G.open_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:200])  # cut inside the header
    with pytest.raises(ValueError, match="corrupt or truncated GGUF header"):
        G.open_gguf(head)


def test_corrupt_header_does_not_allocate(tmp_path):
    # A valid magic and version, then an absurd tensor count: must fail fast with a message.
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**62).to_bytes(8, "little") + (1).to_bytes(8, "little")
                    + b"\xff" * 64)
    with pytest.raises(ValueError, match=r"bad.gguf"):
        G.open_gguf(bad)


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'mamba'"):
        G.architecture(G.open_gguf(tmp_path / "m.gguf"))
    with pytest.raises(ValueError, match=r"'mamba'"):
        registry.load(str(tmp_path / "m.gguf"))


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'gemma-7b'.*'gemma3-270m'.*'smollm2-135m'"):
        registry.load("gemma-7b")


def test_missing_package_says_what_to_install(monkeypatch):
    entry = dataclasses.replace(registry.MODELS["smollm2-135m"], module="jaxgen_not_a_package",
                                install="pip install jaxgen-not-a-package==1.0")
    monkeypatch.setitem(registry.MODELS, "fake-model", entry)
    with pytest.raises(registry.ModelNotInstalledError, match=r"`pip install jaxgen-not-a-package==1.0`"):
        registry.load("fake-model", use_cache=False)


def test_orbax_round_trip_with_tokenizer(tiny_file, tmp_path):
    path, params = tiny_file
    tok = jaxgen.tokenizer.from_gguf_fields(G.tokenizer_fields(G.open_gguf(path)))
    O.save(tmp_path / "ck", TINY_LLAMA, params, tok)
    with pytest.raises(FileExistsError):
        O.save(tmp_path / "ck", TINY_LLAMA, params, tok)  # never overwrite a checkpoint
    model = registry.load(str(tmp_path / "ck"), "float32")
    assert model.cfg == TINY_LLAMA
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(model.params))  # on device, not numpy
    restacked = jax.tree.map(np.asarray, stack_layers(model.params))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), restacked)
    assert model.tokenizer.encode(" the tea") == tok.encode(" the tea")
    bf = registry.load(str(tmp_path / "ck"), "bfloat16")
    assert bf.params.embed.dtype == jax.numpy.bfloat16
    # a checkpoint written by jaxgen 0.2 (embedding stored [D, V]) restores transposed
    O.save(tmp_path / "old", TINY_LLAMA, params.replace(embed=np.ascontiguousarray(np.asarray(params.embed).T)))
    _, old, _ = O.restore(tmp_path / "old")
    np.testing.assert_array_equal(np.asarray(old.embed), np.asarray(params.embed))


def test_damaged_orbax_checkpoint_is_one_line(tiny_file, tmp_path):
    """A chunk of garbage, a config.toml that asks for weights the checkpoint lacks, a garbled
    tokenizer.json, a missing one where text needs it: one ValueError line naming the directory (were:
    Orbax's exception with pages of TensorStore spec, an AttributeError in the forward pass, the
    tokenizers library's Exception, an AttributeError in the CLI)."""
    import shutil

    path, params = tiny_file
    tok = jaxgen.tokenizer.from_gguf_fields(G.tokenizer_fields(G.open_gguf(path)))
    O.save(tmp_path / "ck", TINY_LLAMA, params, tok)

    def damaged(name, edit):
        d = tmp_path / name
        shutil.copytree(tmp_path / "ck", d)
        edit(d)
        return d

    chunk = lambda d: max((d / "params").rglob("d/*"), key=lambda f: f.stat().st_size).write_bytes(b"garbage")
    toml = lambda d: (d / "config.toml").write_text((d / "config.toml").read_text().replace("qk_norm = false",
                                                                                             "qk_norm = true"))
    cases = {"cannot read the Orbax checkpoint's params": damaged("chunk", chunk),
             "config.toml's model has weights the checkpoint does not hold: ['layers.q_norm', 'layers.k_norm']":
                 damaged("toml", toml),
             "tokenizer.json: not a tokenizer jaxgen wrote": damaged("tok", lambda d: (d / "tokenizer.json").write_text(
                 (d / "tokenizer.json").read_text()[:-40]))}
    for message, d in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            registry.load(str(d))
    d = damaged("notok", lambda d: (d / "tokenizer.json").unlink())
    assert registry.load(str(d)).tokenizer is None  # token-id prompts need none
    with pytest.raises(ValueError, match="no tokenizer.json"):
        registry.load(str(d), need_tokenizer=True)


def test_orbax_restore_onto_sharding(tiny_file, tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    path, params = tiny_file
    O.save(tmp_path / "ck", TINY_LLAMA, params)
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    shardings = shardings.replace(embed=NamedSharding(mesh, P(None, "model")))  # [V, D] split on D (V = 259)
    cfg, got, tok = O.restore(tmp_path / "ck", shardings=shardings)
    assert tok is None and got.embed.sharding == shardings.embed
    np.testing.assert_array_equal(np.asarray(got.embed), np.asarray(params.embed))


def test_load_onto_a_mesh(tiny_file, tmp_path):
    from jaxgen import sharding

    path, params = tiny_file
    O.save(tmp_path / "ck", TINY_LLAMA, params)
    mesh = sharding.make_mesh("data=2,model=4")
    model = registry.load(str(tmp_path / "ck"), "float32", mesh=mesh)
    assert model.mesh is mesh
    want = sharding.param_shardings(TINY_LLAMA, mesh, params=model.params)  # per-layer decode layout
    assert isinstance(model.params.layers, tuple) and len(model.params.layers) == TINY_LLAMA.n_layers
    assert all(a.sharding == w for a, w in zip(jax.tree.leaves(model.params), jax.tree.leaves(want)))
    assert tuple(model.params.layers[0].wq.sharding.spec) == tuple(sharding.param_shardings(TINY_LLAMA, mesh).layers.wq.spec)[1:]
    np.testing.assert_array_equal(np.asarray(stack_layers(model.params).layers.wq), np.asarray(params.layers.wq))
    with pytest.raises(ValueError, match="mesh= or shardings=, not both"):
        registry.load(str(tmp_path / "ck"), mesh=mesh, shardings=want)
    with pytest.raises(ValueError, match="is not a jaxgen Orbax checkpoint"):
        registry.load(str(tmp_path))
