"""The example notebooks run top to bottom, shrunk to a step or two on a tiny model, in a real Jupyter kernel.

Each notebook's parameter cell (tagged "parameters") is replaced by one with tiny sizes; the kernel
inherits this process's environment (HF_HUB_OFFLINE=1, the session's SMOLALIGN_CACHE), so nothing
touches the network. Any error cell fails the test.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # runs the notebooks in a kernel

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY_SIZES = {"TRAIN_PAIRS": 2, "EVAL_PAIRS": 2, "MAX_STEPS": 1, "BATCH_SIZE": 2, "MAX_LENGTH": 128}
NOTEBOOKS = {
    "dpo_hh_rlhf.ipynb": {"MODEL": "tiny", "GENERATE": 1, "MAX_NEW_TOKENS": 4},
    "orpo_vs_dpo.ipynb": {"BASE_MODEL": "tiny", "LAMBDAS": [0.1, 0.5]},
}


def shrunk(notebook: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """`notebook` with its parameter cell replaced by one assigning `values` (every name it had, no other)."""
    (index,) = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    names = [line.split("=")[0].strip() for line in notebook.cells[index].source.splitlines()
             if "=" in line and not line.startswith("#")]
    assert sorted(names) == sorted(values), "the test sets every parameter of the notebook"
    notebook.cells[index] = nbformat.v4.new_code_cell("\n".join(f"{name} = {value!r}" for name, value in values.items()))
    return notebook


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(name, tmp_path, tiny_model):
    values = {**TINY_SIZES, **NOTEBOOKS[name], "OUTPUT_DIR": str(tmp_path / "runs")}
    values = {key: str(tiny_model(0)) if value == "tiny" else value for key, value in values.items()}
    notebook = shrunk(nbformat.read(EXAMPLES / name, as_version=4), values)
    # The kernel talks over Unix sockets in tmp_path, not TCP ports another process could take meanwhile.
    kernel = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
    NotebookClient(notebook, km=kernel, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert errors == []
    shown = [output for cell in notebook.cells for output in cell.get("outputs", [])
             if "text/html" in output.get("data", {})]
    assert any("held-out accuracy" in output["data"]["text/html"] for output in shown)
    if name == "orpo_vs_dpo.ipynb":  # it ends with the comparison report, shown inline
        assert "<iframe srcdoc=" in notebook.cells[-2].outputs[0]["data"]["text/html"]
