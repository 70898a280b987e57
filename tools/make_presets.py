"""Presets (jaxgen/configs/<name>.toml) for the published HF checkpoints users pick first, written from
their published config.json values (tests/fixtures/hf-configs/<name>.json, as the model cards publish
them) through jaxgen's own mapping (jaxgen.checkpoint.hf.config_from_hf). No weights: the presets serve
`init_params(load_config(name))` for benchmarks and shape tests; a real checkpoint directory carries its
own config.json. tests/test_hf.py checks every preset against its JSON.

    python tools/make_presets.py
"""
import dataclasses
import json
import pathlib

from jaxgen.checkpoint.hf import config_from_hf

ROOT = pathlib.Path(__file__).resolve().parent.parent


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def main():
    for src in sorted((ROOT / "tests" / "fixtures" / "hf-configs").glob("*.json")):
        raw = json.loads(src.read_text())
        cfg = config_from_hf(raw, name=src.stem)
        arch = raw.get("architectures", ["?"])[0]
        lines = [f"# {src.stem}: the published config.json of its HF checkpoint ({arch}), mapped by",
                 "# jaxgen.checkpoint.hf.config_from_hf (written by tools/make_presets.py; values in",
                 f"# tests/fixtures/hf-configs/{src.name})."]
        lines += [f"{f.name} = {toml_value(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)]
        (ROOT / "jaxgen" / "configs" / f"{src.stem}.toml").write_text("\n".join(lines) + "\n")
        print("wrote", src.stem)


if __name__ == "__main__":
    main()
