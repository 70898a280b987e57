"""Every notebook in colab/ runs top to bottom on CPU (its install cell skips: jaxgen is installed)."""
import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "colab").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    # the kernel sees the one CPU device a Colab CPU runtime has, not the 8 fake devices of the tests
    # (with 8, make_mesh() pads every batch to 8 rows: the notebooks ran ~2x slower for nothing)
    monkeypatch.setenv("XLA_FLAGS", "")
    nb = nbformat.read(path, as_version=4)
    t = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    print(f"{path.name}: {time.perf_counter() - t:.1f}s")
