"""jaxgen as an lm-evaluation-harness model (jaxgen.lm_eval) == lm-eval's own hf backend.

Contract: on the local tasks of tests/lm_eval_tasks.py (multiple choice, loglikelihood with an empty
context, generation with `until`, rolling perplexity; max_length 64 so long documents are truncated and
windowed), every request's answer equals what lm-eval's hf backend (HFLM) gave on the same weights
(tests/fixtures/lm_eval/<model>.json, tools/make_lm_eval_fixtures.py: the GGUF exported as an HF
directory, float32, log-softmax in float64: see the tool for why): the request arguments identical (prompts, chat-templated ones included),
log-likelihoods within 1e-4, is-greedy flags and generated texts identical, hence the metrics. A rolling
request's answer is a whole document's sum (lm-eval returns no per-window values): within 1e-5 of it,
relative (float rounding of each of its tokens adds up).
`model.score_spans` (the scorer) == the full forward's log-probs, chunked == unchunked.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

import jaxgen  # noqa: E402
from jaxgen import model as M  # noqa: E402
from jaxgen.lm_eval import JaxgenLM  # noqa: E402
from tests.conftest import TINY_GEMMA, random_params  # noqa: E402
from tests.lm_eval_tasks import MAX_LENGTH, configs  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "lm_eval"
TOL = 1e-4  # measured 3.9e-5 (Gemma 3) / 2.5e-5 (SmolLM2)
ROLLING_RTOL = 1e-5  # measured 1.7e-6 (the largest absolute: 2.0e-4 of -259.8, a 93-token document)


def reference(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def loaded(name):
    try:
        return jaxgen.load(name, "float32")
    except jaxgen.checkpoint.ModelNotInstalledError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2():
    return loaded("smollm2-135m")


def evaluate(lm, tasks, chat=False):
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True, apply_chat_template=chat,
                                  task_manager=TaskManager(), random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0)
    return {t["task"]: {"metrics": res["results"][t["task"]],
                        "samples": json.loads(json.dumps(sorted(res["samples"][t["task"]], key=lambda s: s["doc_id"]),
                                                         default=str))}
            for t in tasks}


def assert_same(got, want):
    """Per request: same arguments, log-likelihoods within TOL, flags and texts identical; metrics too."""
    for task, ref in want.items():
        samples = got[task]["samples"]
        assert [s["doc_id"] for s in samples] == [s["doc_id"] for s in ref["samples"]], task
        for s, r in zip(samples, ref["samples"]):
            assert s["arguments"] == r["arguments"], (task, s["doc_id"])
            for a, b in zip(s["resps"], r["resps"], strict=True):
                a, b = a[0], b[0]
                if isinstance(b, str):
                    assert a == b, (task, s["doc_id"], a, b)
                elif isinstance(b, list):  # loglikelihood: [log-prob, is greedy]
                    assert abs(a[0] - b[0]) <= TOL and a[1] == b[1], (task, s["doc_id"], a, b)
                else:  # rolling: a whole document's log-likelihood, a sum over its 24-93 tokens' rounding
                    assert abs(a - b) <= ROLLING_RTOL * abs(b), (task, s["doc_id"], a, b)
        for k, v in ref["metrics"].items():
            if "stderr" not in k:
                assert got[task]["metrics"][k] == pytest.approx(v, rel=TOL, abs=TOL), (task, k)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_tasks_equal_lm_evals_hf_backend(name, smollm2):
    model = smollm2 if name == "smollm2-135m" else loaded(name)
    lm = JaxgenLM(model=model, max_length=MAX_LENGTH, batch_size=8)
    assert_same(evaluate(lm, configs()), reference(name)["plain"])


def test_chat_templated_tasks_equal_hf(smollm2):
    ref = reference("smollm2-135m")
    lm = JaxgenLM(model=smollm2, max_length=MAX_LENGTH, batch_size=8)
    for c in ref["chat_templates"]:  # the text HFLM's apply_chat_template gives (transformers)
        assert lm.apply_chat_template(c["messages"], c["add_generation_prompt"]) == c["text"]
    assert_same(evaluate(lm, [t for t in configs() if t["task"] in ref["chat"]], chat=True), ref["chat"])


def test_hf_directory_by_registered_name(smollm2, tmp_path):
    """`model="jaxgen"` with model_args naming an HF directory (the one HFLM read) gives the same."""
    from jaxgen.checkpoint import hf_save

    hf_save.save(smollm2, tmp_path / "smollm2")
    ref = reference("smollm2-135m")["plain"]
    tasks = [t for t in configs() if t["task"] == "jaxgen_ll"]  # the directory's tokenizer: BOS rule, empty context
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model="jaxgen", model_args={"model": str(tmp_path / "smollm2"), "dtype": "float32",
                                                               "max_length": MAX_LENGTH}, batch_size=4,
                                  tasks=tasks, log_samples=True, task_manager=TaskManager(), bootstrap_iters=0)
    got = {t["task"]: {"metrics": res["results"][t["task"]],
                       "samples": json.loads(json.dumps(sorted(res["samples"][t["task"]], key=lambda s: s["doc_id"]),
                                                        default=str))} for t in tasks}
    assert_same(got, {t["task"]: ref[t["task"]] for t in tasks})


def test_sharded_over_a_mesh():
    """model_args mesh=data=2;model=4 (lm-eval splits model_args at commas): the same answers."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (conftest's host devices)")
    tasks = [t for t in configs() if t["task"] == "jaxgen_ll"]
    lm = JaxgenLM(model="smollm2-135m", dtype="float32", mesh="data=2;model=4", max_length=MAX_LENGTH, batch_size=8)
    assert lm.model.mesh is not None and lm.model.mesh.shape == {"data": 2, "model": 4}
    assert_same(evaluate(lm, tasks), {"jaxgen_ll": reference("smollm2-135m")["plain"]["jaxgen_ll"]})


def test_lora_directory_equals_the_merged_model(smollm2, tmp_path):
    """model_args lora=DIR (a PEFT directory) scores as the model with that adapter merged (merge_lora:
    == HF + peft, tests/test_lora.py)."""
    from jaxgen import lora

    adapter = lora.random_adapter(smollm2.cfg, jax.random.key(0), rank=4, scale=0.05)
    lora.save_lora(adapter, tmp_path / "adapter")
    tasks = [t for t in configs() if t["task"] == "jaxgen_ll"]
    got = evaluate(JaxgenLM(model="smollm2-135m", dtype="float32", lora=str(tmp_path / "adapter"),
                            max_length=MAX_LENGTH, batch_size=8), tasks)
    merged = jaxgen.Model(smollm2.cfg, jaxgen.merge_lora(smollm2.params, adapter, smollm2.cfg), smollm2.tokenizer)
    want = evaluate(JaxgenLM(model=merged, max_length=MAX_LENGTH, batch_size=8), tasks)
    plain = reference("smollm2-135m")["plain"]["jaxgen_ll"]["samples"]
    ll = lambda r: [s["resps"][0][0][0] for s in r["jaxgen_ll"]["samples"]]
    assert ll(got) == pytest.approx(ll(want), abs=1e-5)
    assert max(abs(a - s["resps"][0][0][0]) for a, s in zip(ll(got), plain)) > 1e-3  # the adapter changed them


def test_new_params_rescore_without_recompiling(smollm2, compile_counter):
    """A training loop's evals: update_params, same programs (compiles counted), the new weights' answers
    (== a fresh adapter over a Model holding them)."""
    tasks = [t for t in configs() if t["task"] == "jaxgen_ll"]
    lm = JaxgenLM(model=smollm2, max_length=MAX_LENGTH, batch_size=8)
    first = evaluate(lm, tasks)
    scaled = jax.tree.map(lambda x: x * 1.05 if jnp.issubdtype(x.dtype, jnp.floating) else x, smollm2.params)
    before = compile_counter.count()
    lm.update_params(scaled)
    second = evaluate(lm, tasks)
    assert compile_counter.count() == before
    fresh = evaluate(JaxgenLM(model=jaxgen.Model(smollm2.cfg, scaled, smollm2.tokenizer), max_length=MAX_LENGTH,
                              batch_size=8), tasks)
    ll = lambda r: [s["resps"][0][0][0] for s in r["jaxgen_ll"]["samples"]]
    assert ll(second) == ll(fresh) and ll(second) != ll(first)


@pytest.mark.parametrize("T,chunk,piece", [(16, 512, 2 ** 27), (64, 16, 2 ** 27), (64, 16, 3 * 64 * 3)])
def test_score_spans_equals_the_full_forward(T, chunk, piece):
    """score_spans == the full forward's log-probs summed over each continuation, is-greedy == their
    argmax; two continuations per row (the text's next tokens, the argmax ones) of different lengths; in
    one pass, in chunks (T > chunk, fold_chunks) and with logits made a few columns at a time (piece)."""
    cfg, params = TINY_GEMMA, random_params(TINY_GEMMA)
    rng = np.random.default_rng(0)
    B, K, C = 3, 2, 16
    lengths = np.array([T, T - 5, 7], np.int32)
    base = np.array([T - 16, T - 12, 3], np.int32)  # spans of 16, 7 and 4 columns
    first = np.stack([base, np.minimum(base + 2, lengths)], 1)  # [B, K]: the second 2 columns shorter
    seq = rng.integers(1, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    for b in range(B):
        seq[b, lengths[b] + 1:] = 0
    tokens = seq[:, :-1]
    pos = jnp.where(jnp.arange(T)[None] < lengths[:, None], jnp.arange(T)[None], -1)
    from jaxgen.cache import init_cache

    h, _ = M.forward_hidden(params, jnp.asarray(tokens), pos, init_cache(cfg, B, T), cfg)
    logp = np.asarray(jax.nn.log_softmax(M.unembed(params, h, cfg), -1))  # [B, T, V]: column i predicts i + 1
    nxt = [[seq[b, 1:], logp[b].argmax(-1)] for b in range(B)]  # per row: the text's tokens, the argmax ones
    targets = np.zeros((B, K, C), np.int32)
    for b in range(B):
        for k in range(K):
            j = np.arange(first[b, k], lengths[b])
            targets[b, k, j - base[b]] = nxt[b][k][j]
    total, greedy = M.score_spans(params, jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(first),
                                  jnp.asarray(lengths), cfg, chunk=chunk, piece_logits=piece)
    for b in range(B):
        for k in range(K):
            cols = np.arange(first[b, k], lengths[b])
            np.testing.assert_allclose(total[b, k], logp[b, cols, nxt[b][k][cols]].sum(), atol=2e-5)
            assert bool(greedy[b, k]) == bool((logp[b, cols].argmax(-1) == nxt[b][k][cols]).all())
    assert bool(greedy[:, 1].all()) and not bool(greedy[:, 0].any())  # (random text is never all argmax)


def test_bad_options_one_line(smollm2):
    for kwargs, msg in [({"model": smollm2, "temperature": 1}, "unknown option"),
                        ({"model": smollm2, "batch_size": 0}, "batch_size"),
                        ({"model": smollm2, "batch_size": "auto:4"}, "auto:N"),
                        ({"model": smollm2, "max_length": -1}, "max_length"),
                        ({"model": smollm2, "quant": "int8"}, "loaded already"),
                        ({"model": "smollm2-135m", "pretrained": "gemma3-270m"}, "not both")]:
        with pytest.raises(ValueError, match=msg) as e:
            JaxgenLM(**kwargs)
        assert "\n" not in str(e.value)
    lm = JaxgenLM(model=smollm2, max_length=MAX_LENGTH)
    from lm_eval.api.instance import Instance

    req = lambda kw: Instance("generate_until", {}, ("Q: hi\nA:", kw), 0)
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([req({"until": ["\n"], "num_beams": 2})])
    with pytest.raises(ValueError, match="temperature > 0"):
        lm.generate_until([req({"until": ["\n"], "do_sample": True, "temperature": 0})])
    with pytest.raises(ValueError, match="less than max_length"):
        lm.generate_until([req({"until": ["\n"], "max_gen_toks": MAX_LENGTH})])


def test_command_line(tmp_path):
    """`python -m jaxgen.lm_eval run --model jaxgen ...` (lm-eval's own command line, a task YAML from
    --include_path): the fixture's metrics; a bad option: one line, exit status 2."""
    import os
    import subprocess
    import sys

    import yaml

    task = next(t for t in configs() if t["task"] == "jaxgen_ll")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "ll.yaml").write_text(yaml.safe_dump(task))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "jaxgen.lm_eval", "run", "--model", "jaxgen", "--tasks", "jaxgen_ll", "--include_path",
           str(tmp_path / "tasks"), "--batch_size", "8", "--output_path", str(tmp_path / "out")]
    p = subprocess.run(cmd + ["--model_args", f"model=smollm2-135m,dtype=float32,max_length={MAX_LENGTH}"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    (out,) = (tmp_path / "out").rglob("results_*.json")
    got = json.loads(out.read_text())["results"]["jaxgen_ll"]
    for k, v in reference("smollm2-135m")["plain"]["jaxgen_ll"]["metrics"].items():
        assert got[k] == pytest.approx(v, rel=TOL), k
    bad = subprocess.run(cmd + ["--model_args", "model=smollm2-135m,temprature=0.5"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("jaxgen lm-eval:")
    assert "temprature" in bad.stderr.strip().splitlines()[-1]
