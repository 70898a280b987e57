"""jaxgen as users install it: a built wheel (not this editable checkout) holds everything `jaxgen
generate` needs. Built with pip, installed with --no-deps into a temporary target (the rest comes from
this environment), imported and run from another directory: it loads the default preset (Gemma 3
270M) and generates HF transformers' greedy tokens (tests/fixtures/gemma3-270m.json)."""
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

import jaxgen

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (path,) = out.glob("jaxgen-*.whl")
    return path


def test_the_wheel_holds_the_package_and_its_presets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    presets = sorted(n for n in names if n.startswith("jaxgen/configs/") and n.endswith(".toml"))
    assert [pathlib.Path(n).stem for n in presets] == jaxgen.preset_names()  # every preset, nothing else
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "jaxgen").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))
    assert wheel.name.startswith(f"jaxgen-{jaxgen.__version__}-")


def test_installed_wheel_generates_from_another_directory(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(target), XLA_FLAGS="")  # the wheel's jaxgen first; one CPU device
    where = subprocess.run([sys.executable, "-c", "import jaxgen; print(jaxgen.__file__, jaxgen.preset_names())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.startswith(str(target / "jaxgen" / "__init__.py")) and "gemma3-270m" in where.stdout
    run = subprocess.run([str(target / "bin" / "jaxgen"), "generate", "The capital of France is", "--json",
                          "--max-new-tokens", "12"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    ref = json.loads((ROOT / "tests" / "fixtures" / "gemma3-270m.json").read_text())["cases"][0]
    assert ref["prompt"] == "The capital of France is"
    assert json.loads(run.stdout)["tokens"] == ref["greedy_ids"][:12]
