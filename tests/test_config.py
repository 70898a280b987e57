import dataclasses
import re

import pytest

from jaxgen.config import FIELDS, ModelConfig, config_from_dict, load_config, preset_names


def test_every_preset_loads_and_is_hashable():
    names = preset_names()
    assert {"gemma3-270m", "smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        hash(cfg)  # a static jit argument must hash
        assert cfg == load_config(name)


def test_gemma3_270m_layer_pattern():
    cfg = load_config("gemma3-270m")
    assert [i for i, g in enumerate(cfg.layer_kinds) if g] == [5, 11, 17]
    assert (cfg.n_local, cfg.n_global) == (15, 3)
    assert cfg.attn_scale == pytest.approx(256 ** -0.5)
    assert cfg.embed_multiplier == pytest.approx(640 ** 0.5)


def test_all_global_when_no_window():
    cfg = load_config("smollm2-135m")
    assert cfg.n_local == 0 and cfg.n_global == 30


def test_preset_files_name_every_field():
    # one file per preset, fields 1:1 with the dataclass
    import tomllib
    from jaxgen.config import CONFIG_DIR, preset_names
    assert len(preset_names()) >= 4
    for name in preset_names():
        assert set(tomllib.loads((CONFIG_DIR / f"{name}.toml").read_text())) == set(FIELDS), name


def test_unknown_field_is_named():
    d = dataclasses.asdict(load_config("smollm2-135m"))
    d["n_layer"] = 3
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['n_layer'\]"):
        config_from_dict(d)


def test_missing_and_bad_fields():
    d = dataclasses.asdict(load_config("smollm2-135m"))
    del d["d_model"]
    with pytest.raises(ValueError, match="missing config field"):
        config_from_dict(d)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        load_config("smollm2-135m").replace(n_kv_heads=4)
    with pytest.raises(ValueError, match="activation"):
        load_config("smollm2-135m").replace(activation="relu")


@pytest.mark.parametrize("field, value, message", [
    ("max_seq_len", True, "max_seq_len must be an integer, got True"),  # (was read as 1)
    ("norm_eps", "x", "norm_eps must be a finite number, got 'x'"),  # (was a TypeError)
    ("rope_theta", float("inf"), "rope_theta must be a finite number"),
    ("layer_pattern", 5, "layer_pattern must be a string"), ("qk_norm", 1, "qk_norm must be true or false"),
    ("sliding_window", 2.5, "sliding_window must be an integer")])
def test_field_types_are_checked(field, value, message):
    """Each field's type before its range (a config file edited by hand), one line naming it."""
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_dict({**dataclasses.asdict(load_config("smollm2-135m")), field: value})


def test_integer_floats_are_floats():
    cfg = config_from_dict({**dataclasses.asdict(load_config("smollm2-135m")), "norm_eps": 1, "rope_theta": 10000})
    assert isinstance(cfg.norm_eps, float) and isinstance(cfg.rope_theta, float)  # (an int eps was traced as int32)
    assert cfg == load_config("smollm2-135m").replace(norm_eps=1.0, rope_theta=10000.0)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="gemma3-270m"):
        load_config("gemma-7b")


def test_enable_compile_cache_for_api_users(tmp_path, monkeypatch):
    """jaxgen.enable_compile_cache() turns JAX's persistent compilation cache on (in $JAXGEN_CACHE/xla or a
    given directory), keeps a directory already configured, and JAXGEN_COMPILE_CACHE=0 keeps it off."""
    import jax

    import jaxgen

    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path))
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("JAXGEN_COMPILE_CACHE", "0")
        assert jaxgen.enable_compile_cache() is None and not jax.config.jax_compilation_cache_dir
        monkeypatch.delenv("JAXGEN_COMPILE_CACHE")
        assert jaxgen.enable_compile_cache() == str(tmp_path / "xla") == jax.config.jax_compilation_cache_dir
        assert jaxgen.enable_compile_cache(tmp_path / "other") == str(tmp_path / "xla")  # configured: kept
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
