"""The `jaxgen` command line, run in-process on a tiny llama GGUF written by test_checkpoint's writer."""
import chex
import io
import json
import os
import sys
import warnings

import pytest

from jaxgen import cli
from jaxgen.checkpoint import orbax as O
from jaxgen.checkpoint import registry

from .conftest import TEST_XLA_FLAGS
from .conftest import random_params
from .test_checkpoint import TINY_LLAMA, write_gguf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny model as a .gguf, its preset .toml, and an Orbax checkpoint made by `jaxgen convert`."""
    d = tmp_path_factory.mktemp("cli")
    gguf_path = write_gguf(d / "tiny.gguf", TINY_LLAMA, random_params(TINY_LLAMA, seed=7))
    toml = d / "tiny.toml"
    toml.write_text(O._toml(TINY_LLAMA))
    assert cli.main(["convert", str(gguf_path), str(d / "ck"), "--config", str(toml)]) == 0
    return gguf_path, toml, d / "ck"


def run(capsys, argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_paths_env_is_one_line_before_loading(capsys, monkeypatch):
    monkeypatch.setenv("JAXGEN_PATHS", "decode_attention=flash")
    rc, out, err = run(capsys, ["generate", "hi", "--model", "/nonexistent/model.gguf"])
    assert rc == 2 and not out
    assert err.strip() == ("jaxgen generate: error: JAXGEN_PATHS: Paths.decode_attention must be one of ['full', 'live', "
                           "'pallas'], got 'flash'")  # named before the (missing) model is looked for


def test_convert_round_trip(ckpt):
    gguf_path, toml, ck = ckpt
    a = registry.load(str(gguf_path), config=str(toml))
    b = registry.load(str(ck))
    assert a.cfg == b.cfg == TINY_LLAMA and a.cfg.name == b.cfg.name == TINY_LLAMA.name
    chex.assert_trees_all_equal(a.params, b.params)


def test_json_output_fields(ckpt, capsys):
    _, _, ck = ckpt
    rc, out, err = run(capsys, ["generate", "the cat", "a", "--model", str(ck), "--json", "--ignore-stop",
                                "--max-new-tokens", "7", "--top-logprobs", "3"])
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["the cat", "a"]
    tok = registry.load(str(ck)).tokenizer
    for r in rows:
        assert set(r) == {"prompt", "text", "tokens", "finish_reason", "stop_reason", "logprobs", "timing", "top_logprobs"}
        assert len(r["tokens"]) == len(r["logprobs"]) == len(r["top_logprobs"]) == 7
        assert r["finish_reason"] == "length" and r["text"] == tok.decode(r["tokens"])
        assert all(lp <= 0 for lp in r["logprobs"])
        # greedy: the chosen token is the top alternative, with the same logprob
        assert [t[0][0] for t in r["top_logprobs"]] == r["tokens"]
        assert set(r["timing"]) == {"load_s", "compile_s", "prefill_s", "decode_s", "new_tokens"}
        assert r["timing"]["new_tokens"] == 14


def test_stream_prints_the_same_text_as_json(ckpt, capsys):
    _, _, ck = ckpt
    common = ["--model", str(ck), "--ignore-stop", "--max-new-tokens", "9", "--temperature", "0.8", "--seed", "3"]
    rc, out, _ = run(capsys, ["generate", "the tea", "--json", *common])
    text = json.loads(out)["text"]
    rc2, streamed, err = run(capsys, ["generate", "the tea", "--chunk-steps", "2", *common])
    assert rc == rc2 == 0
    assert streamed == text + "\n" and "9 tokens" in err


def test_prompts_from_stdin(ckpt, capsys, monkeypatch):
    _, _, ck = ckpt
    args = ["generate", "--model", str(ck), "--json", "--max-new-tokens", "2"]
    rc, out, _ = run(capsys, args, stdin="first\n\nsecond line\n", monkeypatch=monkeypatch)
    assert rc == 0 and [json.loads(x)["prompt"] for x in out.splitlines()] == ["first", "second line"]
    rc, out, _ = run(capsys, args + ["--json-input"], stdin='"a\\nb"\n', monkeypatch=monkeypatch)
    assert rc == 0 and json.loads(out)["prompt"] == "a\nb"
    rc, out, err = run(capsys, args + ["--json-input"], stdin="not json\n", monkeypatch=monkeypatch)
    assert rc == 2 and out == "" and err.startswith("jaxgen generate: error: stdin line 1 is not valid JSON")
    for stdin in ("", "\n  \n"):  # empty stdin: one line, exit 2 (it was exit 1)
        rc, out, err = run(capsys, args, stdin=stdin, monkeypatch=monkeypatch)
        assert (rc, out) == (2, "") and "no prompts on stdin" in err and err.count("\n") == 1, err


def test_unknown_model_is_one_line_rc2(capsys):
    """(Every bad knob and flag: tests/test_knobs.py, checked before the model loads.)"""
    rc, out, err = run(capsys, ["generate", "hi", "--model", "gpt-9"])
    assert rc == 2 and out == ""
    assert err.startswith("jaxgen generate: error: unknown model 'gpt-9'; known models: ") and err.count("\n") == 1


def test_prompt_longer_than_context(ckpt, capsys, monkeypatch):
    """One line naming both numbers (the prompt's tokens + max_new_tokens, and the context), from an
    argument and from stdin alike (a JSONL row gets it as its error field: test_batch)."""
    import re

    _, _, ck = ckpt
    want = re.compile(r"prompt 0: \d{3} tokens \+ max_new_tokens 64 exceeds tiny-llama's context of 128 tokens")
    for argv, stdin in ((["x" * 200], None), ([], "x" * 200 + "\n")):
        rc, _, err = run(capsys, ["generate", *argv, "--model", str(ck)], stdin, monkeypatch)
        assert rc == 2 and want.search(err) and err.count("\n") == 1, err


def test_mesh_flag_gives_the_same_tokens(ckpt, capsys):
    _, _, ck = ckpt
    common = ["generate", "the cat", "a", "the tea is", "--model", str(ck), "--json", "--ignore-stop",
              "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "2"]
    rc, one, _ = run(capsys, common)
    rc2, sharded, _ = run(capsys, common + ["--mesh", "data=2,model=4"])
    assert rc == rc2 == 0
    assert [json.loads(x)["tokens"] for x in one.splitlines()] == [json.loads(x)["tokens"] for x in sharded.splitlines()]
    rc, _, err = run(capsys, common + ["--mesh", "data=3"])
    assert rc == 2 and "does not divide the 8 devices" in err


def test_mesh_streaming_in_chunks(ckpt, capsys):
    _, _, ck = ckpt
    common = ["generate", "the tea", "--model", str(ck), "--ignore-stop", "--max-new-tokens", "7", "--temperature",
              "0.8", "--seed", "3", "--mesh", "data=2,model=4"]
    rc, out, _ = run(capsys, common + ["--json"])
    rc2, streamed, _ = run(capsys, common + ["--chunk-steps", "2"])
    assert rc == rc2 == 0 and streamed == json.loads(out)["text"] + "\n"


def test_quantized_convert_and_generate(ckpt, capsys, tmp_path):
    """`convert --quant` writes a quantized checkpoint; generating from it equals quantizing the GGUF
    at load time; --kv-quant int8 gives what the API gives with an int8 cache (whose log-probabilities
    differ from the float cache's); an unknown mode is refused by the parser."""
    gguf_path, toml, _ = ckpt
    assert cli.main(["convert", str(gguf_path), str(tmp_path / "q8"), "--config", str(toml), "--quant", "int8"]) == 0
    assert (tmp_path / "q8" / "quant.json").exists()
    outs = []
    for argv in (["--model", str(tmp_path / "q8")], ["--model", str(gguf_path), "--config", str(toml), "--quant", "int8"],
                 ["--model", str(tmp_path / "q8"), "--kv-quant", "int8"]):
        rc, out, err = run(capsys, ["generate", "the cat", "--json", "--ignore-stop", "--max-new-tokens", "6"] + argv)
        assert rc == 0, err
        outs.append(json.loads(out))
    assert outs[0]["tokens"] == outs[1]["tokens"]
    import dataclasses

    import jaxgen

    q8 = registry.load(str(tmp_path / "q8"))
    api = jaxgen.generate(dataclasses.replace(q8, kv_quant="int8"), ["the cat"], max_new_tokens=6, stop_ids=[])[0]
    assert outs[2]["tokens"] == api.tokens and outs[2]["logprobs"] == pytest.approx(api.logprobs, abs=1e-6)
    assert outs[2]["logprobs"] != pytest.approx(outs[0]["logprobs"], abs=1e-6)  # the int8 cache was used
    assert cli.main(["generate", "x", "--quant", "int3"]) == 2
    assert "argument --quant: invalid choice: 'int3'" in capsys.readouterr().err


def test_speculative_generate(ckpt, capsys):
    """--speculative prints the plain greedy tokens, with the acceptance statistics and the plain path's
    timing fields; a bad spec is one line on stderr and exit status 2."""
    _, _, ck = ckpt
    base = ["generate", "the cat sat on the mat and the cat", "--model", str(ck), "--json", "--ignore-stop",
            "--max-new-tokens", "12"]
    rc, out, err = run(capsys, base)
    assert rc == 0, err
    plain = json.loads(out)["tokens"]
    timing = set(json.loads(out)["timing"])
    with warnings.catch_warnings(record=True) as caught:  # (JAX warned of unusable donated buffers here)
        warnings.simplefilter("always")
        rc, out, err = run(capsys, base + ["--speculative", "lookup,ngram=2,gamma=4"])
    assert rc == 0, err
    assert not [str(w.message) for w in caught if "donated" in str(w.message)]
    row = json.loads(out)
    assert row["tokens"] == plain and set(row["timing"]) == timing and row["timing"]["new_tokens"] == 12
    assert set(row["speculative"]) == {"target_passes", "drafted", "accepted", "acceptance_rate",
                                     "tokens_per_pass", "gamma"}
    assert row["speculative"]["target_passes"] <= 11  # the first token comes from the prefill
    rc, out, err = run(capsys, base + ["--speculative", "gamma=4"])
    assert rc == 2 and "name a proposer" in err


def test_command_keeps_compiled_programs_on_disk(ckpt, tmp_path):
    """Run as a program, `jaxgen` writes JAX's persistent compilation cache under $JAXGEN_CACHE/xla
    (and not with JAXGEN_COMPILE_CACHE=0); a later run loads every program from there (a hit for each
    program the first run compiled, no miss) and gives the same tokens."""
    import subprocess

    _, _, ck = ckpt
    env = dict(os.environ, JAXGEN_CACHE=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the test run's shared cache (conftest), which the command would keep
    # count the persistent cache's hits and misses (programs compiled, then written to it)
    code = ("import sys, jax; from jaxgen import cli; ev = []\n"
            "jax.monitoring.register_event_listener(lambda e, **k: ev.append(e))\n"
            "rc = cli.main(); print('EVENTS', *(ev.count(f'/jax/compilation_cache/cache_{x}') for x in ('hits', 'misses')),"
            " file=sys.stderr); sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "generate", "--model", str(ck), "--json", "--max-new-tokens", "4", "the tea"]
    outs, events = [], []
    for off in ("1", "0", "1"):
        p = subprocess.run(cmd, env=dict(env, JAXGEN_COMPILE_CACHE="0" if off == "0" else "1"),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(json.loads(p.stdout.splitlines()[-1])["tokens"])
        events.append([int(x) for x in p.stderr.split("EVENTS")[-1].split()[:2]])
        if off == "1" and len(outs) == 1:
            cached = sorted((tmp_path / "xla").iterdir())
            assert cached, "no compiled program was written"
        if off == "0":
            assert sorted((tmp_path / "xla").iterdir()) == cached  # nothing written while off
    assert outs[0] == outs[1] == outs[2]
    assert events[0][0] == 0 and events[0][1] >= 2 and events[1] == [0, 0], events  # compiled, cache off
    assert events[2] == [events[0][1], 0], events  # every program the first run compiled came from disk


def test_out_of_memory_says_so_and_other_errors_keep_their_traceback(ckpt, capsys, monkeypatch):
    """An XLA allocation failure is reported as out of memory with what to lower (exit 3), not as bad
    input; an unexpected error is not reported as bad input either: it propagates with its traceback."""
    import importlib

    import jax

    G = importlib.import_module("jaxgen.generate")  # the module (jaxgen.generate is also the function)
    _, _, ck = ckpt
    argv = ["generate", "the cat", "--model", str(ck), "--json"]

    def oom(*a, **k):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.00GiB.\nmore")
        yield

    monkeypatch.setattr(G, "stream", oom)
    rc, out, err = run(capsys, argv)
    assert rc == 3 and "out of memory: RESOURCE_EXHAUSTED" in err and "--max-new-tokens" in err and "more" not in err

    def bug(*a, **k):
        raise RuntimeError("an internal invariant broke")
        yield

    monkeypatch.setattr(G, "stream", bug)
    with pytest.raises(RuntimeError, match="invariant"):
        cli.main(argv)


def test_stream_decoder_is_exact_and_linear(ckpt):
    """Fed one id at a time, the decoder's pieces join to the whole text, no piece holds a partial
    UTF-8 character, and the ids it decodes per push stay bounded (it re-decoded the whole history
    each push: quadratic in the output length)."""
    tok = registry.load(str(ckpt[2])).tokenizer
    text = "the tea is hot \u2014 \u65e5\u672c caf\u00e9 " * 6 + "\U0001F600 end"
    ids = tok.encode(text)
    decoded = []
    real = tok.decode
    tok.decode = lambda xs: decoded.append(len(xs)) or real(xs)
    try:
        dec = tok.stream_decoder()
        pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    finally:
        del tok.decode
    assert "".join(pieces) == real(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > 150 and max(decoded) <= 8 and sum(decoded) <= 8 * len(ids), (max(decoded), sum(decoded))


def test_n_samples_on_the_command_line(ckpt, capsys):
    """--n K prints K JSON objects per prompt (prompt-major, each with its "sample" index), equal to
    the API run on the prompts repeated K times; streamed output prints every sample."""
    import jaxgen

    _, _, ck = ckpt
    base = ["generate", "the cat", "a dog sat", "--model", str(ck), "--ignore-stop", "--max-new-tokens", "5",
            "--temperature", "0.9", "--seed", "1", "--n", "3"]
    rc, out, err = run(capsys, base + ["--json"])
    assert rc == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [(p, j) for p in ("the cat", "a dog sat") for j in range(3)]
    want = jaxgen.generate(registry.load(str(ck)), ["the cat"] * 3 + ["a dog sat"] * 3, max_new_tokens=5,
                           temperature=0.9, seed=1, stop_ids=[])
    assert [r["tokens"] for r in rows] == [w.tokens for w in want]
    rc, out, err = run(capsys, base)
    assert rc == 0 and out.count("--- [") == 6 and "'a dog sat' sample 2" in out, out
    rc, out, err = run(capsys, base + ["--n", "0"])
    assert rc == 2 and "--n must be an integer in [1, 1024], got 0" in err


def test_stop_strings_and_prefix_on_the_command_line(ckpt, capsys):
    """--stop / --include-stop / --prefix give the API's completions; streamed text equals --json's
    (the stream holds back what could begin a stop string)."""
    import jaxgen

    _, _, ck = ckpt
    model = registry.load(str(ck))
    kw = dict(max_new_tokens=12, temperature=0.9, seed=2, stop_ids=[])
    free = jaxgen.generate(model, ["the cat"], **kw)[0]
    t = free.text  # a string the free text holds (no partial character in it)
    stop = next(t[i:i + 2] for i in range(len(t) // 2, len(t) - 1) if "\ufffd" not in t[i:i + 2] and t[i:i + 2].strip())
    base = ["generate", "the cat", "--model", str(ck), "--ignore-stop", "--max-new-tokens", "12",
            "--temperature", "0.9", "--seed", "2", "--stop", stop, "--stop", "\\n\\n"]
    rc, out, err = run(capsys, base + ["--json"])
    assert rc == 0, err
    row = json.loads(out)
    want = jaxgen.generate(model, ["the cat"], stop=[stop, "\n\n"], **kw)[0]
    assert (row["text"], row["tokens"], row["stop_reason"]) == (want.text, want.tokens, stop)
    assert free.text.startswith(row["text"] + stop)
    rc, streamed, err = run(capsys, base + ["--chunk-steps", "1"])
    assert rc == 0 and streamed == row["text"] + "\n"
    rc, out, err = run(capsys, base + ["--json", "--include-stop"])
    assert json.loads(out)["text"] == want.text + stop
    rc, out, err = run(capsys, ["generate", "sat on", "--model", str(ck), "--ignore-stop", "--max-new-tokens", "5",
                                "--prefix", "the cat", "--json"])
    assert rc == 0, err
    tok = model.tokenizer
    want = jaxgen.generate(model, [tok.encode("sat on", add_bos=False)], prefix=tok.encode("the cat"),
                           max_new_tokens=5, stop_ids=[])[0]
    assert json.loads(out)["tokens"] == want.tokens
    for flags, msg in ((["--stop", ""], "non-empty string"), (["--prefix", ""], "--prefix must be a non-empty string"),
                       (["--prefix", "x", "--speculative", "lookup"], "--prefix does not combine")):
        rc, out, err = run(capsys, ["generate", "a", "--model", str(ck), *flags])
        assert rc == 2 and msg in err and err.count("\n") == 1, err


# ---- public behaviour the review found untested ---------------------------------------------------
@pytest.fixture(scope="module")
def chat_ckpt(ckpt, tmp_path_factory):
    """test_cli's tiny checkpoint with a ChatML chat template (its tokenizer spec's chat_format)."""
    import shutil

    d = tmp_path_factory.mktemp("chat") / "ck"
    shutil.copytree(ckpt[2], d)
    spec = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps({**spec, "chat_format": "chatml"}))
    return str(d)


def test_chat_and_system_flags(chat_ckpt, capsys, tmp_path):
    """--chat renders each prompt with the model's chat template (--system as its system message);
    batch --chat does the same for 'prompt' rows, and 'messages' rows run their own conversation."""
    import jaxgen

    model = registry.load(chat_ckpt)
    tok = model.tokenizer
    kw = dict(max_new_tokens=5, stop_ids=[])
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    want = jaxgen.generate(model, [tok.apply_chat_template(msgs)], **kw)[0]
    assert tok.apply_chat_template(msgs).startswith("<|im_start|>system\nbe brief<|im_end|>")
    rc, out, err = run(capsys, ["generate", "the cat", "--model", chat_ckpt, "--json", "--chat", "--system", "be brief",
                                "--max-new-tokens", "5", "--ignore-stop"])
    assert rc == 0, err
    row = json.loads(out)
    assert (row["tokens"], row["prompt"]) == (want.tokens, "the cat")
    assert row["logprobs"] == pytest.approx(want.logprobs, abs=1e-6)
    plain = jaxgen.generate(model, [tok.apply_chat_template(msgs[1:])], **kw)[0]
    rc, out, err = run(capsys, ["generate", "the cat", "--model", chat_ckpt, "--json", "--chat", "--max-new-tokens", "5",
                                "--ignore-stop"])
    row = json.loads(out)
    assert (row["tokens"], row["logprobs"]) == (plain.tokens, pytest.approx(plain.logprobs, abs=1e-6))
    assert row["logprobs"] != pytest.approx(want.logprobs, abs=1e-4)  # (the system message changes the prompt)
    rows = [{"id": 1, "prompt": "the cat"}, {"id": 2, "messages": msgs}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--model",
                     chat_ckpt, "--chat", "--max-new-tokens", "5", "--ignore-stop"]) == 0
    got = {r["id"]: r["tokens"] for r in map(json.loads, open(tmp_path / "o.jsonl"))}
    assert got == {1: plain.tokens, 2: want.tokens}


def test_json_whitespace_and_prefill_chunk_reach_the_request(ckpt, capsys, monkeypatch, tmp_path):
    """--json-whitespace is the whitespace regex of --json-schema's constraint (the API's whitespace=),
    and --prefill-chunk the model's prefill_chunk (generate and batch), with the same tokens."""
    import importlib

    import jaxgen
    from jaxgen.constraints import to_regex

    G = importlib.import_module("jaxgen.generate")
    ck = str(ckpt[2])
    model = registry.load(ck)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    kw = dict(max_new_tokens=12, temperature=1.0, seed=3, stop_ids=[])
    want = jaxgen.generate(model, ["the cat"], json_schema=schema, whitespace="[ ]?", **kw)[0]
    assert to_regex("json_schema", schema, "[ ]?") != to_regex("json_schema", schema)
    seen, real_stream = [], G.stream
    monkeypatch.setattr(G, "stream", lambda m, *a, **k: seen.append(m.prefill_chunk) or real_stream(m, *a, **k))
    rc, out, err = run(capsys, ["generate", "the cat", "--model", ck, "--json", "--json-schema", str(tmp_path / "s.json"),
                                "--json-whitespace", "[ ]?", "--max-new-tokens", "12", "--temperature", "1.0", "--seed",
                                "3", "--ignore-stop", "--prefill-chunk", "16"])
    assert rc == 0, err
    assert json.loads(out)["tokens"] == want.tokens and seen == [16]
    from jaxgen import batch_run

    chunks, real_execute = [], batch_run.execute
    monkeypatch.setattr(batch_run, "execute", lambda args, m, *a, **k: chunks.append(m.prefill_chunk) or real_execute(args, m, *a, **k))
    import jaxgen.batch as B

    monkeypatch.setattr(B, "execute", batch_run.execute)
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "the cat"}\n')
    assert cli.main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--model", ck,
                     "--prefill-chunk", "32", "--max-new-tokens", "12", "--ignore-stop"]) == 0
    assert chunks == [32]
    greedy = jaxgen.generate(model, ["the cat"], max_new_tokens=12, stop_ids=[])[0]
    assert json.loads(open(tmp_path / "o.jsonl").read())["tokens"] == greedy.tokens


def test_beam_json_has_every_paths_timing_fields(ckpt, capsys):
    _, _, ck = ckpt
    rc, out, err = run(capsys, ["generate", "the cat", "a dog", "--model", str(ck), "--json", "--num-beams", "3",
                                "--return-beams", "--max-new-tokens", "6", "--ignore-stop"])
    assert rc == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    assert len(rows) == 6 and all(set(r["timing"]) == set(cli.TIMING_KEYS) for r in rows)
    assert rows[0]["timing"]["new_tokens"] == sum(len(r["tokens"]) for r in rows) == 36
    assert rows[0]["timing"]["compile_s"] > 0 and rows[0]["timing"]["decode_s"] > 0


def test_distributed_batch_writes_one_file_per_process(ckpt, tmp_path):
    """`jaxgen batch --distributed` on 2 processes (a SLURM-like environment on localhost, 4 CPU devices
    each): process i writes OUTPUT.process-<i>-of-2 with every 2nd row, and the two files hold every
    row once, with the tokens of a one-process run."""
    import socket

    _, _, ck = ckpt
    rows = [{"id": i, "prompt": "the cat sat"[: 3 + i], "temperature": 0.8} for i in range(6)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--input", str(inp), "--model", str(ck), "--max-new-tokens", "4", "--ignore-stop"]
    assert cli.main(["batch", *flags, "--output", str(tmp_path / "one.jsonl")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from jaxgen import cli; sys.exit(cli.main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess_popen([sys.executable, "-c", code, "batch", *flags, "--output", str(tmp_path / "out.jsonl"),
                               "--distributed"],
                              dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}",
                                   JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", SLURM_JOB_ID="7", SLURM_NTASKS="2",
                                   SLURM_STEP_NODELIST="localhost", SLURM_PROCID=str(i), SLURM_LOCALID=str(i)))
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    one = {r["id"]: r["tokens"] for r in map(json.loads, open(tmp_path / "one.jsonl"))}
    parts = [[json.loads(x) for x in open(tmp_path / f"out.jsonl.process-{i}-of-2")] for i in range(2)]
    assert sorted(r["id"] for r in parts[0]) == [0, 2, 4] and sorted(r["id"] for r in parts[1]) == [1, 3, 5]
    assert {r["id"]: r["tokens"] for p in parts for r in p} == one
    assert not (tmp_path / "out.jsonl").exists()


def subprocess_popen(argv, env):
    import subprocess

    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
