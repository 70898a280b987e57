"""Property tests (hypothesis): random JSONL input for `jaxgen batch` and random corruptions of a GGUF
file never end in a traceback: exit status 0 or 2, and every valid row gets exactly one output line.

Example counts are kept small for CI (derandomized: the same examples every run); a longer run by
hand: JAXGEN_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz.py.
"""
import json
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
