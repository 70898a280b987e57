"""The tokenizers jaxgen builds from the real GGUF files equal HF transformers' (tools/make_tokenizer_fixtures.py,
corrected where transformers' GGUF conversion departs from the model's own tokenizer): the ids of random
texts (special tokens' text read as the token, whitespace runs, digits, scripts, combining marks) and the
text of random ids, special tokens spelled and with skip_special. Then: token_bytes spells exactly what
decode writes, and writable_bytes (what a constraint may write) leaves the special tokens out."""
import functools
import json
import pathlib
import re

import numpy as np
import pytest

from jaxgen import constraints as con
from jaxgen.tokenizer import writable_bytes

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "tokenizers.json").read_text())
MODELS = ["gemma3-270m", "smollm2-135m", pytest.param("qwen2.5-coder-0.5b", marks=pytest.mark.qwen)]


@functools.cache
def gguf_tokenizer(name):
    from jaxgen import tokenizer
    from jaxgen.checkpoint import gguf, registry

    return tokenizer.from_gguf_fields(gguf.tokenizer_fields(gguf.open_gguf(registry.gguf_path(name))))


@pytest.mark.parametrize("name", MODELS)
def test_ids_and_texts_equal_hf(name):
    tok, want = gguf_tokenizer(name), FIXTURE[name]
    for text, ids in want["encode"]:
        assert tok.encode(text, add_bos=False) == ids, repr(text)
    for ids, text, skipped in want["decode"]:
        assert tok.decode(ids) == text, ids
        assert tok.decode(ids, skip_special=True) == skipped, ids


@pytest.mark.parametrize("name", MODELS)
def test_token_bytes_spell_decode_and_constraints_write_no_special_token(name):
    tok = gguf_tokenizer(name)
    tb, wb = tok.token_bytes(), writable_bytes(tok)
    special = sorted(tok.special_ids)
    assert tok.eos_id in special and special[-1] < tok.vocab_size
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, rng.integers(1, 8))] + [int(rng.choice(special))]
        rng.shuffle(ids)
        assert b"".join(tb[i] for i in ids).decode("utf-8", errors="replace") == tok.decode(ids)
    assert all(wb[i] == b"" and tb[i] for i in special)  # a special token is spelled, and never written
    assert all(wb[i] == tb[i] for i in range(tok.vocab_size) if i not in tok.special_ids)
    # a constraint whose text is a special token's writes it with ordinary tokens
    i = next(i for i in special if i not in tok.stop_ids and tb[i].isascii())
    auto = con.automaton(re.escape(tb[i].decode()) + "x", wb, tok.stop_ids)
    assert auto["accepting"].any() and i not in set(auto["tok"].tolist())
