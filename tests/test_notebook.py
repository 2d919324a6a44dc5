"""experiments/notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel (the tiny
pipeline at an even smaller setting) and leaves the report and the per-stage outputs behind."""

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "experiments", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes(tmp_path, minilm_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    work = tmp_path / "quickstart"
    params[0].source = (f"WORKDIR = {str(work)!r}\nN_PATIENTS = 14\nVISION_STEPS = 3\nTEXT_STEPS = 2\n"
                        "CLIP_STEPS = 3")
    env_before = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"  # the kernel inherits the test environment (8 CPU devices)
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("JAX_PLATFORMS", None)
        else:
            os.environ["JAX_PLATFORMS"] = env_before
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "held-out image->report R@5 after stage 2" in text and "zero-shot body region" in text
    assert "CpuDevice(id=7)" in text  # the simulated 8-device mesh
    for sub in ("stage1_vision", "stage1_text", "stage2"):
        assert os.path.isdir(work / sub / "checkpoints"), sub
    with open(work / "stage2" / "eval_test.json") as f:
        assert set(json.load(f)) >= {"before", "after"}
    with open(work / "eval" / "probes.json") as f:
        selection = {r["task"]: r["selection"] for r in json.load(f)}
    assert selection["body_region"] == "val"  # penalties chosen on patients no encoder trained on
    html = (work / "report.html").read_text()
    assert "<img" in html and "probe" in html.lower() and "chosen on the val split" in html
