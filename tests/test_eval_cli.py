"""``decipher eval`` evaluates any run (here one the demo did not make) through the evaluator
registry, and ``decipher report`` renders the evaluators' files."""

import json
import os

import numpy as np
import pytest

from decipher_jax import cli
from decipher_jax.eval import evaluators

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")


def test_train_then_eval_then_report(prepared_heldout, minilm_path, tmp_path):
    run, out = str(tmp_path / "my_siglip"), str(tmp_path / "evaluated")
    assert cli.main(["train", "--config", os.path.join(CONFIGS, "clip_align.py") + ":tiny,locktext,siglip",
                     "--workdir", run, f"--config.data.dir={prepared_heldout}", "--config.init.vision=",
                     "--config.init.text=minilm", "--config.steps=6", "--config.optim.warmup_steps=2",
                     "--config.eval.before=False", "--config.eval.splits=()", "--config.async_checkpoints=False"]) == 0
    # The ladder's trained rungs through the pipeline's ladder stage (as the demo runs it): the
    # findings from random init, with the run's ViT, and fine-tuned from the run; all labels.
    import ml_collections as mlc

    from decipher_jax import pipeline, runs

    ctx = pipeline.Context(out, mlc.ConfigDict({"title": "t"}), data=prepared_heldout)
    st = mlc.ConfigDict({"kind": "ladder", "tasks": ("findings",), "fractions": (1.0,), "init": run,
                         "config": "finetune.py:{task},tiny",
                         "overrides": (("steps", 6), ("optim.warmup_steps", 2), ("async_checkpoints", False),
                                       ("eval.every", 0))})
    pipeline.ladder_stage(ctx, st)
    assert ctx.lines[-1].startswith("ladder: 2 fine-tuning runs")
    lad_dir = os.path.join(out, "ladder", "findings")
    assert sorted(os.listdir(lad_dir)) == ["fine-tuned-1", "supervised-1"]
    assert runs.read_spec(os.path.join(lad_dir, "supervised-1"))["vit"] == runs.read_spec(run)["vit"]
    assert runs.read_spec(os.path.join(lad_dir, "supervised-1"))["config"]["init"] == ""
    assert runs.read_spec(os.path.join(lad_dir, "fine-tuned-1"))["config"]["init"] == run
    pipeline.ladder_stage(ctx, st)  # finished runs are kept, not retrained
    assert ctx.lines[-1].startswith("ladder: 0 fine-tuning runs")
    # A stage 2 written after them (a rerun of the pipeline retrains it) makes the fine-tuned rung
    # stale: it trains afresh from the new run; the supervised rung (same data) is kept.
    import time

    later = time.time() + 5
    os.utime(os.path.join(run, "run_spec.json"), (later, later))
    kept = os.path.getmtime(os.path.join(lad_dir, "supervised-1", "test.json"))
    pipeline.ladder_stage(ctx, st)
    assert ctx.lines[-1].startswith("ladder: 1 fine-tuning runs") and "fine-tuned @ 1" in ctx.lines[-1]
    assert os.path.getmtime(os.path.join(lad_dir, "supervised-1", "test.json")) == kept
    assert os.path.getmtime(os.path.join(lad_dir, "fine-tuned-1", "run_spec.json")) >= later - 5
    # All evaluators but segmentation (tests/test_segtasks.py); the corpus has no val split.
    assert cli.main(["eval", "--config", os.path.join(CONFIGS, "eval.py") + ":tiny,retrieval,zeroshot,localisation,"
                     "rerank,probes,ladder", "--workdir", out, f"--config.runs.align={run}"]) == 0
    res = evaluators.load_results(out)
    assert set(res) >= {"retrieval", "zeroshot", "localisation", "rerank", "probes", "compare", "ladder"}
    assert "'val' split" in res["rerank"]["skipped"]  # one way to handle a missing split
    r = res["retrieval"]["splits"]["test"]
    assert r["n_studies"] >= 10 and 0 <= r["i2t_study/R@5"] <= 1
    assert "before" not in res["retrieval"]  # this run recorded no "before" evaluation
    assert 0 <= res["zeroshot"]["body_region"]["accuracy"] <= 1
    loc = res["localisation"]  # the text-guided map, and the visual map of stage 2 and of its floor
    assert loc["n_series"] > 0 and set(loc["visual"]) == {"stage 2", "random init"} and loc["bank_series"] > 0
    assert all(0 <= v["voxel_auroc_body"] <= 1 for v in [loc, *loc["visual"].values()])
    for v in loc["visual"].values():  # detection by each visual map's maximum, on every test series
        det = v["detection"]
        assert det["n_series"] > loc["n_series"] and 0 < det["n_abnormal"] < det["n_series"]
        assert 0 <= det["abnormal_auroc"] <= 1 and set(det["per_region"]) >= {"brain"}
    rows = res["probes"]
    # The attributes read the mean and max pools; the findings and "abnormal" whichever of those and
    # the anomaly pool has the lower held-out loss, one choice per encoder and seed for all of them.
    finding = lambda r_: r_["task"] == "abnormal" or r_["task"].startswith("finding")  # noqa: E731
    assert {r_["feature"] for r_ in rows if not finding(r_)} == {"mean+max"}
    assert all(set(r_["readout_losses"]) == {"mean+max", "anomaly"} for r_ in rows if finding(r_))
    for key in {(r_["encoder_id"], r_["fraction"], r_["seed"]) for r_ in rows}:
        fam = [r_ for r_ in rows if finding(r_) and (r_["encoder_id"], r_["fraction"], r_["seed"]) == key]
        assert len({r_["feature"] for r_ in fam}) == 1 and len({str(r_["readout_losses"]) for r_ in fam}) == 1
        losses = fam[0]["readout_losses"]
        assert fam[0]["feature"] == min(losses, key=losses.get)
    # Stable ids; the display name says how the run was trained (SigLIP, not "CLIP").
    assert {(r_["encoder_id"], r_["encoder"]) for r_ in rows} == {("align", "stage 2 (SigLIP)"), ("random", "random init")}
    assert {(c["a_id"], c["a"], c["b_id"]) for c in res["compare"]} == {("align", "stage 2 (SigLIP)", "random")}
    # The cross-sex test: each encoder's probes fitted on one sex, scored on each.
    cross = res["cross_sex"]
    assert {(r_["fit_on"], r_["score_on"]) for r_ in cross} == {("F", "F"), ("F", "M"), ("M", "F"), ("M", "M")}
    assert {r_["encoder"] for r_ in cross} == {"stage 2 (SigLIP)", "random init"} and "sex" not in {r_["task"] for r_ in cross}

    # The ladder: the frozen probes' rungs and the two trained ones, on the same test studies.
    lad = res["ladder"]["rows"]
    assert {(r_["rung"], r_["kind"]) for r_ in lad} == {("stage 2 (SigLIP)", "frozen"), ("random init", "frozen"),
                                                         ("supervised", "trained"), ("fine-tuned", "trained")}
    assert len({r_["n_studies"] for r_ in lad}) == 1 and all(r_["lo"] <= r_["score"] <= r_["hi"] for r_ in lad)
    probe_findings = [r_["auroc"] for r_ in rows if r_["encoder_id"] == "random" and r_["task"].startswith("finding")
                      and r_["fraction"] == 1.0 and r_["seed"] == 0]
    random_rung = [r_ for r_ in lad if r_["rung"] == "random init"][0]
    assert random_rung["score"] == pytest.approx(np.nanmean(probe_findings))  # the probes' own figure
    ft = json.load(open(os.path.join(out, "ladder", "findings", "fine-tuned-1", "test.json")))
    assert [r_ for r_ in lad if r_["rung"] == "fine-tuned"][0]["score"] == pytest.approx(ft["test"]["score"])

    assert cli.main(["report", "--workdir", out]) == 0
    page = open(os.path.join(out, "report.html")).read()
    for h in ("The ladder", "Held-out retrieval", "Linear probes on frozen features", "Zero-shot", "rerank",
              "Anomaly localisation"):
        assert f"<h2>{h}</h2>" in page, h
    assert "Cross-sex test" in page and "Detection by the visual map" in page
    assert "the findings and abnormal: mean+max (the mean pool beside the channel-wise max pool) or anomaly (the tokens pooled towards the patches farthest" in page
    assert "chosen with the penalty per encoder" in page
    assert "skipped: " in page


def test_registry_refuses_unknown_names_and_settings():
    with pytest.raises(KeyError, match="unknown evaluator 'nope'"):
        evaluators.from_config({"nope": {}})
    with pytest.raises(TypeError, match="unknown settings \\['seed'\\]"):
        evaluators.from_config({"probes": {"seed": 1}})
    two = evaluators.from_config({"few": {"type": "probes", "fractions": (0.1,)}, "all": {"type": "probes"}},
                                 order=("all", "few"))
    assert [(e.name, type(e).__name__, e.settings["fractions"]) for e in two] == [
        ("all", "Probes", (0.1, 0.3, 1.0)), ("few", "Probes", (0.1,))]


def test_eval_without_runs_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["eval", "--config", os.path.join(CONFIGS, "eval.py"), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr()
    assert "no run to evaluate" in err.err and f"no run at {tmp_path}/stage2" in err.out
    assert not os.path.exists(os.path.join(tmp_path, "eval"))


def test_results_are_json_files_by_name(tmp_path):
    ctx = evaluators.Context(out=str(tmp_path), data=str(tmp_path / "nodata"))

    class Echo(evaluators.Evaluator):
        name = "echo"

        def run(self, ctx):
            ctx.source("test")  # no prepared data: MissingSplit, recorded as skipped

    said = []
    res = evaluators.run_all([Echo()], ctx, say=said.append)
    with open(tmp_path / "eval" / "echo.json") as f:
        assert json.load(f) == res["echo"] and "skipped" in res["echo"]
    assert said and said[0].startswith("echo: skipped")
