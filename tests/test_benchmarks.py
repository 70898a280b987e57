"""The benchmark harness keeps working: `python -m benchmarks.run --quick` (jaxgen alone, small
settings) on the default model runs end to end, asserts no recompilation inside its timed runs, and
writes a result with a roofline for every figure."""
import json

from benchmarks import run


def test_quick_benchmark_end_to_end(tmp_path):
    result = run.main(["--quick", "--out", str(tmp_path)])
    files = list(tmp_path.glob("*-quick.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    s = result["summary"]["jaxgen/float32"]
    assert set(s["decode_tps"]) == {"1", "2"}
    assert all(d["median"] > 0 for d in s["decode_tps"].values())
    assert s["prefill_tps"]["median"] > 0 and s["first_call_s"]["median"] > 0
    assert 0 < s["roofline_fraction_b1"] < 1.5  # tokens/s against bandwidth / weight bytes
    assert result["weight_bytes"]["float32"] == 4 * result["weight_bytes"]["params"]
    assert 250e6 < result["weight_bytes"]["params"] < 300e6  # Gemma 3 270M
    # the sampling cost figure: top-k + top-p decode at the largest batch, same compiled program
    assert set(s["sampled_tps"]) == {"2"} and s["sampled_tps"]["2"]["median"] > 0
    assert s["sampling_cost"]["2"] == s["decode_tps"]["2"]["median"] / s["sampled_tps"]["2"]["median"] - 1
