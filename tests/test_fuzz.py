"""Property tests (hypothesis): random JSONL input for `jaxgen batch` and random corruptions of a GGUF
file never end in a traceback: exit status 0 or 2, and every valid row gets exactly one output line.

Example counts are kept small for CI (derandomized: the same examples every run); a longer run by
hand: JAXGEN_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz.py.
"""
import json
import pathlib
import shutil
import os

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxgen import batch as B
from jaxgen import cli

from .test_batch import WORDS, model_dir  # noqa: F401  (fixture)
from .test_cli import ckpt  # noqa: F401

SCALE = int(os.environ.get("JAXGEN_FUZZ_EXAMPLES", "0"))  # 0: the CI counts below
FIELDS = ["id", "prompt", "messages", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "n",
          "stop", "prefix", "regex", "choices", "json_schema", "repetition_penalty", "bogus"]
values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["the tea", "[0-9]+", "(", "", "user", "hot", "a|b"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "type", "x"]), c,
                                                         max_size=3),
    max_leaves=12)
random_rows = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6).filter(
    lambda d: not str(d.get("id", "")).startswith("valid-"))
bad_lines = st.one_of(
    random_rows.map(lambda d: json.dumps(d).encode()),  # NaN / Infinity included (Python's JSON reads them)
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")),
    st.sampled_from([b"[" * 3000 + b"]" * 3000, b'{"id": ' + b"9" * 5000 + b"}", b'{"id": 1, "prompt": "\xc3"}',
                     b'{"id": "d", "prompt": "a"}', b'{"id": "d", "prompt": "b"}', b"\x00\x00", b"{}"]))
# a line: a valid row (its index) or a bad line
lines = st.lists(st.one_of(st.integers(0, 5).map(lambda i: ("valid", i)), bad_lines.map(lambda b: ("bad", b))),
                 max_size=14)


def _write(path, items):
    valid = []
    with open(path, "wb") as f:
        for k, (kind, x) in enumerate(items):
            if kind == "valid":
                rid = f"valid-{k}"
                valid.append(rid)
                f.write(json.dumps({"id": rid, "prompt": " ".join(WORDS[: 1 + x])}).encode() + b"\n")
            else:
                f.write(x + b"\n")
    return valid


@settings(max_examples=SCALE or 150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(items=lines)
def test_reader_never_raises_and_keeps_every_valid_row(tmp_path_factory, items):
    path = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    valid = _write(path, items)
    if not any(line.strip() for line in path.read_bytes().split(b"\n")):  # nothing to run: one clear error
        with pytest.raises(B.InputError, match="has no rows"):
            B.read_requests(str(path), "skip")
        return
    rows, errors = B.read_requests(str(path), "skip")
    assert [r["id"] for r in rows if str(r["id"]).startswith("valid-")] == valid
    ids = [r["id"] for r in rows] + [e["id"] for e in errors]
    assert len(ids) == len(set(ids))  # one row or one error per id
    try:
        B.read_requests(str(path), "fail")
    except B.InputError as e:
        assert str(e).startswith(str(path) + ":") and "\n" not in str(e)


@settings(max_examples=SCALE // 10 or 6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(items=lines)
def test_batch_command_exits_0_or_2_with_one_line_per_valid_id(model_dir, tmp_path_factory, capsys, items):
    d = tmp_path_factory.mktemp("fuzzrun")
    valid = _write(d / "in.jsonl", items)
    out = d / "out.jsonl"
    rc = cli.main(["batch", "--input", str(d / "in.jsonl"), "--output", str(out), "--model", model_dir,
                   "--max-new-tokens", "2", "--ignore-stop", "--batch-size", "4", "--on-error", "skip"])
    err = capsys.readouterr().err
    assert rc in (0, 2) and "Traceback" not in err, err[-2000:]
    if rc == 0:
        got = [json.loads(x)["id"] for x in out.read_text().splitlines()] if out.exists() else []
        assert len(got) == len({json.dumps(x) for x in got})  # at most one line per id
        assert sorted(x for x in got if str(x).startswith("valid-")) == sorted(valid)
    else:  # a run-level refusal is one line, after the skipped rows' reports
        assert err.count("jaxgen batch: error: ") == 1, err[-2000:]


def _corrupt(data: bytes, how: str, where: float, value: int) -> bytes:
    i = int(where * len(data))
    if how == "truncate":
        return data[:i]
    if how == "flip":  # a byte anywhere (header, tensor infos, data)
        return data[:i] + bytes([data[i] ^ (1 + value % 255)]) + data[i + 1:]
    if how == "header-byte":  # a byte of the first 600 (counts, keys, types, shapes)
        j = 4 + int(where * min(600, len(data) - 5))
        return data[:j] + bytes([value % 256]) + data[j + 1:]
    # a u64 written over the header: an absurd count or length
    j = 8 + int(where * min(600, len(data) - 16))
    return data[:j] + (value * 0x9E3779B97F4A7C15 % 2**64).to_bytes(8, "little") + data[j + 8:]


@settings(max_examples=SCALE or 20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(how=st.sampled_from(["truncate", "flip", "header-byte", "u64"]), where=st.floats(0, 0.999),
       value=st.integers(0, 2**32))
def test_corrupt_gguf_is_one_clear_line(ckpt, tmp_path_factory, capsys, how, where, value):
    gguf, toml, _ = ckpt
    path = tmp_path_factory.mktemp("gguf") / "bad.gguf"
    path.write_bytes(_corrupt(gguf.read_bytes(), how, where, value))
    rc = cli.main(["generate", "the cat", "--model", str(path), "--config", str(toml), "--max-new-tokens", "2",
                   "--ignore-stop", "--json"])
    out, err = capsys.readouterr()
    assert rc in (0, 2), (how, where, value, err[-2000:])
    if rc == 2:
        assert err.startswith("jaxgen generate: error: ") and err.count("\n") == 1, err[-2000:]
    else:
        row = json.loads(out)
        assert row["finish_reason"] in ("length", "error")


HF_FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf" / "qwen3"
CONFIG_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "rope_parameters", "model_type", "layer_types", "sliding_window",
               "use_sliding_window", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings", "hidden_act"]


def _copy_hf_fixture(d):
    """The tiny Qwen3 fixture with a word-level tokenizer of its 128 ids ("t0" .. "t127"; "t2" ends)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    for f in HF_FIXTURE.iterdir():
        shutil.copy(f, d / f.name)
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "add_bos_token": False}))


def _run_hf_dir(d, capsys):
    rc = cli.main(["generate", "t5 t6 t7", "--model", str(d), "--max-new-tokens", "2", "--ignore-stop", "--json"])
    out, err = capsys.readouterr()
    assert rc in (0, 2), err[-2000:]
    if rc == 2:
        assert err.startswith("jaxgen generate: error: ") and err.count("\n") == 1, err[-2000:]
    return rc


@settings(max_examples=SCALE or 15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(how=st.sampled_from(["truncate", "flip", "header-byte", "u64"]), where=st.floats(0, 0.999),
       value=st.integers(0, 2**32))
def test_corrupt_safetensors_is_one_clear_line(tmp_path_factory, capsys, how, where, value):
    """Random corruptions of an HF directory's safetensors file (its 8-byte header length, JSON header,
    tensor data): exit 0 or one line, exit 2."""
    d = tmp_path_factory.mktemp("hf")
    _copy_hf_fixture(d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(_corrupt(data, how, where, value))
    _run_hf_dir(d, capsys)


def test_hf_directory_with_tokenizer_runs_and_without_is_one_line(tmp_path, capsys):
    """The fuzz tests' uncorrupted directory generates (exit 0); without tokenizer files the command
    line refuses it in one line before reading the weights."""
    _copy_hf_fixture(tmp_path)
    assert _run_hf_dir(tmp_path, capsys) == 0
    (tmp_path / "tokenizer.json").unlink()
    assert _run_hf_dir(tmp_path, capsys) == 2


@settings(max_examples=SCALE or 12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(CONFIG_KEYS), value=values)
def test_bad_config_json_value_is_one_clear_line(tmp_path_factory, capsys, key, value):
    """Any JSON value in a config.json key the loader reads: exit 0 or one line, exit 2 (absurd sizes
    are refused before anything is allocated)."""
    d = tmp_path_factory.mktemp("hf")
    _copy_hf_fixture(d)
    raw = json.loads((d / "config.json").read_text())
    raw[key] = value
    (d / "config.json").write_text(json.dumps(raw))
    _run_hf_dir(d, capsys)
