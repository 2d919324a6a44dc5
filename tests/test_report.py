"""The HTML report renders every section it has inputs for, with its figures embedded."""

import base64
import json
import os
import re

import pytest

from decipher_jax import cli
from decipher_jax.eval import suite


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_report_renders_with_figures(tmp_path):
    w = tmp_path / "run"
    _write_jsonl(str(w / "stage1_vision" / "metrics.jsonl"),
                 [{"step": s, "loss": 9 - s, "dino": 5.0, "ibot": 3.0, "koleo": 0.5, "teacher_entropy": 4.0,
                   "feature_std": 0.1} for s in range(1, 6)])
    _write_jsonl(str(w / "stage2" / "metrics.jsonl"),
                 [{"step": s, "loss": 3 - 0.1 * s, "i2t_acc": 0.1 * s, "embed_std": 0.02} for s in range(1, 6)])
    ev = {"n_studies": 10, "n_series": 20, "chance_study_R@5": 0.5}
    keys = ["i2t_study/R@1", "i2t_study/R@5", "i2t_study/R@10", "i2t_series/R@5", "t2i_series/R@5", "i2t_series/MRR"]
    before, after = ev | dict.fromkeys(keys, 0.1), ev | dict.fromkeys(keys, 0.8)
    after["examples"] = [{"series_id": "P1_T1", "study_id": "P1", "body_region": "knee", "top_studies": ["P1", "P2"],
                          "top_reports": ["MRI knee. <b>No effusion</b>.", "MRI brain."]}]
    os.makedirs(w / "eval")
    with open(w / "eval" / "retrieval.json", "w") as f:  # the retrieval evaluator's file
        json.dump({"splits": {"test": after}, "before": {"test": before}}, f)
    rows = [{"encoder": e, "task": t, "fraction": fr, "seed": s, "balanced_accuracy": 0.5 + 0.1 * s,
             "auroc": 0.6 + 0.1 * s + 0.05 * (t == "finding: mass")}
            for e in ("random init", "stage 2 (CLIP)") for t in ("body_region", "finding: infarct", "finding: mass")
            for fr in (0.1, 1.0) for s in (0, 1)]
    rows += [{"encoder": e, "task": "age", "head": "ridge", "fraction": fr, "seed": s, "mae": 12.5 - 2 * s - fr,
              "r2": 0.25, "mae_of_mean": 16.75} for e in ("random init", "stage 2 (CLIP)") for fr in (0.1, 1.0)
             for s in (0, 1)]
    with open(w / "eval" / "probes.json", "w") as f:
        json.dump(rows, f)
    with open(w / "eval" / "compare.json", "w") as f:
        json.dump([{"a": "stage 2 (CLIP)", "b": "random init", "task": "body_region", "metric": "AUROC",
                    "gain": 0.0125, "lo": -0.005, "hi": 0.0325, "p_not_better": 0.11, "n_test": 20, "n_studies": 9,
                    "draws": 1000}], f)
    with open(w / "summary.md", "w") as f:
        f.write("# demo\nstage 2 ok\n")

    assert cli.main(["report", "--workdir", str(w)]) == 0
    page = (w / "report.html").read_text()
    for h in ("Summary", "Training curves", "Held-out retrieval", "Linear probes on frozen features"):
        assert f"<h2>{h}</h2>" in page, h
    assert "Zero-shot" not in page  # no zeroshot.json: the section is skipped, not left empty
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(pngs) == 2
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "&lt;b&gt;No effusion&lt;/b&gt;" in page and "✓ MRI knee" in page  # report text is escaped
    assert "0.80" in page and "0.10" in page
    # Probes: every task in the table, the finding tasks also grouped (mean over tasks, then seeds).
    assert "finding: mass" in page and "finding: infarct" in page
    # Age (ridge rows): its own table with MAE (mean over seeds: 12.5 - 1 - 1.0), R^2 and the floor.
    assert "[-0.005, +0.033]" in page and "9 test studies" in page  # pretrained minus random, with its interval
    assert "MAE of the training mean" in page and ">10.50</td>" in page and ">16.75</td>" in page
    s = suite.summarise(rows, "auroc", group_findings=True)
    assert set(k[1] for k in s) == {"body_region", "findings (2)"}
    assert s[("random init", "findings (2)", 1.0)] == pytest.approx((0.675, 0.05))


def test_report_skips_a_stage_without_logged_rows(tmp_path):
    """A run shorter than its log interval leaves an empty metrics.jsonl: no curve, no crash."""
    from decipher_jax import report

    w = tmp_path / "run"
    _write_jsonl(str(w / "stage1_vision" / "metrics.jsonl"), [{"step": 1, "loss": 3.0, "teacher_entropy": 1.0}])
    _write_jsonl(str(w / "stage1_text" / "metrics.jsonl"), [])
    html = open(report.build(str(w))).read()
    assert "Training curves" in html and "Stage 1 text" not in html
