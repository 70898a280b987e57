"""LoRA adapters at sampling time (jaxgen.lora) and weight sync (jaxgen.reshard).

Contracts: PEFT adapters on tiny HF models generate HF + peft's greedy tokens (log-probs within 1e-4;
fixtures: tools/make_lora_fixtures.py); unmerged == merged; a mixed batch (two adapters and a row
without) == each row alone; stream, n, prefix, beam, speculative and multi-turn with an adapter equal
their plain forms; new adapter values and a new adapter of the same rank bucket do not recompile;
sharded (data=2, model=4) == one device; params resharded from an 8-device FSDP mesh generate what the
single-device params do; bad adapters and requests are one line each."""
import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxgen
from jaxgen import lora as L
from jaxgen import speculative
from jaxgen.engine import generate_jit
from jaxgen.model import Model, unstack_layers
from jaxgen.sharding import make_mesh, shard_params

from .conftest import TINY_GEMMA, random_params
from .test_cli import ckpt  # noqa: F401  (the module-scoped tiny checkpoint fixture)

FIX = pathlib.Path(__file__).parent / "fixtures"
ADAPTERS = ["llama-all", "llama-small", "qwen2-rslora", "gemma3_text-all", "gemma3-regex"]


def reference(name):
    return json.loads((FIX / "lora" / name / "reference.json").read_text())


@pytest.fixture(scope="module")
def hf_models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = jaxgen.load(str(FIX / "hf" / family))
        return cache[family]
    return get


@pytest.fixture(scope="module")
def llama(hf_models):
    """The tiny HF llama with its two adapters (every target at rank 4; q / v / down at rank 2)."""
    return hf_models("llama"), L.load_lora(FIX / "lora" / "llama-all"), L.load_lora(FIX / "lora" / "llama-small")


def prompts_of(ref):
    return [c["prompt_ids"] for c in ref["cases"]]


@pytest.mark.parametrize("name", ADAPTERS)
def test_equals_hf_peft_unmerged_and_merged(hf_models, name):
    """Greedy tokens equal HF + peft's, log-probs within 1e-4, unmerged (in the compiled loop) and
    merged into the weights; the teacher-forced score with the adapter equals the log-probs."""
    ref = reference(name)
    model = hf_models(ref["base"])
    adapter = L.load_lora(FIX / "lora" / name, model)
    got = jaxgen.generate(model, prompts_of(ref), max_new_tokens=10, stop_ids=[], lora=adapter)
    merged = dataclasses.replace(model, params=L.merge_lora(model.params, adapter))
    got_m = jaxgen.generate(merged, prompts_of(ref), max_new_tokens=10, stop_ids=[])
    for c, g, m in zip(ref["cases"], got, got_m):
        assert g.tokens == c["greedy_ids"] and m.tokens == c["greedy_ids"]
        np.testing.assert_allclose(g.logprobs, c["logprobs"], atol=1e-4)
        np.testing.assert_allclose(m.logprobs, g.logprobs, atol=1e-4)
    # score: the sequences' teacher-forced log-probs under the adapter (slot 1 of a one-adapter table)
    seqs = [c["prompt_ids"] + c["greedy_ids"] for c in ref["cases"]]
    T = max(map(len, seqs))
    toks = np.array([s + [0] * (T - len(s)) for s in seqs], np.int32)
    with_table = L.attach(model, adapter, len(seqs))
    lp = np.asarray(jaxgen.score(with_table.params, toks, np.array([len(s) for s in seqs]), model.cfg,
                                 adapters=np.ones(len(seqs), np.int32)))
    for i, c in enumerate(ref["cases"]):
        n = len(c["prompt_ids"])
        np.testing.assert_allclose(lp[i, n - 1:n - 1 + 10], c["logprobs"], atol=1e-4)


def test_mixed_batch_equals_each_row_alone(llama):
    """Two adapters and a row without one in one batch: each row's tokens and log-probs are those of
    the row alone with its adapter (and of HF + peft / HF for it)."""
    model, a, b = llama
    ra, rb = reference("llama-all"), reference("llama-small")
    base = json.loads((FIX / "hf" / "llama" / "reference.json").read_text())["cases"]
    ps = prompts_of(ra)
    mixed = jaxgen.generate(model, ps, max_new_tokens=10, stop_ids=[], lora=[a, b, None])
    alone = [jaxgen.generate(model, [p], max_new_tokens=10, stop_ids=[], lora=ad)[0]
             for p, ad in zip(ps, [a, b, None])]
    assert [m.tokens for m in mixed] == [x.tokens for x in alone] == [
        ra["cases"][0]["greedy_ids"], rb["cases"][1]["greedy_ids"], base[2]["greedy_ids"]]
    for m, x in zip(mixed, alone):
        np.testing.assert_allclose(m.logprobs, x.logprobs, atol=1e-5)


def test_modes_with_an_adapter_equal_their_plain_forms(llama):
    """stream == generate; n samples == the prompt repeated; a prefix == prepended; beam search with
    one beam... (K beams: equal to the merged model's beams); prompt-lookup speculative decoding ==
    plain; a Conversation's turns == generate on the whole history, rows keeping their adapters."""
    model, a, b = llama
    merged = dataclasses.replace(model, params=L.merge_lora(model.params, a))
    ps = prompts_of(reference("llama-all"))
    kw = dict(max_new_tokens=10, stop_ids=[])
    plain = jaxgen.generate(model, ps, lora=[a, b, None], **kw)
    last = list(jaxgen.stream(model, ps, chunk_steps=3, lora=[a, b, None], **kw))[-1]
    assert [list(last.tokens[i, :10]) for i in range(3)] == [c.tokens for c in plain]
    many = jaxgen.generate(model, ps[:2], n=3, temperature=1.0, seed=7, lora=[a, b], **kw)
    rep = jaxgen.generate(model, [ps[0]] * 3 + [ps[1]] * 3, temperature=1.0, seed=7, lora=[a] * 3 + [b] * 3, **kw)
    assert [c.tokens for c in many] == [c.tokens for c in rep]
    pre = jaxgen.generate(model, [p[3:] for p in ps], prefix=ps[0][:3], lora=a, **kw)
    whole = jaxgen.generate(model, [ps[0][:3] + p[3:] for p in ps], lora=a, **kw)
    assert [c.tokens for c in pre] == [c.tokens for c in whole]
    shared = jaxgen.prefill_prefix(model, ps[0][:3], lora=a)
    assert [c.tokens for c in jaxgen.generate(model, [p[3:] for p in ps], prefix=shared, lora=a, **kw)] == \
        [c.tokens for c in whole]
    beams = jaxgen.generate(model, ps, num_beams=3, return_beams=True, lora=a, **kw)
    beams_m = jaxgen.generate(merged, ps, num_beams=3, return_beams=True, **kw)
    assert [c.tokens for c in beams] == [c.tokens for c in beams_m]
    np.testing.assert_allclose([c.score for c in beams], [c.score for c in beams_m], atol=1e-4)
    spec, _ = speculative.generate(model, ps, speculative.parse("lookup,ngram=2,gamma=3"), lora=[a, b, None], **kw)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]
    conv = jaxgen.Conversation(model, max_len=64, lora=[a, None])
    conv.generate(ps[:2], max_new_tokens=4, stop_ids=[])
    second = conv.generate([[5, 6], [7]], max_new_tokens=4, stop_ids=[])
    h = conv.histories()
    hist = [list(h["tokens"][i, :h["lengths"][i] - 4]) for i in range(2)]
    assert [c.tokens for c in second] == [c.tokens for c in jaxgen.generate(model, hist, lora=[a, None], max_new_tokens=4,
                                                                             stop_ids=[])]


def test_new_adapters_of_a_bucket_do_not_recompile(llama, compile_counter):
    """The table's values are traced: new values, and another adapter of the same rank bucket and
    targets, reuse the compiled program (counted); another rank bucket compiles once more."""
    model, a, _ = llama
    ps = prompts_of(reference("llama-all"))
    kw = dict(max_new_tokens=10, stop_ids=[])
    jaxgen.generate(model, ps, lora=a, **kw)
    size = generate_jit._cache_size()
    before = compile_counter.count("generate_tokens")
    other = L.random_adapter(model.cfg, jax.random.key(3), rank=3)  # rank 3 and 4: bucket 8
    scaled = a.replace(q=a.q.replace(b=2 * a.q.b))
    out = [jaxgen.generate(model, ps, lora=ad, **kw) for ad in (other, scaled)]
    assert generate_jit._cache_size() == size and compile_counter.count("generate_tokens") == before
    assert out[0][0].tokens != out[1][0].tokens  # (the adapters do change the output)
    jaxgen.generate(model, ps, lora=L.random_adapter(model.cfg, jax.random.key(4), rank=12), **kw)  # bucket 16
    assert generate_jit._cache_size() == size + 1


def test_sharded_equals_one_device_and_reshard_from_fsdp(tmp_path):
    """A random adapter on the tiny Gemma: a data=2, model=4 mesh generates what one device does; and
    params resharded from an 8-device FSDP layout (bf16 cast back to the model's f32, stacked layers)
    into that mesh generate exactly what the single-device params do, adapters included."""
    cfg = TINY_GEMMA
    params = random_params(cfg)
    one = Model(cfg, params)
    ad = L.random_adapter(cfg, jax.random.key(1), rank=4, scale=2.0)
    ad2 = L.random_adapter(cfg, jax.random.key(2), rank=2, targets=("q", "v", "down"), scale=2.0)
    ps = [[1, 5, 9, 3], [2, 7, 7, 7, 7, 4, 1], [3, 3, 8]]
    kw = dict(max_new_tokens=12, stop_ids=[], lora=[ad, None, ad2])
    want = jaxgen.generate(one, ps, **kw)
    mesh = make_mesh("data=2,model=4")
    sharded = Model(cfg, shard_params(params, cfg, mesh), mesh=mesh)
    got = jaxgen.generate(sharded, ps, **kw)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
    # a trainer's state: every leaf split on its first axis over 8 devices (FSDP), per-layer layout
    fsdp = make_mesh("data=8")
    train = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(fsdp, P("data") if a.shape[0] % 8 == 0 else P())),
                         unstack_layers(params))
    synced = jaxgen.reshard(train, sharded)
    assert jax.tree.structure(synced) == jax.tree.structure(sharded.params)
    assert all(x.sharding == y.sharding for x, y in zip(jax.tree.leaves(synced), jax.tree.leaves(sharded.params)))
    again = jaxgen.generate(dataclasses.replace(sharded, params=synced), ps, **kw)
    assert [c.tokens for c in again] == [c.tokens for c in want]
    # the adapter too: onto the mesh, replicated, in the model's dtype
    moved = jaxgen.reshard(ad, sharded)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(moved))
    # bf16 training params into a f32 sampler: cast on the source devices
    half = jaxgen.reshard(jax.tree.map(lambda a: a.astype(jnp.bfloat16), train), one)
    assert jax.tree.leaves(half)[0].dtype == jnp.float32 and isinstance(half.layers, type(one.params.layers))
    with pytest.raises(ValueError, match="do not fit"):
        jaxgen.reshard(random_params(dataclasses.replace(cfg, d_ff=32)), one)


def test_save_load_round_trip_and_bad_adapters(llama, tmp_path):
    """save_lora writes a PEFT directory that load_lora reads back as the same adapter; every adapter
    jaxgen cannot apply exactly is refused with one line naming the problem."""
    model, a, _ = llama
    ad = L.load_lora(L.save_lora(a, tmp_path / "rt"))
    for t in a.targets:
        np.testing.assert_allclose(np.asarray(getattr(ad, t).a) @ np.asarray(getattr(ad, t).b),
                                   np.asarray(getattr(a, t).a) @ np.asarray(getattr(a, t).b), atol=1e-6)

    def variant(edit=None, tensors=None):
        d = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(FIX / "lora" / "llama-all", d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **(edit or {})}))
        if tensors:
            from safetensors.numpy import load_file, save_file

            save_file(tensors(load_file(d / "adapter_model.safetensors")), d / "adapter_model.safetensors")
        return d

    bad = {
        "use_dora": variant({"use_dora": True}),
        "modules_to_save": variant({"modules_to_save": ["lm_head"]}),
        "rank_pattern": variant({"rank_pattern": {"q_proj": 2}}),
        "rewrites the base weights": variant({"init_lora_weights": "pissa"}),
        "peft_type": variant({"peft_type": "IA3"}),
        "not a LoRA pair": variant(tensors=lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A":
                                                      np.zeros((4, 128), np.float32)}),
        "but not its pair": variant(tensors=lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj.lora_B" not in k}),
        "expected": variant({"r": 8}),
        "no adapter_config.json": tmp_path,
        # (these four were a NaN scale, an AttributeError, a SafetensorError and a MemoryError)
        "lora_alpha must be a finite number": variant({"lora_alpha": float("nan")}),
        "past any model's depth": variant(tensors=lambda t: {k.replace("layers.1.", "layers.99999999."): v
                                                               for k, v in t.items()}),
    }
    d = variant()
    (d / "adapter_config.json").write_text("[]")
    bad["must be a JSON object"] = d
    d = variant()
    (d / "adapter_model.safetensors").write_bytes(b"garbage")
    bad["corrupt safetensors"] = d
    for words, d in bad.items():
        with pytest.raises(ValueError, match=words):
            L.load_lora(d)
    with pytest.raises(ValueError, match="past the model's 2 layers"):
        L.load_lora(variant(tensors=lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}), model)
    with pytest.raises(ValueError, match="another model"):  # a qwen2 adapter on the llama
        L.load_lora(FIX / "lora" / "qwen2-rslora", model)
    ps = prompts_of(reference("llama-all"))
    for lora, words in (([a], "1 entries but there are 3 prompts"), ("x", "is a name"),
                        ([a, None, 3], "an adapter from jaxgen.load_lora")):
        with pytest.raises(ValueError, match=words):
            jaxgen.generate(model, ps, max_new_tokens=4, lora=lora)
    with pytest.raises(ValueError, match="cannot continue the same prefix"):
        jaxgen.generate(model, ps, prefix=[1, 2], max_new_tokens=4, lora=[a, None, a])
    with pytest.raises(ValueError, match="another LoRA adapter"):
        jaxgen.generate(model, ps, prefix=jaxgen.prefill_prefix(model, [1, 2], lora=a), max_new_tokens=4,
                        lora=L.load_lora(FIX / "lora" / "llama-small"))
    with pytest.raises(ValueError, match="merge, then"):
        from jaxgen import quant

        L.merge_lora(quant.quantize_params(model.params), a)


def test_qwix_tree_converts_to_the_same_adapter(llama):
    """A qwix LoRA param tree in Tunix's layouts (einsum q [D, r] / [r, N, H], o [N, H, r] / [r, D],
    Gemma's kv_einsum [r, 2, K, H]; Linear gate / up / down [in, r] / [r, out]) converts to the adapter
    whose update is the same matrix."""
    model, a, _ = llama
    cfg = model.cfg
    N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    r = a.rank
    tree = {"layers": {}}
    for i in range(cfg.n_layers):
        lay = {"attn": {}, "mlp": {}}
        lay["attn"]["q_einsum"] = {"w_lora_a": a.q.a[i], "w_lora_b": a.q.b[i].reshape(r, N, H)}
        kv = np.stack([a.k.b[i].reshape(r, K, H), a.v.b[i].reshape(r, K, H)], axis=1)  # [r, 2, K, H]
        lay["attn"]["kv_einsum"] = {"w_lora_a": a.k.a[i], "w_lora_b": kv}
        lay["attn"]["attn_vec_einsum"] = {"w_lora_a": a.o.a[i].reshape(N, H, r), "w_lora_b": a.o.b[i]}
        for t in ("gate", "up", "down"):
            lay["mlp"][f"{t}_proj"] = {"kernel_lora_a": getattr(a, t).a[i], "kernel_lora_b": getattr(a, t).b[i]}
        tree["layers"][str(i)] = lay
    got = L.from_qwix(tree, cfg)  # alpha defaults to rank: a scale of 1 (a's scale is already in b)
    for t in ("q", "o", "gate", "up", "down", "k"):
        np.testing.assert_allclose(got_update(got, t), got_update(a, t), atol=1e-6)
    # kv_einsum has one A for both: v's update is that A times v's half of B
    np.testing.assert_allclose(got_update(got, "v"), np.einsum("lir,lro->lio", a.k.a, a.v.b), atol=1e-6)
    with pytest.raises(ValueError, match="not a decoder layer"):
        L.from_qwix({"layers": {"0": {"attn": {"weird": {"w_lora_a": np.zeros((D, r)), "w_lora_b": np.zeros((r, D))}}}}},
                    cfg)


def got_update(adapter, t):
    w = getattr(adapter, t)
    return np.einsum("lir,lro->lio", np.asarray(w.a), np.asarray(w.b))


def test_lora_on_the_command_line_and_in_batch_rows(ckpt, tmp_path, capsys):  # noqa: F811
    """`jaxgen generate --lora DIR` applies one adapter; `jaxgen batch --lora a=DIR --lora b=DIR` runs
    rows naming them (and rows without) with each row's tokens generate()'s, refill and static; bad
    adapters and names are one line (exit 2) before the model loads; Ray takes the same option."""
    from jaxgen import cli
    from jaxgen import ray as jray
    from jaxgen.batch import row_seed
    from jaxgen.checkpoint import registry

    ck = str(ckpt[2])
    model = registry.load(ck)
    da = L.save_lora(L.random_adapter(model.cfg, jax.random.key(5), rank=4, scale=3.0), tmp_path / "a")
    db = L.save_lora(L.random_adapter(model.cfg, jax.random.key(6), rank=2, targets=("v", "up"), scale=3.0),
                     tmp_path / "b")
    A, B = L.load_lora(da), L.load_lora(db)
    want = jaxgen.generate(model, ["the cat"], max_new_tokens=6, stop_ids=[], lora=A)[0].tokens
    assert want != jaxgen.generate(model, ["the cat"], max_new_tokens=6, stop_ids=[])[0].tokens
    assert cli.main(["generate", "the cat", "--model", ck, "--json", "--max-new-tokens", "6", "--ignore-stop",
                     "--lora", str(da)]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == want

    rows = [{"id": "x", "prompt": "the cat", "lora": "a"}, {"id": "y", "prompt": "a dog sat", "lora": "b"},
            {"id": "z", "prompt": "the mat", "temperature": 0.9}, {"id": "w", "prompt": "a cat", "lora": "a", "seed": 3}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ad = {"a": A, "b": B}
    expect = {r["id"]: jaxgen.generate(model, [r["prompt"]], max_new_tokens=6, stop_ids=[], temperature=r.get("temperature", 0.0),
                                       seed=[row_seed(r.get("seed", 0), r["id"])], lora=ad.get(r.get("lora")))[0].tokens
              for r in rows}
    for i, extra in enumerate(([], ["--no-refill"])):
        out = tmp_path / f"out{i}.jsonl"
        assert cli.main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", ck,
                         "--max-new-tokens", "6", "--ignore-stop", "--batch-size", "2", "--lora", f"a={da}",
                         "--lora", f"b={db}", *extra]) == 0
        assert {r["id"]: r["tokens"] for r in map(json.loads, open(out))} == expect, extra

    capsys.readouterr()
    dora = tmp_path / "dora"
    shutil.copytree(da, dora)
    (dora / "adapter_config.json").write_text(json.dumps({**json.loads((da / "adapter_config.json").read_text()),
                                                          "use_dora": True}))
    gen = ["generate", "hi", "--model", "/nonexistent/model.gguf"]
    bat = ["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--model",
           "/nonexistent/model.gguf"]
    for argv, words in ((gen + ["--lora", str(tmp_path / "none")], "not a PEFT adapter directory"),
                        (gen + ["--lora", f"a={da}", "--lora", f"b={db}"], "applies one adapter to every prompt"),
                        (gen + ["--lora", f"a={da}", "--lora", f"a={db}"], "the name 'a' is given twice"),
                        (gen + ["--lora", str(dora)], "use_dora"),
                        (bat + ["--lora", f"a={da}"], "no --lora NAME=DIR gives: b"),
                        (bat + ["--lora", f"a={da}", "--lora", f"b={db}", "--lora", f"c={db}"], "--lora c: no row names it")):
        assert cli.main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and words in err, err
    assert jray.batch_args(model=ck, lora=[f"a={da}"]).lora == [f"a={da}"]
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        jray.batch_args(model=ck, lora=f"a={tmp_path / 'none'}")


def test_qwix_lora_of_a_tunix_model_equals_tunix_merge(tmp_path):
    """A real qwix LoRA: Tunix's Qwen3 loaded from the tiny HF qwen3 fixture, `qwix.apply_lora_to_model`
    on every projection (random A and B, alpha 8, rank 4). jaxgen with `from_qwix(nnx.state(model,
    nnx.LoRAParam))` unmerged equals the HF directory Tunix's own `save_lora_merged_model_as_safetensors`
    writes (tokens identical, log-probs within 1e-4), and differs from the base model."""
    pytest.importorskip("tunix")
    qwix = pytest.importorskip("qwix")
    from flax import nnx
    from tunix.models.qwen3 import model as qm
    from tunix.models.qwen3 import params as qp

    fix = FIX / "hf" / "qwen3"
    tcfg = qm.ModelConfig(num_layers=2, vocab_size=128, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=16,
                          num_kv_heads=2, rope_theta=10000, norm_eps=1e-6, use_tied_embedding=True)
    tunix_model = qp.create_model_from_safe_tensors(str(fix), tcfg)
    provider = qwix.LoraProvider(module_path=".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", rank=4,
                                 alpha=8.0)
    lm = qwix.apply_lora_to_model(tunix_model, provider, rngs=nnx.Rngs(0), **tunix_model.get_model_input())
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(lm, nnx.LoRAParam))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(lm, jax.tree.unflatten(treedef, [  # qwix's lora_b starts at zero: draw both
        jax.random.normal(k, v.shape) / np.sqrt(v.shape[0] if "lora_a" in jax.tree_util.keystr(p) else 4)
        for (p, v), k in zip(leaves, keys)]))
    qp.save_lora_merged_model_as_safetensors(str(fix), str(tmp_path / "merged"), lm, rank=4, alpha=8.0)
    base, merged = jaxgen.load(str(fix)), jaxgen.load(str(tmp_path / "merged"))
    adapter = L.from_qwix(nnx.state(lm, nnx.LoRAParam), base.cfg, alpha=8.0)
    assert adapter.targets == L.TARGETS and adapter.rank == 4
    ps = [c["prompt_ids"] for c in json.loads((fix / "reference.json").read_text())["cases"]]
    kw = dict(max_new_tokens=10, stop_ids=[])
    got = jaxgen.generate(base, ps, lora=adapter, **kw)
    want = jaxgen.generate(merged, ps, **kw)
    assert [c.tokens for c in got] == [c.tokens for c in want] != [c.tokens for c in jaxgen.generate(base, ps, **kw)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)


def test_dense_and_gathered_tables_give_each_row_its_adapter(monkeypatch):
    """Both ways of applying a table (masked dense columns for small tables, a per-row gather for
    large ones) equal each row's own (x @ A) @ B, slot 0 (no adapter) giving zero."""
    k = jax.random.split(jax.random.key(0), 4)
    M, I, R, O, B, T = 4, 6, 3, 5, 7, 2
    w = L.LoraWeights(a=jax.random.normal(k[0], (M, I, R)).at[0].set(0), b=jax.random.normal(k[1], (M, R, O)).at[0].set(0))
    x = jax.random.normal(k[2], (B, T, I))
    rows = jnp.array([0, 1, 2, 3, 3, 1, 0])
    want = np.stack([np.asarray(x[i] @ w.a[r] @ w.b[r]) for i, r in enumerate(rows.tolist())])
    for columns in (M * R, 0):  # dense, then gathered
        monkeypatch.setattr(L, "DENSE_COLUMNS", columns)
        np.testing.assert_allclose(np.asarray(L.delta(x, w, rows)), want, rtol=1e-5, atol=1e-5)
