"""The pipeline runner (decipher_jax.pipeline): the demo is a config of stages; a stage that
cannot run here stops the later ones and still leaves the summary of those that ran."""

import os

import ml_collections as mlc
import pytest

from decipher_jax import demo, pipeline


def test_demo_is_a_pipeline_config():
    cfg = demo.config(seed=3, data={"patients": 20})
    assert cfg.seed == 3 and cfg.stages.data.patients == 20 and cfg.stages.data.matrix == 40
    assert cfg.devices == 2 and demo.config(devices=8).devices == 8  # one simulated device per core by default
    assert list(cfg.order) == ["data", "mesh_check", "stage1_vision", "stage1_text", "stage2", "ladder", "eval", "report"]
    kinds = {n: cfg.stages[n].kind for n in cfg.order}
    assert set(kinds.values()) <= set(pipeline.STAGES)
    for name in cfg.order:  # every config a stage names exists
        if "config" in cfg.stages[name]:
            assert os.path.exists(pipeline.config_path(cfg.stages[name].config).split(":")[0]), name
    with pytest.raises(ValueError, match="no trainer"):
        from decipher_jax.trainers import module_for

        module_for("eval.py", mlc.ConfigDict())


def test_the_larger_ladder_is_the_demo_scaled():
    """experiments/configs/ladder.py (benchmarks/ladder.py): the demo's stages with a larger
    corpus, the conv stem in every ViT the pipeline trains, and longer fine-tuning runs."""
    from decipher_jax.trainers import common

    base = demo.config()
    for arg, patients, steps in (("", 400, 1200), ("gpu", 1000, 3000)):
        cfg = common.load_config("experiments/configs/ladder.py" + (f":{arg}" if arg else ""))
        assert cfg.stages.data.patients == patients and patients > base.stages.data.patients
        assert [n for n in base.order if n != "mesh_check"] == list(cfg.order)
        for name in ("stage1_vision", "stage2"):
            over = dict(cfg.stages[name].overrides)
            assert over["model.vit.stem"] == "conv" and over["data.dir"] == "{data}"
        assert dict(cfg.stages.ladder.overrides)["steps"] == steps
        assert dict(cfg.stages.stage2.overrides)["optim.lr_rules"][1] == ("image/.*", 1.0)  # as measured there
        vit = common.load_config(pipeline.config_path(cfg.stages.stage1_vision.config),
                                 {"model.vit.stem": "conv"}).model.vit
        assert vit.stem == "conv"
    assert dict(base.stages.stage2.overrides)["optim.lr_rules"][1] == ("image/.*", 0.1)
    assert dict(base.stages.stage1_vision.overrides)["steps"] == 1000
    with pytest.raises(ValueError, match="ladder.py:cpu"):
        common.load_config("experiments/configs/ladder.py:cpu")


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
