"""The notebooks (jupytext percent format) execute top to bottom, reading through analysis/ only: on the
fixture results here, and on real smoke-scale results in the slow smoke test."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def execute(path: Path, results: str, out: Path):
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    env = {"LRLORA_RESULTS": results, "LRLORA_ANALYSIS_OUT": str(out), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return nb


def test_there_are_notebooks_and_they_read_through_analysis():
    assert {p.stem for p in NOTEBOOKS} == {"commonsense", "ablations", "efficiency"}
    for p in NOTEBOOKS:
        text = p.read_text()
        assert "format_name: percent" in text and "from analysis import" in text
        assert "json.load" not in text and "glob(" not in text  # never around analysis/


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    nb = execute(path, str(ROOT / "tests" / "fixtures" / "results"), tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") == "display_data" for o in outputs)
