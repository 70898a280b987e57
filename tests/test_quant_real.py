"""Quantized Gemma 3 270M against float32: bounds on KL divergence, perplexity and greedy agreement that
a broken kernel, layout or scale would violate by orders of magnitude (benchmarks/quality.py reports
the full table on a longer text set). One float32 model and one of each variant per module."""
import dataclasses
import json
import pathlib

import numpy as np
import pytest

import jaxgen
from benchmarks import quality
from jaxgen import quant
from jaxgen.model import stack_layers

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "gemma3-270m.json").read_text())
SHORT = [c for c in FIXTURE["cases"] if len(c["prompt_ids"]) < 512][:4]


@pytest.fixture(scope="module")
def base():  # stacked layers: one compiled layer keeps the quality programs quick to compile
    m = jaxgen.load("gemma3-270m", "float32")
    return dataclasses.replace(m, params=stack_layers(m.params))


@pytest.fixture(scope="module")
def chunks(base):
    return quality.token_chunks(base.tokenizer, 255, 256)  # one 256-token chunk of code, one of prose


@pytest.fixture(scope="module")
def ref_cache():  # the float32 model's log-probs of each chunk, computed once for every variant
    return {}


@pytest.fixture(scope="module")
def int8(base):
    return jaxgen.load("gemma3-270m", "float32", quant="int8")  # through the GGUF: Q8_0 taken as is


def test_q8_0_embedding_is_loaded_without_a_float_round_trip(base, int8):
    emb = int8.params.embed
    assert emb.q.dtype == np.int8 and emb.group == 32 and emb.shape == (640, 262144)
    # the float32 model's embedding was dequantized from the same Q8_0 blocks: bit for bit equal
    np.testing.assert_array_equal(np.asarray(quant.dequantize(emb)).T, np.asarray(base.params.embed))


def test_int8_weights_quality(base, int8, chunks, ref_cache):
    assert quant.param_bytes(int8.params) < 0.3 * quant.param_bytes(base.params)
    ref = quality.compare(base, base, chunks, ref_cache)
    r = quality.compare(base, int8, chunks, ref_cache)
    assert r["kl"] < 0.01, r  # measured 0.0006 nats/token on 1k tokens
    assert abs(r["ppl"] / ref["ppl"] - 1) < 0.02, (r, ref)
    agree = quality.greedy_agreement(int8, SHORT)
    assert agree["agreement"] >= 0.6, agree  # bfloat16 weights agree ~75% over 32 tokens


def test_int8_kv_cache_quality(base, chunks, ref_cache):
    m = dataclasses.replace(base, kv_quant="int8")
    r = quality.compare(base, m, chunks, ref_cache)
    assert r["kl"] < 0.01, r
    assert quality.greedy_agreement(m, SHORT)["agreement"] >= 0.4


def test_int4_weights_quality(base, chunks, ref_cache):
    m = dataclasses.replace(base, params=quant.quantize_params(base.params, "int4"))
    assert quant.param_bytes(m.params) < 0.2 * quant.param_bytes(base.params)
    r = quality.compare(base, m, chunks, ref_cache)
    assert r["kl"] < 0.5, r  # measured 0.27; a wrong nibble order or zero point gives several nats


def _peak_rss_mb(args):
    import subprocess
    import sys

    code = ("import sys; from jaxgen import cli; rc = cli.main(sys.argv[1:]); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "generate", "The capital of France is", "--max-new-tokens", "8",
                        "--json", *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.strip().splitlines()[-1]) / 1024


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_int8_generate_uses_less_memory_than_float32(int8):  # int8: its conversion is cached by then
    f32, q8 = _peak_rss_mb(["--dtype", "float32"]), _peak_rss_mb(["--dtype", "float32", "--quant", "int8"])
    assert q8 < 0.75 * f32, (q8, f32)  # measured 0.96 GB vs 2.1 GB
