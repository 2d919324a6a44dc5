"""The pipeline runner (decipher_jax.pipeline): the demo is a config of stages; a stage that
cannot run here stops the later ones and still leaves the summary of those that ran."""

import os

import ml_collections as mlc
import pytest

from decipher_jax import demo, pipeline


def test_demo_is_a_pipeline_config():
    cfg = demo.config(seed=3, data={"patients": 20})
    assert cfg.seed == 3 and cfg.stages.data.patients == 20 and cfg.stages.data.matrix == 40
    assert list(cfg.order) == ["data", "mesh_check", "stage1_vision", "stage1_text", "stage2", "ladder", "eval", "report"]
    kinds = {n: cfg.stages[n].kind for n in cfg.order}
    assert set(kinds.values()) <= set(pipeline.STAGES)
    for name in cfg.order:  # every config a stage names exists
        if "config" in cfg.stages[name]:
            assert os.path.exists(pipeline.config_path(cfg.stages[name].config).split(":")[0]), name
    with pytest.raises(ValueError, match="no trainer"):
        from decipher_jax.trainers import module_for

        module_for("eval.py", mlc.ConfigDict())


def test_missing_requirement_stops_later_stages_and_keeps_the_summary(tmp_path):
    cfg = mlc.ConfigDict({"title": "t", "devices": 8, "mesh": {"data": -1}, "order": ("first", "needs", "after"),
                          "stages": {"first": {"kind": "prepared", "dir": str(tmp_path / "nowhere")},
                                     "needs": {"kind": "train", "config": "vision_ssl.py:tiny",
                                               "requires": "no_such_package_here"},
                                     "after": {"kind": "report"}}})
    from decipher_jax.eval import evaluators

    with pytest.raises(evaluators.MissingSplit, match="nowhere"):  # prepared data that is not there
        pipeline.run(cfg, str(tmp_path / "w"))
    cfg.order = ("needs", "after")
    assert pipeline.run(cfg, str(tmp_path / "w")) == 0
    summary = (tmp_path / "w" / "summary.md").read_text()
    assert "no_such_package_here not installed" in summary
    assert not (tmp_path / "w" / "report.html").exists() and not (tmp_path / "w" / "needs").exists()
