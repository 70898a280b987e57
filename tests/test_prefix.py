"""Shared prefixes: generate(suffixes, prefix=p) == generate([p + s for s in suffixes]) for token-id
prompts (tokens and finish reasons exactly, logprobs to float tolerance), with suffixes of different
lengths in one batch, prefixes past the sliding window, a reused `prefill_prefix`, penalties (the
prefix counts as seen), n samples, a mesh and an int8 KV cache."""
import functools

import numpy as np
import pytest

from jaxgen import sharding as shd
from jaxgen import speculative
from jaxgen.generate import generate, prefill_prefix
from jaxgen.model import Model
from tests.conftest import TINY_GEMMA, random_params

SUFFIXES = [[5, 9, 2, 33, 7, 1, 8, 8, 21, 40, 3], [17, 4], [60, 2, 2, 9, 11, 12, 13], [3]]
KW = dict(max_new_tokens=10, stop_ids=[], temperature=1.0, top_k=20, seed=7)


def same(a, b, atol=2e-4):
    assert [(c.tokens, c.finish_reason) for c in a] == [(c.tokens, c.finish_reason) for c in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=atol)


def prefix_ids(n, seed=0, V=64):
    return [int(t) for t in np.random.default_rng(seed).integers(0, V, n)]


@pytest.mark.parametrize("n_prefix", [3, 20])
def test_prefix_equals_concatenated_prompts(tiny_model, n_prefix):
    pre = prefix_ids(n_prefix)
    same(generate(tiny_model, SUFFIXES, prefix=pre, **KW), generate(tiny_model, [pre + s for s in SUFFIXES], **KW))


@functools.lru_cache
def window_model():
    # Gemma 3's 512-token sliding window with a 700-token prefix: the ring buffers wrap inside it
    cfg = TINY_GEMMA.replace(name="tiny-gemma-w512", sliding_window=512, max_seq_len=2048, n_layers=4, layer_pattern="LLGL")
    return Model(cfg, random_params(cfg))


def test_prefix_longer_than_the_sliding_window():
    model = window_model()
    pre = prefix_ids(700, seed=1)
    suffixes = [prefix_ids(5, 2), prefix_ids(40, 3), prefix_ids(130, 4)]
    for kw in (KW, {**KW, "temperature": 0.0}):
        same(generate(model, suffixes, prefix=pre, **kw), generate(model, [pre + s for s in suffixes], **kw))


def test_reused_prefix_and_penalties_and_n(gemma_model):
    pre = prefix_ids(12, seed=5)
    shared = prefill_prefix(gemma_model, pre)
    cat = [pre + s for s in SUFFIXES]
    # penalties see the prefix's tokens as the concatenated prompt's
    pen = {**KW, "repetition_penalty": 1.5, "presence_penalty": 0.5}
    same(generate(gemma_model, SUFFIXES, prefix=shared, **pen), generate(gemma_model, cat, **pen))
    # the same prefix object again, with other suffixes, a different budget and n samples
    same(generate(gemma_model, SUFFIXES[:2], prefix=shared, n=3, **{**KW, "max_new_tokens": 6}),
         generate(gemma_model, [c for c in cat[:2] for _ in range(3)], **{**KW, "max_new_tokens": 6}))


@pytest.mark.parametrize("kind", ["mesh", "int8-kv"])
def test_prefix_on_a_mesh_and_int8_cache(kind):
    cfg = TINY_GEMMA
    params = random_params(cfg)
    if kind == "mesh":
        m = shd.make_mesh("data=2,model=4")
        model = Model(cfg, shd.shard_params(params, cfg, m), mesh=m)
    else:
        model = Model(cfg, params, kv_quant="int8")
    pre = prefix_ids(9, seed=8)
    # int8 keys: the prefix's keys are computed in another pass than the concatenated prompt's, and a
    # last-bit difference can move a value across a 1/127 rounding step (6.6e-4 measured on an AMX
    # CPU, at the pre-chunking commit too): tokens exactly, logprobs to 2e-3
    same(generate(model, SUFFIXES, prefix=pre, **KW), generate(model, [pre + s for s in SUFFIXES], **KW),
         2e-3 if kind == "int8-kv" else 2e-4)


def test_bad_prefixes(gemma_model):
    room = gemma_model.cfg.max_seq_len
    with pytest.raises(ValueError, match="prefix of 500 tokens \\+ 11 tokens \\+ max_new_tokens 10 exceeds"):
        generate(gemma_model, SUFFIXES, prefix=prefix_ids(500), **KW)
    with pytest.raises(ValueError, match=f"prefix of {room} tokens leaves no room"):
        prefill_prefix(gemma_model, prefix_ids(room))
    with pytest.raises(ValueError, match="prefix is empty"):
        generate(gemma_model, SUFFIXES, prefix=[])
    with pytest.raises(ValueError, match="prefix has token ids outside"):
        generate(gemma_model, SUFFIXES, prefix=[1, 99])
    with pytest.raises(ValueError, match="shared prefix"):
        speculative.generate(gemma_model, SUFFIXES, speculative.Proposer(gamma=2, ngram=1), prefix=[1, 2])
    other = Model(gemma_model.cfg, gemma_model.params, kv_quant="int8")
    with pytest.raises(ValueError, match="prefilled for tiny-gemma \\(kv_quant=None\\)"):
        generate(other, SUFFIXES, prefix=prefill_prefix(gemma_model, [1, 2]))
