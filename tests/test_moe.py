"""Mixture-of-experts models (jaxgen.moe): tiny random Qwen3-MoE and Mixtral HF checkpoints against HF
transformers (tools/make_moe_fixtures.py), the grouped (ragged_dot), gathered, picked, looped and dense computations
against each other, a data=2,model=4 mesh (experts split over `model`) against one device, the other
decoding modes on an MoE model, and bad configs as one line."""
import dataclasses
import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

import jaxgen
from jaxgen import backend, moe, speculative
from jaxgen.checkpoint import hf
from jaxgen.config import ModelConfig
from jaxgen.model import LayerParams
from jaxgen.sharding import make_mesh

HF = pathlib.Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ["qwen3_moe", "mixtral"]


def reference(family):
    return json.loads((HF / family / "reference.json").read_text())["cases"]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family, **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = jaxgen.load(str(HF / family), **kw)
        return cache[key]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_hf_with_every_expert_computation(models, family):
    """Greedy tokens equal HF transformers', log-probs within 1e-4, with the experts computed grouped
    (ragged_dot), gathered and dense; both config.json forms read as one config."""
    model = models(family)
    cfg = model.cfg
    assert cfg.n_experts == (8 if family == "qwen3_moe" else 4) and cfg.n_experts_per_tok == 2
    assert cfg.norm_topk_prob == (family == "mixtral")
    published = json.loads((HF / family / "config.published.json").read_text())
    assert hf.config_from_hf(published) == hf.config_from_hf(json.loads((HF / family / "config.json").read_text()))
    cases = reference(family)
    for impl in ("grouped", "gathered", "picked", "looped", "dense"):
        m = dataclasses.replace(model, paths=backend.REFERENCE.replace(moe=impl))
        got = jaxgen.generate(m, [c["prompt_ids"] for c in cases], max_new_tokens=10, stop_ids=[])
        for c, g in zip(cases, got):
            assert g.tokens == c["greedy_ids"], impl
            np.testing.assert_allclose(g.logprobs, c["logprobs"], atol=1e-4)


def _random_layer(cfg, key, tie_router=False):
    k = jax.random.split(key, 4)
    E, D, Fe = cfg.n_experts, cfg.d_model, cfg.d_ff_expert
    router = jax.random.normal(k[0], (D, E)) / np.sqrt(D)
    if tie_router:  # experts 1 and 2 score the same: ties everywhere
        router = router.at[:, 2].set(router[:, 1])
    return LayerParams(attn_norm=None, wq=None, wk=None, wv=None, wo=None, ffn_norm=None, w_gate=None, w_up=None,
                       w_down=None, router=router, we_gate=jax.random.normal(k[1], (E, D, Fe)) / np.sqrt(D),
                       we_up=jax.random.normal(k[2], (E, D, Fe)) / np.sqrt(D),
                       we_down=jax.random.normal(k[3], (E, Fe, D)) / np.sqrt(Fe))


@pytest.mark.parametrize("norm", [False, True])
def test_grouped_gathered_dense_agree(norm):
    """On random inputs: the three computations give the same [B, T, D], including experts no token
    picks (many experts, few tokens), router ties (two equal columns) and a single token."""
    cfg = ModelConfig(name="moe", vocab_size=16, d_model=12, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=6, d_ff=8,
                      max_seq_len=32, n_experts=16, n_experts_per_tok=3, d_ff_expert=5, norm_topk_prob=norm)
    for i, (B, T, tie) in enumerate(((1, 1, False), (2, 3, False), (4, 16, False), (3, 5, True))):
        lp = _random_layer(cfg, jax.random.key(i), tie)
        h = jax.random.normal(jax.random.key(100 + i), (B, T, cfg.d_model))
        outs = {impl: np.asarray(moe.mlp(cfg, h, lp, impl)) for impl in moe.IMPLS}
        np.testing.assert_allclose(outs["grouped"], outs["dense"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(outs["gathered"], outs["dense"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(outs["looped"], outs["dense"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(outs["picked"], outs["dense"], rtol=1e-5, atol=1e-5)
        w, e = moe.route(cfg, h.reshape(B * T, -1), lp.router)
        if B * T <= 2:
            assert len(set(np.asarray(e).ravel().tolist())) < cfg.n_experts  # some experts unpicked
        if tie:  # equal scores: the lower index is taken first, in every computation
            both = np.asarray((e == 1).any(-1) & (e == 2).any(-1))
            first = np.asarray(e)[both]
            assert (np.argmax(first == 1, -1) < np.argmax(first == 2, -1)).all()
        np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6) if norm else None
    assert moe.choose(cfg, 1) == "picked" and moe.choose(cfg, 64) == "looped"  # (on CPU; gathered / grouped elsewhere)


@pytest.mark.parametrize("jit", ["jax.jit", "backend.jit", "jax.jit(backend.jit)", "backend.jit(backend.jit)"])
@pytest.mark.parametrize("impl", ["picked", "looped"])
def test_bfloat16_experts_are_not_copied_whole(impl, jit):
    """picked / looped (CPU's computations) inside a loop, as in decode, on bfloat16 experts: the compiled
    program's temporary memory stays below the experts' own bytes, and the output equals the float32
    computation on the same (bf16-rounded) weights, both in a user's own jax.jit (XLA:CPU's bfloat16
    normalization on: indexing w[j] there made it convert every stacked expert array to float32 before
    the loop, 1.2 MB of temporaries here, so moe._expert switches over static slices) and in jaxgen's
    programs (backend.jit: the normalization is off, w[j] is read in place, and the program has no
    E-way switch, whose branches cost ~4 s of compile per layer at 128 experts). A backend.jit program
    called inside another jit is traced as part of the outer one: it switches only in a plain jax.jit."""
    cfg = ModelConfig(name="moe", vocab_size=16, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32,
                      d_ff=8, max_seq_len=32, n_experts=32, n_experts_per_tok=2, d_ff_expert=48)
    lp = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), _random_layer(cfg, jax.random.key(0)))
    h = jax.random.normal(jax.random.key(1), (2, 1, cfg.d_model)).astype(jax.numpy.bfloat16)
    steps = lambda lp, h: jax.lax.fori_loop(0, 3, lambda i, x: moe.mlp(cfg, x, lp, impl), h)
    expert_bytes = sum(getattr(lp, n).nbytes for n in ("we_gate", "we_up", "we_down"))
    outer, _, inner = jit.rstrip(")").partition("(")
    program = backend.jit(steps) if inner else steps
    compiled = (jax.jit if outer == "jax.jit" else backend.jit)(lambda *a: program(*a)).lower(lp, h).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < expert_bytes / 2, (temp, expert_bytes)
    switches = [len(m.group(1).split(",")) for m in re.finditer(r"branch_computations=\{([^}]*)\}", compiled.as_text())]
    assert (cfg.n_experts in switches) == (outer == "jax.jit"), switches
    as_f32 = jax.tree.map(lambda a: a.astype(np.float32), lp)
    ref = jax.lax.fori_loop(0, 3, lambda i, x: moe.mlp(cfg, x, as_f32, "dense").astype(jax.numpy.bfloat16)
                            .astype(np.float32), h.astype(np.float32))
    np.testing.assert_allclose(np.asarray(compiled(lp, h), np.float32), np.asarray(ref), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_mesh_equals_one_device(models, family):
    """Loaded onto a data=2,model=4 mesh (each device reads its slice; experts split over model): the
    same greedy tokens and log-probs as one device, grouped, gathered, picked and looped."""
    one = models(family)
    mesh = make_mesh("data=2,model=4")
    sharded = models(family, mesh=mesh)
    spec = sharded.params.layers[0].we_gate.sharding.spec
    assert spec[0] == "model", spec  # [E, D, Fe] split on E
    cases = reference(family)
    ps = [c["prompt_ids"] for c in cases]
    for impl in ("grouped", "gathered", "picked", "looped"):
        paths = backend.REFERENCE.replace(moe=impl)
        want = jaxgen.generate(dataclasses.replace(one, paths=paths), ps, max_new_tokens=8, stop_ids=[])
        got = jaxgen.generate(dataclasses.replace(sharded, paths=paths), ps, max_new_tokens=8, stop_ids=[])
        assert [c.tokens for c in got] == [c.tokens for c in want]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)


def test_decoding_modes_on_an_moe_model(models):
    """n samples == the prompt repeated; a prefix == prepended; beam search; prompt-lookup speculative
    decoding == plain greedy; a stop id and a multi-turn Conversation, on Qwen3-MoE."""
    model = models("qwen3_moe")
    ps = [c["prompt_ids"] for c in reference("qwen3_moe")]
    kw = dict(max_new_tokens=8, stop_ids=[])
    plain = jaxgen.generate(model, ps, **kw)
    many = jaxgen.generate(model, ps[:1], n=3, temperature=1.0, seed=3, **kw)
    assert [c.tokens for c in many] == [c.tokens for c in jaxgen.generate(model, ps[:1] * 3, temperature=1.0, seed=3,
                                                                          **kw)]
    pre = jaxgen.generate(model, [p[2:] for p in ps], prefix=ps[0][:2], **kw)
    assert [c.tokens for c in pre] == [c.tokens for c in jaxgen.generate(model, [ps[0][:2] + p[2:] for p in ps], **kw)]
    spec, _ = speculative.generate(model, ps, speculative.parse("lookup,ngram=2,gamma=3"), **kw)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]
    beams = jaxgen.generate(model, ps, num_beams=2, **kw)
    assert all(len(c.tokens) == 8 and c.score is not None for c in beams)
    conv = jaxgen.Conversation(model, max_len=64)
    conv.generate(ps[:2], max_new_tokens=4, stop_ids=[])
    second = conv.generate([[5, 6], [7]], max_new_tokens=4, stop_ids=[])
    h = conv.histories()
    hist = [list(h["tokens"][i, :h["lengths"][i] - 4]) for i in range(2)]
    assert [c.tokens for c in second] == [c.tokens for c in jaxgen.generate(model, hist, max_new_tokens=4, stop_ids=[])]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_experts_equal_their_dequantized_floats(models, mode):
    """quant="int8" / "int4" quantizes the experts too ([E, I, O] per expert, the router float): each
    computation gives the tokens (and log-probs within 1e-4) of the float model whose weights are the
    quantized ones dequantized; on a data=2,model=4 mesh too (experts' integers and scales split on E)."""
    from jaxgen import quant

    model = models("qwen3_moe", quant=mode)
    lp = model.params.layers
    assert isinstance(lp.we_gate, quant.QMatrix) and not isinstance(lp.router, quant.QMatrix)
    assert lp.we_gate.q.shape[:2] == (2, 8)  # [L, E, ...]
    deq = jax.tree.map(lambda a: quant.dequantize(a) if isinstance(a, quant.QMatrix) else a, model.params,
                       is_leaf=lambda a: isinstance(a, quant.QMatrix))
    deq = deq.replace(embed=deq.embed.T, unembed=None if deq.unembed is None else deq.unembed.T)  # [D, V] -> [V, D]
    floats = dataclasses.replace(model, params=deq)
    ps = [c["prompt_ids"] for c in reference("qwen3_moe")]
    want = jaxgen.generate(floats, ps, max_new_tokens=8, stop_ids=[])
    for impl in ("grouped", "gathered", "picked", "looped", "dense"):
        got = jaxgen.generate(dataclasses.replace(model, paths=backend.REFERENCE.replace(moe=impl)), ps,
                              max_new_tokens=8, stop_ids=[])
        for g, w in zip(got, want):
            assert g.tokens == w.tokens, impl
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
    sharded = jaxgen.load(str(HF / "qwen3_moe"), quant=mode, mesh=make_mesh("data=2,model=4"))
    assert sharded.params.layers.we_gate.q.sharding.spec[1] == "model"
    assert [c.tokens for c in jaxgen.generate(sharded, ps, max_new_tokens=8, stop_ids=[])] == [w.tokens for w in want]


def with_tokenizer(family, dst: pathlib.Path) -> pathlib.Path:
    """The tiny MoE fixture with a character tokenizer of its 128 ids (ASCII; "</s>" = id 2 ends), so
    text prompts, stop strings, constraints and `jaxgen batch` rows run on it."""
    from tokenizers import Tokenizer, decoders, models

    _copy(family, dst)
    vocab = {chr(i): i for i in range(128)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    for c in ("\x00", "\x01", "\x02"):
        del vocab[c]
    tk = Tokenizer(models.BPE(vocab, [], unk_token="<pad>"))
    tk.decoder = decoders.Fuse()  # characters concatenate (no spaces between tokens)
    tk.add_special_tokens(["<pad>", "<s>", "</s>"])
    tk.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>",
                                                            "pad_token": "<pad>", "add_bos_token": False}))
    return dst


def test_constraints_and_jaxgen_batch_on_an_moe_model(tmp_path):
    """Structured output on an MoE model: a regex, choices and a JSON schema hold, with the same tokens as
    the dense all-experts reference computation; `jaxgen batch` (refill, per-row knobs and constraints)
    == generate row by row."""
    from jaxgen import cli

    d = with_tokenizer("qwen3_moe", tmp_path / "moe")
    model = jaxgen.load(str(d))
    dense = dataclasses.replace(model, paths=backend.current().replace(moe="dense"))
    prompts = ["the cat", "a dog sat", "x"]
    kw = dict(max_new_tokens=12, regex=[r"[a-c]{2,5}!", None, r"(yes|no)"], choices=[None, ["red", "green"], None])
    got = jaxgen.generate(model, prompts, **kw)
    assert [c.tokens for c in got] == [c.tokens for c in jaxgen.generate(dense, prompts, **kw)]
    assert re.fullmatch(r"[a-c]{2,5}!", got[0].text) and got[1].text in ("red", "green")
    assert re.fullmatch(r"yes|no", got[2].text)
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}  # (bounded: a random model would write integers forever)
    (js,) = jaxgen.generate(model, ["{"], max_new_tokens=16, json_schema=schema)
    assert js.finish_reason == "stop" and isinstance(json.loads(js.text)["a"], bool)
    rows = [{"id": i, "prompt": p, "temperature": 0.7 * (i % 2), "seed": i} for i, p in enumerate(prompts * 3)]
    rows[1]["choices"], rows[4]["regex"], rows[6]["stop"] = ["red", "green"], "[a-c]{2,5}!", ["a"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                     "--model", str(d), "--max-new-tokens", "8", "--batch-size", "4"]) == 0
    out = {r["id"]: r for r in map(json.loads, open(tmp_path / "out.jsonl"))}
    from jaxgen.batch import row_seed

    for r in rows:  # (a row's seed is derived from its seed and id: jaxgen.batch; a list: that row's own)
        knobs = {k: v for k, v in r.items() if k not in ("id", "prompt")} | {"seed": [row_seed(r["seed"], r["id"])]}
        (want,) = jaxgen.generate(model, [r["prompt"]], max_new_tokens=8, **knobs)
        assert out[r["id"]]["tokens"] == want.tokens and out[r["id"]]["text"] == want.text, r


def _copy(family, dst: pathlib.Path, edit=None) -> pathlib.Path:
    shutil.copytree(HF / family, dst)
    if edit:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_moe_checkpoints_are_one_line(tmp_path):
    """experts per token > experts, dense layers among sparse ones, shared experts, a missing expert
    tensor: one ValueError line naming it."""
    cases = {
        "num_experts_per_tok 9 must be at most": ("qwen3_moe", lambda c: c.update(num_experts_per_tok=9)),
        "dense MLP layers among the sparse ones": ("qwen3_moe", lambda c: c.update(mlp_only_layers=[1])),
        "decoder_sparse_step 2": ("qwen3_moe", lambda c: c.update(decoder_sparse_step=2)),
        "shared experts": ("qwen3_moe", lambda c: c.update(shared_expert_intermediate_size=16)),
    }
    for i, (words, (family, edit)) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=words):
            jaxgen.load(str(_copy(family, tmp_path / str(i), edit)))
    d = _copy("mixtral", tmp_path / "missing")
    from safetensors.numpy import load_file, save_file

    files = sorted(d.glob("*.safetensors"))
    t = load_file(files[0])
    gone = next(k for k in t if "experts" in k)
    save_file({k: v for k, v in t.items() if k != gone}, files[0])
    with pytest.raises(ValueError, match="missing tensor"):
        jaxgen.load(str(d))
    with pytest.raises(ValueError, match="n_experts_per_tok"):
        ModelConfig(name="x", vocab_size=8, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=4, d_ff=4,
                    max_seq_len=8, n_experts=2, n_experts_per_tok=3, d_ff_expert=4)
