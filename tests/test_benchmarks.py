"""The benchmark harness keeps working: `python -m benchmarks.run --quick` (jaxgen alone, small
settings) on the default model runs end to end, asserts no recompilation inside its timed runs, and
writes a result with a roofline for every figure."""
import json

import pytest

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
    assert result["machine"] == files[0].name.split("-20")[0] and result["cpu"] == run.cpu()
    # the sampling cost figure: top-k + top-p decode at the largest batch, same compiled program
    assert set(s["sampled_tps"]) == {"2"} and s["sampled_tps"]["2"]["median"] > 0
    assert s["sampling_cost"]["2"] == s["decode_tps"]["2"]["median"] / s["sampled_tps"]["2"]["median"] - 1


def test_cpu_names_the_host_and_its_matrix_units():
    # hosts that share the name x86_64-2cpu differ in what decides XLA:CPU's fastest layouts
    xeon = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
            "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
            "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\nflags\t\t: fpu\n")
    assert run.cpu(xeon) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz with AVX-512, AVX-512 BF16, AMX"
    assert run.cpu("model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f\n") == "AMD EPYC with AVX-512"
    assert run.cpu("model name\t: Some ARM\nflags\t\t: fp asimd\n") == "Some ARM"


def test_busy_time_is_the_union_of_intervals():
    from benchmarks.step_profile import busy_ns

    assert busy_ns([(20, 25), (0, 10), (5, 15), (6, 7)]) == 20 and busy_ns([]) == 0


def test_step_profile_differences_two_traces():
    """per_step: (long - short) / steps for busy time, self times and launches; the program is the
    generate module; copies counted; a trace with no op events gives zeros (no device plane seen)."""
    from benchmarks.step_profile import per_step

    def trace(steps):  # each step: a 3 ms matmul then a 1 ms copy, 1 ms apart; a 5 ms prefill first
        ev = [(0, 5e6)] + [(6e6 + i * 5e6, 9e6 + i * 5e6) for i in range(steps)] + \
             [(9e6 + i * 5e6, 10e6 + i * 5e6) for i in range(steps)]
        return {"jit_generate_tokens": {"ops": {"prefill": [5e6, 1, "k0"], "dot.1": [3e6 * steps, steps, "gemm"],
                                                "copy.2": [1e6 * steps, steps, "MemcpyDtoH"]},
                                        "intervals": ev, "copies": {"MemcpyDtoH": steps}},
                "jit_other": {"ops": {"x": [1e9, 1, "x"]}, "intervals": [(0, 1)], "copies": {}}}

    p = per_step(trace(10), trace(30), 0.060, 0.160, 20, top=5)
    assert p["program"] == "jit_generate_tokens" and p["busy_ms"] == pytest.approx(4.0)
    assert p["wall_ms"] == pytest.approx(5.0) and p["busy_fraction"] == pytest.approx(0.8)
    assert [(r["op"], r["ms"], r["launches"]) for r in p["top"]] == [("dot.1", 3.0, 1.0), ("copy.2", 1.0, 1.0)]
    assert p["launches"] == 2 and p["copies"] == {"MemcpyDtoH": 1.0} and p["launched"] == ["copy.2", "dot.1"]
    none = per_step({}, {}, 0.1, 0.2, 10, top=5)
    assert none["busy_ms"] == 0 and none["top"] == [] and none["launches"] == 0


def test_accelerator_benchmark_smoke(tmp_path):
    """`python -m benchmarks.accelerator --smoke` (the GPU script on a tiny preset, on this CPU) runs end to
    end and writes every field of its rows, so the script a GPU session runs has not rotted."""
    from benchmarks import accelerator
    from benchmarks.moe import config
    from jaxgen import moe as moe_lib

    cfg = config(quick=True)
    result = accelerator.main(["--smoke", "--no-hf", "--out", str(tmp_path)])
    saved = json.loads(next(tmp_path.glob("*-accelerator-smoke.json")).read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"])) and [r["batch"] for r in saved["rows"]] == [1, 2]
    assert saved["complete"] is True
    for r in saved["rows"]:
        assert r["decode_tok_s"] > 0 and 0 < r["roofline_fraction"] < 1.5 and r["compile_s"] > 0
    assert saved["rows"][0]["prefill_tok_s"]["64"] > 0 and saved["bandwidth_gb_s"] > 0
    assert "| tiny-gemma3 | 2 |" in accelerator.table(saved, "x.json")
    # the step profile (benchmarks.step_profile): a traced decode step, its ops named by jaxgen's lines
    (prof,) = saved["profiles"]
    cfg_smoke = accelerator.smoke_config()
    # (wall and busy ms are differences of two timings of 15 tiny steps: on a loaded CI machine noise can
    # flip their sign, so only their presence is checked; per_step's arithmetic is tested above)
    assert prof["program"] == "jit_generate_tokens" and prof["batch"] == 2 and "wall_ms" in prof and "busy_ms" in prof
    assert prof["launches"] >= cfg_smoke.n_layers and 1 <= len(prof["top"]) <= 15  # launches: counts, exact
    # a step's matmuls are the model's projections, traced back to model._matmul (by launches: which ops rank
    # in the timed top 15 of a tiny step is noise on a loaded 2-core machine, where CI once saw none there)
    assert any("dot_general @ model.py:" in s and "_matmul" in s for s in prof["launched_sources"])
    assert "| 2 | " in "\n".join(accelerator.profile_table(saved["profiles"]))
    # the paths A/B: the default and every flip of it, each decoding (on CPU the kernel runs interpreted)
    variants = [r["variant"] for r in saved["paths_rows"]]
    assert variants[0] == "default" and "decode_attention=pallas" in variants and "int8 dequant=bfloat16" in variants
    for r in saved["paths_rows"]:
        assert "error" not in r and r["decode_tok_s_uniform_greedy"] > 0 and r["decode_tok_s_uniform_sampled"] > 0
    assert "| decode_attention=pallas |" in accelerator.table(saved, "x.json")
    # the MoE rows (issue 31 on the device; the smoke runs the default and one forced computation, every
    # computation's equality is tests/test_moe.py's): the default's choice named
    moe = saved["moe"]
    assert [(r["impl"], r["batch"]) for r in moe["rows"]] == [("auto", 1), ("gathered", 1)]
    for r in moe["rows"]:
        assert r["decode_tok_s"] > 0 and r["computation"] == (moe_lib.choose(cfg, r["batch"]) if r["impl"] == "auto"
                                                              else r["impl"])
        # (steady-state rates are differences of two timings: on a tiny model noise can make one
        # implausibly large, so only their presence is checked here; the bounds hold in real runs)
        assert 0 < r["experts_per_layer"] <= r["batch"] * cfg.n_experts_per_tok and r["roofline_fraction"] > 0
    assert moe["prefill_tok_s"] > 0 and moe["dense_reference"]["roofline_fraction"] > 0
    assert "| auto (picked) | 1 |" in accelerator.table(saved, "x.json")


def test_accelerator_table_of_a_partial_run(tmp_path, monkeypatch):
    """A device run's results file as the README shows it when a model failed, HF failed on another and
    the run was stopped at its time limit (the file is rewritten after every stage); --readme-from writes
    the table of a file that came back from the device."""
    from benchmarks import accelerator

    ok = dict(model="m1", batch=1, decode_tok_s=100.0, roofline_fraction=0.5, compile_s=2.0, hf_decode_tok_s=None,
              prefill_tok_s={"2048": 9000.0}, hf_prefill_tok_s=None, hf_error="OutOfMemoryError: CUDA out of memory")
    result = {"date": "2026-12-06", "device_kind": "NVIDIA H200", "jax": "0.11.2", "bandwidth_gb_s": 4000.0,
              "paths": {}, "rows": [ok, dict(model="m2", error="XlaRuntimeError: RESOURCE_EXHAUSTED")],
              "skipped": [], "complete": False}
    text = accelerator.table(result, "r.json")
    assert "| m1 | 1 | 100 | 50% | - | 2.0 | 2048: 9000 / nan |" in text
    assert "| m2 | | error: XlaRuntimeError: RESOURCE_EXHAUSTED |" in text
    assert "HF transformers failed on m1: OutOfMemoryError" in text and "stopped before its end" in text
    (tmp_path / "r.json").write_text(json.dumps(result))
    written = []
    monkeypatch.setattr(accelerator, "update_readme", lambda table, marker: written.append((table, marker)))
    accelerator.main(["--readme-from", str(tmp_path / "r.json")])
    assert len(written) == 1 and written[0][1] == "accelerator" and "| m2 | | error:" in written[0][0]

