"""HF checkpoint directories (jaxgen.checkpoint.hf): every family against HF transformers, both forms of
config.json, sharded files, a mesh load that reads each device's slice, bf16 kept, export round trips,
and one clear line for every bad directory.

The fixtures (tests/fixtures/hf/<family>/) are tiny random models saved by transformers with HF's greedy
tokens and log-probs (tools/make_hf_fixtures.py)."""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from jaxgen import cli
from jaxgen.checkpoint import hf, hf_save
from jaxgen.sharding import make_mesh, param_shardings
from tests.test_fuzz import _copy_hf_fixture

HF = pathlib.Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3"]


def reference(family):
    return json.loads((HF / family / "reference.json").read_text())["cases"]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = jaxgen.load(str(HF / family))
        return cache[family]
    return get


def copy_fixture(family, dst: pathlib.Path, config: str = "config.json") -> pathlib.Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in (HF / family).iterdir():
        if f.name not in ("config.json", "config.published.json", "reference.json"):
            shutil.copy(f, dst / f.name)
    shutil.copy(HF / family / config, dst / "config.json")
    return dst


@pytest.mark.parametrize("family", FAMILIES)
def test_published_and_transformers5_config_forms_are_one_config(family):
    """Both forms of config.json in circulation describe the same model: the same ModelConfig (so the
    same tokens: the greedy test below runs once per family)."""
    five = hf.config_from_hf(json.loads((HF / family / "config.json").read_text()))
    published = json.loads((HF / family / "config.published.json").read_text())
    assert "layer_types" not in json.dumps(published) and "rope_parameters" not in json.dumps(published)
    assert hf.config_from_hf(published) == five


# What each fixture exercises, as the mapping must read it (the fixtures' configs: tools/make_hf_fixtures.py).
EXPECT = {
    "llama": dict(rope_type="llama3", rope_scaling=8.0, rope_original_max_len=64, tie_embeddings=False, head_dim=16),
    "mistral": dict(layer_pattern="LL", sliding_window=6, rope_theta=1e6),
    "qwen2": dict(layer_pattern="", sliding_window=0, qkv_bias=True),  # use_sliding_window false: no window
    "qwen3": dict(qk_norm=True, qkv_bias=False, head_dim=16, tie_embeddings=True),
    "gemma2": dict(layer_pattern="LGLG", attn_logit_softcap=4.0, final_logit_softcap=6.0, query_pre_attn_scalar=12.0),
    "gemma3_text": dict(layer_pattern="LLGLLG", rope_scaling=8.0, rope_local_theta=1e4, qk_norm=True),
    "gemma3": dict(layer_pattern="LLGLLG", rope_scaling=8.0, rope_local_theta=1e4, qk_norm=True),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_and_logprobs_equal_hf(models, family):
    """Greedy tokens equal HF transformers', log-probs within 1e-4, from generate and from the
    teacher-forced score of the same sequences."""
    model = models(family)
    for field, value in EXPECT[family].items():
        assert getattr(model.cfg, field) == value, field
    cases = reference(family)
    got = jaxgen.generate(model, [c["prompt_ids"] for c in cases], max_new_tokens=10, stop_ids=[])
    for c, g in zip(cases, got):
        assert g.tokens == c["greedy_ids"]
        np.testing.assert_allclose(g.logprobs, c["logprobs"], atol=1e-4)
    seqs = [c["prompt_ids"] + c["greedy_ids"] for c in cases]
    T = max(map(len, seqs))
    tokens = jnp.asarray([s + [0] * (T - len(s)) for s in seqs])
    lp = jaxgen.score(jax.device_put(model.params), tokens, jnp.asarray([len(s) for s in seqs]), model.cfg)
    for i, c in enumerate(cases):
        P = len(c["prompt_ids"])
        np.testing.assert_allclose(np.asarray(lp[i, P - 1:P - 1 + 10]), c["logprobs"], atol=1e-4)


def test_mesh_load_reads_each_device_slice_and_equals_one_device(models, monkeypatch):
    """With a mesh, each leaf is made from per-device reads of the file (none reads more than a device's
    share of a split tensor) and equals the one-device load; generation on the mesh gives the same
    tokens. Sharded files (Llama: 8 shards + index) and the multimodal prefixes (Gemma 3) both."""
    mesh = make_mesh("data=2,model=4")
    reads = []
    real_read = hf._read
    monkeypatch.setattr(hf, "_read", lambda sl, how, shape, index, *a: reads.append((shape, index)) or
                        real_read(sl, how, shape, index, *a))
    for family in ("llama", "gemma3"):
        reads.clear()
        sharded = jaxgen.load(str(HF / family), mesh=mesh)
        one = models(family)
        want = param_shardings(sharded.cfg, mesh, params=one.params)
        for a, b, sh in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(one.params), jax.tree.leaves(want)):
            assert a.sharding.is_equivalent_to(sh, a.ndim)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        split = [(shape, idx) for shape, idx in reads if any(s != slice(None) and s.indices(n) != (0, n, 1)
                                                            for s, n in zip(idx, shape))]
        assert split, "nothing was read in slices"
        for shape, idx in split:  # a device's share: the model axis (4) divides one dim
            assert np.prod([len(range(*s.indices(n))) for s, n in zip(idx, shape)]) * 4 == np.prod(shape)
    cases = reference("llama")
    got = jaxgen.generate(jaxgen.load(str(HF / "llama"), mesh=mesh), [c["prompt_ids"] for c in cases],
                          max_new_tokens=10, stop_ids=[])
    assert [g.tokens for g in got] == [c["greedy_ids"] for c in cases]


def test_two_checkpoints_of_one_architecture_share_programs(tmp_path, compile_counter):
    """cfg.name (an HF directory's name) is a label outside the config's equality: a second checkpoint of
    the same architecture (ckpt-100/, ckpt-200/) runs the programs the first compiled (it compiled them
    again before, and an eval over many checkpoints in one process kept every copy)."""
    a = jaxgen.load(str(copy_fixture("qwen3", tmp_path / "ckpt-100")))
    b = jaxgen.load(str(copy_fixture("qwen3", tmp_path / "ckpt-200")))
    assert (a.cfg.name, b.cfg.name) == ("ckpt-100", "ckpt-200") and a.cfg == b.cfg and hash(a.cfg) == hash(b.cfg)
    first = jaxgen.generate(a, [[5, 6, 7]], max_new_tokens=3)
    before = compile_counter.count()
    assert jaxgen.generate(b, [[5, 6, 7]], max_new_tokens=3)[0].tokens == first[0].tokens
    assert compile_counter.count() == before


def test_bf16_checkpoint_stays_bf16_unless_asked(tmp_path):
    """A bf16 checkpoint loads as bf16 by default (Gemma's folded norms stay float32, as HF computes
    1 + w in float32); dtype="float32" converts; values equal the checkpoint's."""
    from safetensors.numpy import load_file, save_file

    d = copy_fixture("gemma3_text", tmp_path / "bf16")
    tensors = load_file(d / "model.safetensors")
    save_file({k: v.astype(jnp.bfloat16) for k, v in tensors.items()}, d / "model.safetensors")
    m = jaxgen.load(str(d))
    leaves = jax.tree.leaves_with_path(m.params)
    assert {str(a.dtype) for p, a in leaves if "norm" not in jax.tree_util.keystr(p)} == {"bfloat16"}
    assert {str(a.dtype) for p, a in leaves if "norm" in jax.tree_util.keystr(p)} == {"float32"}
    embed = tensors["model.embed_tokens.weight"].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(m.params.embed), embed)  # [V, D] as stored
    f32 = jaxgen.load(str(d), dtype="float32")
    assert f32.params.embed.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(f32.params.embed), embed.astype(np.float32))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(models, tmp_path, family):
    """hf_save.save writes what hf.load reads back: the same config and the same params (transformers reads
    these directories too: checked by hand with transformers 5.12, logits equal to the fixtures')."""
    model = models(family)
    out = hf_save.save(model, tmp_path / family, max_shard_bytes=20_000 if family == "qwen2" else None)
    back = jaxgen.load(str(out))
    assert back.cfg == model.cfg and back.cfg.name == family
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(model.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7)
    if family == "qwen2":
        assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*"))) > 1


def test_presets_are_published_configs():
    """Each HF preset is what its published config.json maps to (the values in
    tests/fixtures/hf-configs/, as the model cards publish them), and every preset of a family jaxgen
    writes survives config -> config.json -> config; real-size shapes come from eval_shape alone."""
    for f in sorted((HF.parent / "hf-configs").glob("*.json")):
        raw = json.loads(f.read_text())
        assert hf.config_from_hf(raw, name=f.stem) == jaxgen.load_config(f.stem), f.stem
    for name in jaxgen.preset_names():
        cfg = jaxgen.load_config(name)
        assert hf.config_from_hf(hf_save.hf_config(cfg), name=name) == cfg, name
        shapes = jax.eval_shape(lambda: jaxgen.init_params(cfg, jax.random.key(0), jnp.bfloat16))
        n = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes))
        assert n > 1e8, name


BAD = {  # name -> (how to break a copy of the qwen3 fixture, what the one line must say)
    "pickle": (lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"x")),
               "pickled PyTorch checkpoint"),
    "header-length": (lambda d: (d / "model.safetensors").write_bytes((2 ** 60).to_bytes(8, "little") + b"{}"),
                      "corrupt safetensors"),
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                  "corrupt safetensors"),
    "missing": (lambda d: _rewrite(d, drop="model.layers.1.mlp.up_proj.weight"), "missing tensor"),
    "unexpected": (lambda d: _rewrite(d, add="model.layers.7.mlp.up_proj.weight"), "unexpected tensor"),
    "shape": (lambda d: _config(d, intermediate_size=48), "has shape"),
    "int8": (lambda d: _rewrite(d, int8="model.norm.weight"), "dtype I8"),
    "family": (lambda d: _config(d, model_type="gpt2"), "model_type 'gpt2' is not supported"),
    "rope": (lambda d: _config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
             "rope_type 'yarn' is not supported"),
    "quantized": (lambda d: _config(d, quantization_config={"quant_method": "gptq"}), "quantized checkpoints"),
    "absurd": (lambda d: _config(d, vocab_size=10 ** 13), "parameters"),
    "not-json": (lambda d: (d / "config.json").write_text("{oops"), "not readable JSON"),
    "o-bias": (lambda d: _config(d, attention_bias=True), "attention_bias true is not supported"),
    "index": (lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}})), "not a file"),
    "tokenizer": (lambda d: (d / "tokenizer.json").write_text("{}"), "not a tokenizers file"),
    "eos-past-vocab": (lambda d: (_copy_hf_fixture(d),  # (with a tokenizer of its 128 ids)
                                  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 10 ** 6}))),
                       "end-of-sequence id(s) [1000000]"),  # (was: every request refused for "stop_ids")
    "index-types": (lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": 5}})), "not a safetensors index"),
}


def _config(d, **changes):
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, **changes}))


def _rewrite(d, drop=None, add=None, int8=None):
    from safetensors.numpy import load_file, save_file

    t = load_file(d / "model.safetensors")
    t.pop(drop, None)
    if add:
        t[add] = np.zeros((2, 2), np.float32)
    if int8:
        t[int8] = t[int8].astype(np.int8)
    save_file(t, d / "model.safetensors")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_directory_is_one_line(tmp_path, case):
    d = copy_fixture("qwen3", tmp_path / case)
    breaks, says = BAD[case]
    breaks(d)
    with pytest.raises(ValueError) as e:
        jaxgen.load(str(d))
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_directory_on_the_command_line_exits_2(tmp_path, capsys):
    d = copy_fixture("qwen3", tmp_path / "q")
    _config(d, model_type="falcon")
    assert cli.main(["generate", "hi", "--model", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_type 'falcon' is not supported" in err, err


def test_quant_from_safetensors_equals_quantizing_the_float_load(models):
    """--quant int8 from an HF directory: the same QMatrix leaves as quantizing the float load, and the
    same tokens as that quantized model."""
    from jaxgen import quant

    q = jaxgen.load(str(HF / "qwen3"), quant="int8")
    want = quant.quantize_params(jax.device_get(models("qwen3").params), "int8")  # on the host, as load does
    for a, b in zip(jax.tree.leaves(q.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompts = [c["prompt_ids"] for c in reference("qwen3")]
    same = jaxgen.Model(q.cfg, want)
    assert [g.tokens for g in jaxgen.generate(q, prompts, max_new_tokens=6, stop_ids=[])] == \
        [g.tokens for g in jaxgen.generate(same, prompts, max_new_tokens=6, stop_ids=[])]
