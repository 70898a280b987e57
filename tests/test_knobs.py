"""The knob table (`jaxgen.knobs`) and the four front ends derived from it: the Python API, the command
line, `jaxgen batch` rows and the Ray stage's options. Every knob goes through every front end that
has it: a bad value is refused with the same message (the front end's name for the knob, then the
table's range) and, off the Python API, before any model loads; a good value reaches `generate`
unchanged, and the same request gives the same tokens through all four."""
import io
import json
import math
import sys

import jax
import numpy as np
import pytest

import jaxgen
from jaxgen import cli, flags
from jaxgen import knobs as kn
from jaxgen import ray as jray
from jaxgen.batch import row_seed
from jaxgen.batch_run import check_row
from jaxgen.checkpoint import registry
from jaxgen.lora import random_adapter

from .conftest import CONFIGS

from .test_cli import ckpt  # noqa: F401  (the module-scoped tiny checkpoint fixture)

NO_MODEL = "/nonexistent/model.gguf"  # a check made after loading would report this path instead

# one refused and one accepted (non-default) value per knob; a knob added to the table without them fails
BAD = dict(max_new_tokens=0, temperature=-1.0, top_k=-1, top_p=1.5, min_p=math.nan, repetition_penalty=0.0,
           presence_penalty=math.nan, frequency_penalty=math.inf, seed=-1, logit_bias={0: math.nan}, banned_ids=[-1],
           stop_ids=[-3], stop=[""], include_stop="yes", prefix="", regex="[0-",
           json_schema={"type": "array", "items": {"type": "string"}, "uniqueItems": True},  # not a regular language
           choices=[""], whitespace="(", n=0, top_logprobs=-1, candidates=0, num_beams=33, length_penalty=math.nan,
           early_stopping="sometimes", return_beams="yes", lora=5)
GOOD = dict(max_new_tokens=5, temperature=0.7, top_k=7, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
            presence_penalty=0.4, frequency_penalty=0.2, seed=11, logit_bias={3: 1.5}, banned_ids=[4], stop_ids=[5],
            stop=["ab", "\n"], include_stop=True, prefix="the", regex="[a-z]+", json_schema={"type": "integer"},
            choices=["yes", "no"], whitespace=" ?", n=3, top_logprobs=2, candidates=64, num_beams=3, length_penalty=0.5,
            early_stopping="never", return_beams=True,
            lora=random_adapter(CONFIGS["gemma"], jax.random.key(0), rank=2, targets=("q",)))
# The adapter knob's flag takes NAME=DIR (a directory to read) and a row names one: its command-line and
# Ray refusals and values are tests/test_lora.py's (test_lora_on_the_command_line_and_in_batch_rows).
FLAG_VALUES_DIFFER = ("adapter",)


def test_every_knob_has_test_values():
    assert set(BAD) == set(GOOD) == set(kn.KNOBS)
    for name in kn.KNOBS:
        assert kn.problem(name, GOOD[name], vocab_size=259) is None, name
        assert kn.problem(name, BAD[name], vocab_size=259), name
        assert not kn.is_off(name, GOOD[name]) and kn.is_off(name, kn.KNOBS[name].default), name


def _text(v) -> list[str]:
    """A value as the command line spells it (repeatable flags: one text per item)."""
    return [str(x) for x in v] if isinstance(v, list) else [repr(v) if isinstance(v, float) else str(v)]


def _argv(command, name, value, tmp_path) -> list[str]:
    k = kn.KNOBS[name]
    if k.kind == "bool":
        return [k.flag] if value else []
    if k.kind == "schema":  # the flag takes a file
        path = tmp_path / "schema.json"
        path.write_text(json.dumps(value))
        return [k.flag, str(path)]
    return [x for t in _text(value) for x in (k.flag, t)]


def _context(name) -> dict:
    """What a knob needs beside it to be checked as a value (not refused for its company)."""
    k = kn.KNOBS[name]
    return {"num_beams": 2} if k.beam == "only" else {"json_schema": {"type": "integer"}} if name == "whitespace" else {}


def _cli_context(name) -> list[str]:
    k = kn.KNOBS[name]
    return ["--num-beams", "2"] if k.beam == "only" else ["--json-schema", "SCHEMA"] if name == "whitespace" else []


@pytest.mark.parametrize("name", sorted(kn.KNOBS))
def test_a_bad_value_is_refused_with_one_message_everywhere(name, ckpt, tmp_path, capsys):
    k, bad = kn.KNOBS[name], BAD[name]
    model = registry.load(str(ckpt[2]))
    limits = dict(vocab_size=model.cfg.vocab_size, candidates=kn.DEFAULT_CANDIDATES)
    with pytest.raises(ValueError) as e:  # the Python API
        jaxgen.generate(model, ["the cat"], **{**_context(name), name: bad})
    assert kn.problem(name, bad, **limits) in str(e.value)
    (tmp_path / "SCHEMA").write_text('{"type": "integer"}')
    for command in k.commands if k.flag and k.kind not in FLAG_VALUES_DIFFER else ():  # the command line, before loading
        head = ["generate", "hi"] if command == "generate" else ["batch", "--input", str(tmp_path / "in.jsonl"),
                                                                 "--output", str(tmp_path / "out.jsonl")]
        (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "x", "num_beams": 2}\n')
        argv = head + ["--model", NO_MODEL] + [str(tmp_path / x) if x == "SCHEMA" else x for x in _cli_context(name)]
        if k.kind == "bool":
            continue  # a switch cannot be given a bad value
        assert cli.main(argv + _argv(command, name, bad, tmp_path)) == 2
        out, err = capsys.readouterr()
        want = kn.problem(name, bad, k.flag, candidates=kn.DEFAULT_CANDIDATES)  # (the vocabulary is not known yet)
        assert out == "" and err == f"jaxgen {command}: error: {want}\n", (command, err)
    if k.row:  # a `jaxgen batch` row: refused while reading, with its line and id
        row = {"id": 7, "prompt": "x", **_context(name), name: bad}
        row.pop("json_schema", None) if name == "whitespace" else None
        assert check_row(row) == kn.problem(name, bad)
        (tmp_path / "in.jsonl").write_text(json.dumps(row) + "\n")
        assert cli.main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                         "--model", NO_MODEL]) == 2
        err = capsys.readouterr().err
        assert err == f"jaxgen batch: error: {tmp_path / 'in.jsonl'}:1: id 7: {kn.problem(name, bad)}\n", err
    if k.flag and "batch" in k.commands and k.kind not in ("bool",) + FLAG_VALUES_DIFFER:  # a Ray stage option
        options = {"num_beams": 2} if k.beam == "only" else {}
        options[k.dest] = bad
        with pytest.raises(ValueError) as e:
            jray.batch_args(**options)
        assert str(e.value) == kn.problem(name, bad, k.dest, candidates=kn.DEFAULT_CANDIDATES)


@pytest.mark.parametrize("name", sorted(k.name for k in kn.KNOBS.values() if k.flag and k.kind not in FLAG_VALUES_DIFFER))
def test_a_good_value_reaches_the_request_unchanged(name, tmp_path):
    """The generate command's flags, the batch flags and the Ray options give the API's value."""
    k, good = kn.KNOBS[name], GOOD[name]
    for command in k.commands:
        head = ["generate", "hi"] if command == "generate" else ["batch", "--input", "i", "--output", "o"]
        args = flags.build_parser().parse_args(head + _argv(command, name, good, tmp_path))
        value = flags.knob_value(args, k)
        if k.kind == "schema":
            assert json.loads(open(value).read()) == good
        else:
            assert value == good
        if command == "generate" and name not in kn.CONSTRAINTS + ("whitespace",):
            assert cli.request_of(args, None)[name] == good
        if command == "batch":
            ray_args = jray.batch_args(**{k.dest: good}, **({"num_beams": 2} if k.beam == "only" else {}))
            assert flags.knob_value(ray_args, k) == good
    if name == "choices":
        args = flags.build_parser().parse_args(["generate", "x", "--choice", "yes", "--choice", "no"])
        assert flags.constraint_regex(args) == jaxgen.constraints.to_regex("choices", ["yes", "no"])


def test_ray_options_take_a_string_as_one_value():
    """Ray's `stop="</answer>"` was nine one-character stop strings and `choice="yes"` the regex (y|e|s)."""
    args = jray.batch_args(stop="</answer>", choice="yes")
    assert args.stop == ["</answer>"] and flags.constraint_regex(args) == "(yes)"
    assert jray.batch_args(stop=["a", "b"]).stop == ["a", "b"]


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--chunk-steps", "0"], "argument --chunk-steps: must be a positive integer, got '0'"),
    (["generate", "hi", "--n", "100000"], "--n must be an integer in [1, 1024], got 100000"),
    (["generate", "a", "b", "--n", "600"], "2 prompts x n=600 samples = 1200 rows exceeds the largest batch bucket 1024"),
    (["generate", "hi", "--max-new-tokens", "10000000"], "--max-new-tokens must be an integer in [1, 32768], got 10000000"),
    (["generate", "hi", "--top-logprobs", "-1"], "--top-logprobs must be an integer in [0, the vocabulary size], got -1"),
    (["generate", "hi", "--stop", ""], "--stop must be a non-empty string"),
    (["generate", "hi", "--num-beams", "2", "--length-penalty", "nan"], "--length-penalty must be a finite number, got nan"),
    (["generate", "hi", "--length-penalty", "0.5"], "--length-penalty only applies to beam search (--num-beams > 1)"),
    (["generate", "hi", "--return-beams"], "--return-beams only applies to beam search (--num-beams > 1)"),
    (["generate", "hi", "--early-stopping"], "--early-stopping only applies to beam search (--num-beams > 1)"),
    (["generate", "hi", "--system", "be brief"], "--system only applies with --chat"),
    (["generate", "hi", "--json-whitespace", " ?"], "--json-whitespace only applies with --json-schema"),
    (["generate", "hi", "--num-beams", "2", "--top-k", "5", "--seed", "3"],
     "--num-beams 2 (beam search) does not take --top-k, --seed"),
    # flags nothing would use: refused, not ignored
    (["generate", "hi", "--top-logprobs", "3"], "--top-logprobs only applies with --json"),
    (["generate", "hi", "--include-stop"], "--include-stop only applies with --stop"),
    (["generate", "hi", "--json-input"], "--json-input reads stdin's lines as JSON strings"),
    (["generate", "hi", "--json", "--chunk-steps", "2"], "--chunk-steps only applies to streamed text"),
    (["generate", "hi", "--num-beams", "2", "--chunk-steps", "2"], "--chunk-steps only applies to streamed text"),
    (["batch", "--input", "IN", "--output", "o.jsonl", "--no-refill", "--chunk-steps", "2"],
     "--chunk-steps only applies with --refill"),
    (["batch", "--input", "IN", "--output", "o.jsonl", "--include-stop"],
     "--include-stop only applies with --stop or rows with a stop field"),
    (["batch", "--input", "MESSAGES", "--output", "o.jsonl", "--chat"], '--chat only applies to rows with a "prompt"'),
    (["batch", "--input", "IN", "--output", "o.jsonl", "--memory-gb", "-1"], "argument --memory-gb: must be a positive number"),
    (["batch", "--input", "IN", "--output", "o.jsonl", "--chunk-steps", "0"], "argument --chunk-steps: must be a positive"),
    (["batch", "--input", "IN", "--output", "o.jsonl", "--presence-penalty", "nan"], "--presence-penalty must be a finite number"),
    (["batch", "--input", "IN", "--output", "o.jsonl", "--frequency-penalty", "inf"], "--frequency-penalty must be a finite number"),
    (["batch", "--input", "EMPTY", "--output", "o.jsonl"], "has no rows (an empty file)"),
    (["batch", "--input", "IN", "--output", "/no/such/dir/o.jsonl"], "--output /no/such/dir/o.jsonl: the directory /no/such/dir does not exist"),
    (["batch", "--input", "IN", "--output", "o.jsonl", "--length-penalty", "0.5"],
     "--length-penalty only applies to beam search, and no row has num_beams > 1"),
    (["batch", "--input", "IN", "--output", "o.jsonl", "--json-whitespace", " "], "--json-whitespace only applies with --json-schema"),
    (["batch", "--input", "IN", "--output", "o.jsonl", "--speculative", "lookup", "--prefix", "x"],
     "--speculative takes neither a prefix nor n > 1 samples yet"),
    # text with no UTF-8 form: a byte that is not UTF-8 in an argument (Python reads it as U+DCxx), a JSON
    # "\\ud83d" escape without its pair; the tokenizer, stop-string and constraint tables cannot take it
    (["generate", "caf\udce9"], "prompt 1 is not valid Unicode text: the byte 0xE9, which is not UTF-8, or a lone "
                                 "surrogate U+DCE9 at character 3"),
    (["generate", "hi", "--stop", "\udcff"], "--stop is not valid Unicode text: the byte 0xFF"),
    (["generate", "hi", "--chat", "--system", "x\udcff"], "--system is not valid Unicode text"),
    (["generate", "hi", "--prefix", "\udcff"], "--prefix is not valid Unicode text"),
    (["generate", "hi", "--regex", "a\udcff"], "--regex is not valid Unicode text"),
    (["generate", "hi", "--choice", "a", "--choice", "\udcff"], "--choice is not valid Unicode text"),
    (["generate", "hi", "--json-schema", "LATIN1"], "--json-schema LATIN1: not UTF-8 text (byte 0xe9 at offset 14)"),
    (["batch", "--input", "IN", "--output", "o.jsonl", "--stop", "\udcff"], "--stop is not valid Unicode text"),
    (["batch", "--input", "SURROGATES", "--output", "o.jsonl"],
     "SURROGATES:2: id 2: prompt is not valid Unicode text: a lone surrogate U+D83D (half of a UTF-16 pair) at "
     "character 3"),
])
def test_bad_input_is_one_line_before_the_model_loads(argv, message, tmp_path, capsys, monkeypatch):
    """Every case of the solid-ground review: one line, exit 2, and no model load (the model given does
    not exist, so a check made after loading would name it instead)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "IN").write_text('{"id": 1, "prompt": "x"}\n')
    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "MESSAGES").write_text('{"id": 1, "messages": [{"role": "user", "content": "x"}]}\n')
    (tmp_path / "LATIN1").write_bytes(b'{"const": "caf\xe9"}')
    (tmp_path / "SURROGATES").write_text(SURROGATE_ROWS)
    rc = cli.main(argv + ["--model", NO_MODEL])
    out, err = capsys.readouterr()
    assert (rc, out) == (2, "") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.lock").exists()


# a lone surrogate where each text field of a batch row can hold one (row 1 is fine; the id of row 9)
SURROGATE_ROWS = "".join(json.dumps(row) + "\n" for row in [
    {"id": 1, "prompt": "fine"}, {"id": 2, "prompt": "cut\ud83d"}, {"id": 3, "prompt": "x", "stop": ["a", "\ud83d"]},
    {"id": 4, "prompt": "x", "regex": "a\ude00"}, {"id": 5, "prompt": "x", "prefix": "\ud83d"},
    {"id": 6, "messages": [{"role": "user", "content": "\ud83d!"}]},
    {"id": 7, "prompt": "x", "choices": ["a", "\ud83d"]},
    {"id": 8, "prompt": "x", "json_schema": {"enum": ["\ud83d"]}}, {"id": "\ud83d", "prompt": "x"},
    {"id": 10, "prompt": "also fine"}])


def test_text_without_a_utf8_form_is_refused_where_it_enters(ckpt, tmp_path, capsys):
    """A lone surrogate (a UTF-16 pair cut in two, or a byte that is not UTF-8 read by Python) made the
    tokenizer raise a TypeError after the model loaded, a stop string or regex a UnicodeEncodeError, and
    one such row of a batch file ended the run with a traceback. Each is now one line naming the field:
    the API's ValueError, the tokenizer's own (for every other caller), a batch row's error line."""
    surrogate = "pr\ud83dompt"
    assert kn.text_problem(surrogate, "x") == ("x is not valid Unicode text: a lone surrogate U+D83D (half of a UTF-16 "
                                               "pair) at character 2")
    assert kn.text_problem(["ok", {"k": [surrogate]}], "x") and kn.text_problem({surrogate: 1}, "x")
    assert kn.text_problem(["ok", "\U0001f600", {"k": "é"}, 5, None], "x") is None  # a whole pair is text
    model = registry.load(str(ckpt[2]))
    for kw, label in [(dict(prompts=["ok", surrogate]), "prompt 1"), (dict(stop=["\ud83d"]), "stop"),
                      (dict(regex="a\ud83d"), "regex"), (dict(choices=["\ud83d"]), "choices"),
                      (dict(json_schema={"const": "\ud83d"}), "json_schema"), (dict(prefix=surrogate), "prefix")]:
        with pytest.raises(ValueError, match=f"{label} is not valid Unicode text: a lone surrogate U\\+D83D"):
            jaxgen.generate(model, **{"prompts": ["ok"], "max_new_tokens": 2, **kw})
    with pytest.raises(ValueError, match="^the text to encode is not valid Unicode text"):
        model.tokenizer.encode(surrogate)
    # stdin: a Latin-1 line among UTF-8 ones (sys.stdin decodes with surrogateescape)
    inp = tmp_path / "in.jsonl"
    inp.write_text(SURROGATE_ROWS)
    rc = cli.main(["batch", "--input", str(inp), "--output", str(tmp_path / "out.jsonl"), "--model", str(ckpt[2]),
                   "--max-new-tokens", "2", "--on-error", "skip"])
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    errors = {x["id"]: x["error"] for x in lines if "error" in x}
    assert sorted(x["id"] for x in lines if "text" in x) == [1, 10]
    def lone(field, cp, at):
        return f"{field} is not valid Unicode text: a lone surrogate U+{cp} (half of a UTF-16 pair) at character {at}"
    assert errors == {2: lone("prompt", "D83D", 3), 3: lone("stop", "D83D", 0), 4: lone("regex", "DE00", 1),
                      5: lone("prefix", "D83D", 0), 6: lone("messages[0].content", "D83D", 0),
                      7: lone("choices", "D83D", 0), 8: lone("json_schema", "D83D", 0)}
    assert f"{inp}:9: id is not valid Unicode text" in err  # no id the output could hold: reported, not written


def test_a_stdin_line_that_is_not_utf8_is_one_line_before_loading(capsys, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO("caf\xe9\n".encode() + b"caf\xe9\n"), encoding="utf-8",
                             errors="surrogateescape")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert cli.main(["generate", "--model", NO_MODEL]) == 2
    assert capsys.readouterr().err == ("jaxgen generate: error: stdin line 2 is not valid Unicode text: the byte 0xE9, "
                                       "which is not UTF-8, or a lone surrogate U+DCE9 at character 3\n")


def test_the_same_request_gives_the_same_tokens_through_every_front_end(ckpt, tmp_path, capsys):
    """Every sampling knob at a non-default value (as flags, as a batch row's fields, as Ray options)
    gives generate()'s tokens through the API, `jaxgen generate` and `jaxgen batch`."""
    ck = str(ckpt[2])
    model = registry.load(ck)
    knobs = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.2, presence_penalty=0.3,
                 frequency_penalty=0.1)
    flag_argv = [x for name, v in knobs.items() for x in (kn.KNOBS[name].flag, repr(v))]
    kw = dict(max_new_tokens=7, stop=["e t"], stop_ids=[], **knobs)
    api = jaxgen.generate(model, ["the cat", "a dog"], seed=5, **kw)
    assert cli.main(["generate", "the cat", "a dog", "--model", ck, "--json", "--max-new-tokens", "7", "--stop", "e t",
                     "--ignore-stop", "--seed", "5", *flag_argv]) == 0
    assert [json.loads(x)["tokens"] for x in capsys.readouterr().out.splitlines()] == [c.tokens for c in api]

    rows = [{"id": "a", "prompt": "the cat", **knobs}, {"id": "b", "prompt": "a dog", **knobs}]
    want = {r["id"]: jaxgen.generate(model, [r["prompt"]], seed=[row_seed(5, r["id"])], **kw)[0].tokens for r in rows}
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i, extra in enumerate(([], flag_argv)):  # knobs as row fields, then as flags (the rows' defaults)
        inp = tmp_path / "in.jsonl"
        if extra:
            inp = tmp_path / "bare.jsonl"
            inp.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n" for r in rows))
        assert cli.main(["batch", "--input", str(inp), "--output", str(tmp_path / f"out{i}.jsonl"), "--model", ck,
                         "--max-new-tokens", "7", "--stop", "e t", "--ignore-stop", "--seed", "5", *extra]) == 0
        got = {r["id"]: r["tokens"] for r in map(json.loads, open(tmp_path / f"out{i}.jsonl"))}
        assert got == want, i
    # the Ray stage: its options are the batch flags (test_a_good_value_reaches_the_request_unchanged) and
    # its rows run through the same code as `jaxgen batch` (tests/test_ray.py: stage == batch, row for row)
    args = jray.batch_args(model=ck, max_new_tokens=7, stop="e t", ignore_stop=True, seed=5, **knobs)
    assert {k: getattr(args, k) for k in knobs} == knobs and args.stop == ["e t"]


def test_signature_defaults_are_the_tables():
    """generate()'s keyword defaults are the table's (the off values its checks and beam search use)."""
    import inspect

    params = inspect.signature(jaxgen.generate).parameters
    for name, k in kn.KNOBS.items():
        assert name in params and params[name].default == k.default, name
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        assert inspect.signature(jaxgen.make_sampling_params).parameters[name].default == kn.KNOBS[name].default


def test_per_row_values_are_checked_one_by_one():
    assert list(kn.per_row("top_k", [1, 2, 3], 3, np.int32)) == [1, 2, 3]
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[0, 256\] \(0 = off\), got 2.5"):
        kn.per_row("top_k", [1, 2.5, 3], 3, np.int32, candidates=256)
    with pytest.raises(ValueError, match="one value per prompt"):
        kn.per_row("top_k", [1, 2], 3, np.int32)


def test_readme_shows_the_table():
    import pathlib

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("<!-- knobs:start -->\n")[1].split("\n<!-- knobs:end -->")[0]
    assert block == kn.markdown(), "run `python -m jaxgen.knobs` and paste its table into the README"
