"""notebooks/results.ipynb executes (nbclient, a real kernel) on a small synthetic results set."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from benchmark.core.config import REPO_ROOT
from benchmark.core.store import write_summary
from tests.helpers.results import write_synthetic_results

NOTEBOOK = REPO_ROOT / "notebooks" / "results.ipynb"


def test_notebook_redraws_figures_and_table(tmp_path, monkeypatch):
    results = tmp_path / "results"
    n = write_synthetic_results(results)
    write_summary(results)
    monkeypatch.setenv("VPT_RESULTS", str(results))  # the kernel inherits this process's environment
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs)
    assert f"{n} runs in" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 2  # Fig. 3 and the parameter plot
    markdown = "".join(out["data"].get("text/markdown", "") for out in outputs if "data" in out)
    assert "| VPT-deep |" in markdown and "2.5↑ / 0.001" in markdown  # the chosen lr, the top of its grid
    # the audits: these synthetic runs kept no curves or predictions, and the notebook says so
    assert "# Audits from what the runs kept" in markdown and "it needs AUDIT=1" in markdown
    assert "No run kept its predictions" in markdown and "wise_ft.csv: `python -m benchmark.report --wise-ft`" in text
