"""Speculative greedy decoding on the real models equals the float32 reference greedy tokens: Gemma 3
270M with prompt lookup (CI), and Qwen2.5-Coder 1.5B drafted by 0.5B (opt-in, --run-qwen)."""
import dataclasses
import json
import pathlib

import pytest

import jaxgen
from jaxgen import speculative as S
from jaxgen.model import stack_layers

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _check(model, proposer, fixture_name, n_cases=None):
    cases = json.loads((FIXTURES / f"{fixture_name}.json").read_text())["cases"][:n_cases]
    passes = new = 0
    for case in cases:
        out, stats = S.generate(model, [case["prompt_ids"]], proposer, max_new_tokens=len(case["greedy_ids"]),
                                stop_ids=[])
        assert out[0].tokens == case["greedy_ids"], case["prompt"][:40]
        passes, new = passes + stats.passes, new + stats.new_tokens
    return passes, new


def test_gemma_prompt_lookup_greedy_equals_reference():
    model = jaxgen.load("gemma3-270m", "float32")
    # stacked layers (one compiled layer) keep this test's several programs quick to compile; the
    # per-layer decode layout equals the stacked one (test_model) and meets the reference (test_real_models)
    model = dataclasses.replace(model, params=stack_layers(model.params))
    passes, new = _check(model, S.Proposer(gamma=8, ngram=3), "gemma3-270m")
    assert passes < new  # lookup finds something to accept on these prompts (repetitive continuations)


@pytest.mark.qwen
def test_qwen_draft_model_greedy_equals_reference():
    target = jaxgen.load("qwen2.5-coder-1.5b", "float32")
    draft = jaxgen.load("qwen2.5-coder-0.5b", "float32")
    passes, new = _check(target, S.Proposer(gamma=4, draft=draft), "qwen2.5-coder-1.5b", n_cases=4)
    assert passes < new
