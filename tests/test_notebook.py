"""notebooks/paw.ipynb, executed headless as CI's machine runs it (no GPU): it prints the plan, trains the CPU
agent with checkpoints, continues from them in a second session, evaluates, shows the newest recorded step's episodes
and plots."""

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from cpu_agent import agent_path

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_notebook():
    """Every cell in order, in a fresh kernel; the text it printed. Any failing cell raises CellExecutionError."""
    notebook = nbformat.read(REPO / "notebooks" / "paw.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])), notebook


def test_the_notebook_trains_the_cpu_agent_resumes_in_a_new_session_evaluates_and_plots(tmp_path, monkeypatch):
    agent_path()  # built here if no test has built it yet (minutes), not inside a cell with a timeout
    run_dir = tmp_path / "run"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CI's machine: no GPU
    monkeypatch.setenv("PAW_NOTEBOOK_RUN_DIR", str(run_dir))
    monkeypatch.setenv("PAW_NOTEBOOK_EVAL_GAMES", "2")
    monkeypatch.setenv("PAW_NOTEBOOK_MAX_STEPS", "1")
    printed, _ = run_notebook()
    assert "no GPU: training the CPU agent" in printed and "| **all** | 2 |" in printed
    assert (run_dir / "checkpoint-1" / "trainer_state.json").is_file()

    monkeypatch.setenv("PAW_NOTEBOOK_MAX_STEPS", "2")  # the next session: the same cells continue the run
    printed, notebook = run_notebook()
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2]
    assert (run_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC
    pages = [output["data"]["text/html"] for cell in notebook.cells for output in cell.get("outputs", [])
             if "text/html" in output.get("data", {})]  # the newest recorded step's episodes, inline
    assert len(pages) == 1 and pages[0].startswith("<iframe srcdoc=") and "paw-blobs" in pages[0]
    assert any("image/png" in output.get("data", {}) for output in notebook.cells[-1].outputs)
