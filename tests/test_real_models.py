"""Parity with HF transformers (float32) on the real GGUF models: exact greedy tokens and top-10
log-probabilities, alone and in one ragged batch. Fixtures come from tools/make_reference.py.

One loaded model and one set of generate calls per model (module scope), shared by every test.
"""
import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

import jaxgen
from jaxgen.checkpoint import load
from jaxgen.generate import stream

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MODELS = ["gemma3-270m", "smollm2-135m", pytest.param("qwen2.5-coder-0.5b", marks=pytest.mark.qwen),
          pytest.param("qwen2.5-coder-1.5b", marks=pytest.mark.qwen)]


class Real:
    def __init__(self, name):
        self.name = name
        self.fixture = json.loads((FIXTURES / f"{name}.json").read_text())
        self.model = load(name, "float32")  # the references are float32
        cases = self.fixture["cases"]
        n_new = self.fixture["meta"]["new_tokens"]
        kw = dict(max_new_tokens=n_new, stop_ids=[], top_logprobs=10)
        # alone: one call per prompt of the first prompt bucket (16 tokens; one compiled program) and the
        # long one; every short prompt also runs in the batch below
        self.alone = {i: jaxgen.generate(self.model, [c["prompt_ids"]], **kw)[0] for i, c in enumerate(cases)
                      if len(c["prompt_ids"]) <= 16 or len(c["prompt_ids"]) > 512}
        # together: every short prompt in one ragged batch
        short = [c["prompt_ids"] for c in cases if len(c["prompt_ids"]) < 512]
        self.batch = jaxgen.generate(self.model, short, **kw)
        # the long prompts again in chunks of 128 (6 chunks, global keys in blocks of 256)
        small = dataclasses.replace(self.model, prefill_chunk=128)
        self.chunked = [jaxgen.generate(small, [c["prompt_ids"]], **kw)[0] for c in cases if len(c["prompt_ids"]) > 512]


_CACHE = {}


@pytest.fixture(scope="module", params=MODELS)
def real(request):
    if request.param not in _CACHE:
        _CACHE.clear()  # one real model in memory at a time
        _CACHE[request.param] = Real(request.param)
    return _CACHE[request.param]


def test_tokenizer_matches_reference(real):
    tok = real.model.tokenizer
    for case in real.fixture["tokenizer"]:
        assert tok.encode(case["text"], add_bos=False) == case["ids"], repr(case["text"])
        if case["text"]:
            assert tok.decode(case["ids"]) == case["text"]
    for case in real.fixture["cases"]:
        assert tok.encode(case["prompt"]) == case["prompt_ids"]


def test_chat_template_matches_hf(real):
    """`--chat`, `--system` and batch `messages` format conversations as HF's apply_chat_template does
    with the template in the model's GGUF (Gemma 3 270M, a base model, has none: its fixture uses the
    Gemma 3 instruction format; see tools/make_chat_fixtures.py): the same text and the same ids."""
    chat = json.loads((FIXTURES / "chat-templates.json").read_text())
    if real.name not in chat:
        pytest.skip(f"no chat-template fixture for {real.name}")
    tok = real.model.tokenizer
    for case in chat[real.name]["cases"]:
        text = tok.apply_chat_template(case["messages"], tools=case.get("tools"),
                                       add_generation_prompt=case.get("add_generation_prompt", True))
        want = case["text"]
        if tok.add_bos:  # the template writes BOS as text; jaxgen's encode adds it as an id
            assert want.startswith("<bos>"), want[:10]
            want = want[len("<bos>"):]
        assert text == want, case["messages"]
        assert tok.encode(text) == case["ids"], case["messages"]


def test_greedy_tokens_equal_reference_alone(real):
    assert len(real.alone) >= 3
    for i, got in real.alone.items():
        case = real.fixture["cases"][i]
        assert got.tokens == case["greedy_ids"], (case["prompt"][:40], real.model.tokenizer.decode(got.tokens))


def test_greedy_tokens_equal_reference_in_ragged_batch(real):
    short = [c for c in real.fixture["cases"] if len(c["prompt_ids"]) < 512]
    assert len(real.batch) == len(short) >= 5
    for case, got in zip(short, real.batch):
        assert got.tokens == case["greedy_ids"], case["prompt"][:40]


def test_long_prompt_wraps_sliding_window(real):
    """A prompt longer than Gemma's 512 window: the local ring buffers wrap during prefill, which runs
    in chunks (2 of the default 512 tokens; 6 of 128): the reference's greedy tokens and top-10
    log-probabilities either way."""
    long = [(real.fixture["cases"][i], g) for i, g in real.alone.items() if len(real.fixture["cases"][i]["prompt_ids"]) > 512]
    assert long and len(long) == len(real.chunked)
    for (case, got), small in zip(long, real.chunked):
        assert got.tokens == case["greedy_ids"]
        assert small.tokens == case["greedy_ids"]
        ref = dict(zip(case["top10_ids"], case["top10_logprobs"]))
        ours = dict(small.top_logprobs[0])
        assert len(set(ours) & set(ref)) >= 9, (sorted(ours), sorted(ref))  # a near-tie may swap the 10th
        for i in set(ours) & set(ref):
            assert abs(ours[i] - ref[i]) < 2e-3, (i, ours[i], ref[i])
        np.testing.assert_allclose(small.logprobs, got.logprobs, atol=1e-4)


def test_top10_logprobs_match_reference(real):
    short = [c for c in real.fixture["cases"] if len(c["prompt_ids"]) < 512]
    cases = list(zip(short, real.batch)) + [(real.fixture["cases"][i], g) for i, g in real.alone.items()]
    for case, got in cases:  # the batch's rows, and the prompts also run alone
        ours = dict(got.top_logprobs[0])  # first new token's alternatives = last prompt position
        ref = dict(zip(case["top10_ids"], case["top10_logprobs"]))
        common = set(ours) & set(ref)
        assert len(common) >= 9, (sorted(ours), sorted(ref))  # a near-tie may swap the 10th
        for i in common:
            assert abs(ours[i] - ref[i]) < 2e-3, (case["prompt"][:30], i, ours[i], ref[i])


def test_gemma_reference_text(real):
    if real.name != "gemma3-270m":
        pytest.skip("the quoted reference continuation is Gemma's")
    got = real.alone[0]
    assert real.fixture["cases"][0]["prompt"] == "The capital of France is"
    assert real.model.tokenizer.decode(got.tokens).startswith(
        " the capital of the country of France. It is the largest city in France and the second largest "
        "city in Europe.")


def test_stream_equals_generate(real):
    if real.name != "gemma3-270m":
        pytest.skip("stream == generate does not depend on the model: one real model (and tiny ones) in CI")
    prompts = ["The capital of France is", "Once upon a time"]
    kw = dict(max_new_tokens=20, temperature=0.9, top_p=0.95, seed=5, stop_ids=[])
    ref = jaxgen.generate(real.model, prompts, **kw)
    chunks = list(stream(real.model, prompts, chunk_steps=3, **kw))
    assert len(chunks) > 3
    for i, r in enumerate(ref):
        assert list(chunks[-1].tokens[i, :chunks[-1].num_new[i]]) == r.tokens
    # every chunk is a prefix of the final tokens
    for c in chunks:
        for i, r in enumerate(ref):
            assert list(c.tokens[i, :c.num_new[i]]) == r.tokens[:c.num_new[i]]


def test_chat_conversation_on_kept_cache(real):
    """Conversation(chat=True): each turn appends only what the template adds after the model's
    reply, so the kept history reads as the template's rendering of the whole conversation with the
    model's replies in place as generated (Gemma's template would trim a reply's edge spaces; the
    cache keeps the sampled tokens), and each reply == a fresh generate over that history. Chat
    template: Gemma 3's (SmolLM2's ChatML: the quickstart notebook's chat cell asserts the same)."""
    if real.name != "gemma3-270m":
        pytest.skip("one real template here (its reply trimming is the subtle case); SmolLM2: the notebook")
    from jaxgen.conversation import Conversation

    tok = real.model.tokenizer
    conv = Conversation(real.model, max_len=256, chat=True)
    turns = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "And 3 + 3?"}],
             {"role": "user", "content": "Thanks. Name a colour."}]
    replies = []
    for t, msgs in enumerate(turns):
        out = conv.generate([msgs], max_new_tokens=16)[0]
        h = conv.history(0).tokens
        before = h[:len(h) - len(out.tokens)]
        msgs = conv.messages(0)[:-1]
        slots = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        text = tok.apply_chat_template([{**m, "content": f"REPLYSLOT{slots.index(i)}"} if i in slots else m
                                        for i, m in enumerate(msgs)])
        for k, r in enumerate(replies):
            text = text.replace(f"REPLYSLOT{k}", r)
        assert tok.decode(before) == "<bos>" + text, t  # (decode spells BOS, which encode added as an id)
        replies.append(out.text)
        ref = jaxgen.generate(real.model, [before], max_new_tokens=16, seed=t)[0]
        assert out.tokens == ref.tokens and out.text == ref.text, t
    assert [m["role"] for m in conv.messages(0)] == ["user", "assistant"] * 3


SCHEMAS = [  # nested objects, arrays with bounds, enums, bounded strings, optional properties
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "ok": {"type": "boolean"}}, "required": ["name", "age", "tags", "address"], "additionalProperties": False},
]


def test_json_schema_outputs_validate(real):
    """Sampled at temperature 1 (n=4): every row that finished parses and validates under its schema.
    Gemma here (SmolLM2 and more schemas: benchmarks/constraints.py), to keep the suite short."""
    import jsonschema

    if real.name != "gemma3-270m":
        pytest.skip("one real vocabulary in CI: Gemma's 262k")
    out = jaxgen.generate(real.model, ["A person record as JSON: "], n=4, max_new_tokens=96, temperature=1.0,
                          seed=1, json_schema=SCHEMAS[0])
    finished = [c for c in out if c.finish_reason == "stop"]
    assert len(finished) >= 2, [c.text for c in out]
    for c in finished:
        jsonschema.validate(json.loads(c.text), SCHEMAS[0])


def test_beam_search_equals_hf(real):
    """Every beam HF transformers' `generate(num_beams=k, do_sample=False, num_return_sequences=k)`
    returns (tools/make_beam_fixtures.py: widths 4 / 3 / 2, length penalties 1.0 / 0.5 / 1.5, early
    stopping False / True / "never"), in rank order with its score, from one jaxgen call with those
    knobs per prompt (one compiled program)."""
    if real.name != "gemma3-270m":
        pytest.skip("the beam fixture is Gemma's")
    cases = json.loads((FIXTURES / "gemma3-270m-beam.json").read_text())["cases"]
    per = lambda key: [c[key] for c in cases]
    out = jaxgen.generate(real.model, per("prompt_ids"), num_beams=per("num_beams"), max_new_tokens=per("max_new_tokens"),
                          length_penalty=per("length_penalty"), early_stopping=per("early_stopping"),
                          stop_ids=per("stop_ids"), return_beams=True)
    assert len(out) == sum(per("num_beams"))
    for c in cases:
        got, out = out[:c["num_beams"]], out[c["num_beams"]:]
        assert [g.tokens for g in got] == [b["ids"] for b in c["beams"]], c["prompt"][:40]
        np.testing.assert_allclose([g.score for g in got], [b["score"] for b in c["beams"]], atol=5e-4)


def test_hf_directory_equals_gguf(real, tmp_path):
    """The model written as an HF checkpoint directory (hf_save.save: safetensors, tokenizer.json or
    tokenizer.model, tokenizer_config.json with the chat template, generation_config.json) loads back
    with the same config and params; the directory's own tokenizer gives HF's ids (text and chat
    fixtures) and the greedy tokens are HF's."""
    from jaxgen.checkpoint import hf_save

    d = hf_save.save(real.model, tmp_path / real.name)
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    if (d / "tokenizer.model").exists():  # transformers learns which pieces are special from the config only
        special = {int(i) for i, t in tcfg["added_tokens_decoder"].items() if t["special"]}
        assert special == real.model.tokenizer.special_ids
    back = load(str(d), "float32")
    assert back.cfg == real.model.cfg
    diff = jax.tree.map(lambda a, b: float(jax.numpy.max(jax.numpy.abs(a - b))), back.params, real.model.params)
    assert max(jax.tree.leaves(diff)) <= 1e-6, diff  # exact but for Gemma's norms: (w - 1) + 1 in float32
    tok = back.tokenizer
    want = real.model.tokenizer
    assert (tok.add_bos, tok.bos_id, set(tok.stop_ids)) == (want.add_bos, want.bos_id, set(want.stop_ids))
    for case in real.fixture["tokenizer"]:
        assert tok.encode(case["text"], add_bos=False) == case["ids"], repr(case["text"])
    chat = json.loads((FIXTURES / "chat-templates.json").read_text()).get(real.name, {"cases": []})
    for case in chat["cases"] if real.model.tokenizer.chat_template else []:
        text = tok.apply_chat_template(case["messages"], tools=case.get("tools"),
                                       add_generation_prompt=case.get("add_generation_prompt", True))
        assert tok.encode(text) == case["ids"], case["messages"]
    # one prompt per call, as `real.alone` ran them: the same config, params layout and shapes, so the
    # compiled program is reused
    for i in [i for i in real.alone if len(real.fixture["cases"][i]["prompt_ids"]) <= 16][:3]:
        case = real.fixture["cases"][i]
        got = jaxgen.generate(back, [case["prompt"]], max_new_tokens=real.fixture["meta"]["new_tokens"],
                              stop_ids=[], top_logprobs=10)[0]
        assert got.tokens == case["greedy_ids"], case["prompt"]
