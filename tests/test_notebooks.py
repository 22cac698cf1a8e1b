"""Every notebook runs top to bottom on the CPU in smoke mode (PAGEDLAB_SMOKE=1) and draws its figures, and is
committed clean: no outputs, and a `parameters` cell for papermill."""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_seven_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == [f"{i:02d}_" for i in range(1, 8)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_with_a_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "strip the outputs"
    assert any("parameters" in cell.metadata.get("tags", []) for cell in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode_and_draws(path, monkeypatch):
    monkeypatch.setenv("PAGEDLAB_SMOKE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    images = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert images, f"{path.name} drew no figure"
    # nbclient stands in for an ipywidgets.Output by sending its captured outputs back on the kernel's shell socket
    # (a plain send on the socket it is polling for the cell's execute_reply), which can swallow that reply's
    # wakeup: the cell then waits out `timeout` (07 took 300 s more). The lab draws into Image widgets instead.
    outputs = [state for state in client.widget_state.values() if state.get("_model_name") == "OutputModel"]
    assert not outputs, f"{path.name} displays into {len(outputs)} ipywidgets.Output; set an Image widget's value"
