"""examples/colab_tpu.ipynb executes on CPU: nothing installed, the TPU-only cells say they skip, the rest runs.

The kernel inherits ``GQA_JAX_SOURCE`` (this checkout, already installed: the
install cell does nothing) and ``JAX_PLATFORMS=cpu``. The end-to-end cell
runs the layer and `generate` at a tiny size; a last, added cell checks that a
failing command (as a failing pytest run would be) fails the notebook.
"""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "colab_tpu.ipynb"


def _text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out["output_type"] == "stream")


def test_the_notebook_asks_for_a_v5e_tpu():
    metadata = nbformat.read(NOTEBOOK, as_version=4).metadata
    assert metadata["accelerator"] == "TPU" and metadata["colab"]["gpuType"] == "V5E1"


@pytest.mark.slow  # ~30 s of CPU: a kernel, jax, and the end-to-end cell compiling at a tiny size
def test_runs_on_cpu_up_to_the_tpu_cells(monkeypatch):
    monkeypatch.setenv("GQA_JAX_SOURCE", str(ROOT))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        failing = nbformat.v4.new_code_cell('run(sys.executable, "-c", "print(\'1 failed\'); raise SystemExit(1)")')
        with pytest.raises(CellExecutionError, match="CalledProcessError"):
            client.execute_cell(failing, len(nb.cells))
        assert "1 failed" in _text(failing)

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert not [out for cell in code for out in cell.outputs if out["output_type"] == "error"]
    printed = [_text(cell) for cell in code]
    assert printed[0].startswith(f"GQA_JAX_SOURCE={ROOT}: using the gqa-jax installed here")
    assert "No TPU here (backend 'cpu'): the TPU-only cells below say so and skip." in printed[1]
    skips = [line for text in printed for line in text.splitlines() if line.startswith("skipped: no TPU")]
    assert len(skips) == 3, printed  # the compiled tests, the dispatch check, the benchmarks
    end_to_end = next(text for text in printed if "generate implementation" in text)
    assert "layer    implementation=None   B=2 T=32 D=64, causal:" in end_to_end
    assert "generate implementation=None   2 prompts of 4..8 tokens, 4 new each:" in end_to_end
