"""The brain-tissue task end to end on the real MNI152 volume nilearn ships, prepared through
``decipher prep``: heads on a frozen (random-init) ViT learn grey / white matter on the left
hemisphere and segment the right one by sliding windows; the report shows the section."""

import json
import os

import jax
import numpy as np
import pytest

from decipher_jax import report
from decipher_jax import sharding as sh
from decipher_jax.models.vit3d import ViT3D, ViTConfig
from decipher_jax.state import Model


@pytest.fixture(scope="module")
def mni_prep(tmp_path_factory):
    pytest.importorskip("nilearn")
    from data_prep import manifest, prep, volume
    from decipher_jax.data import corpus

    d = tmp_path_factory.mktemp("mni")
    rows = [r for r in corpus.real_volumes(str(d / "real")) if r["series_id"] == "MNI152_T1"]
    m = manifest.write(str(d / "manifest.csv"), rows)
    res = prep.run(m, str(d / "prep"), prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(6.0,) * 3),
                                                            split_fractions=(1.0, 0.0, 0.0), workers=1), progress=False)
    return res.tfds_dir


def test_grey_white_matter_on_the_held_out_hemisphere(mni_prep, tmp_path):
    from decipher_jax.eval import segtasks

    mesh = sh.make_mesh({"data": -1})
    cfg = ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=(4, 4, 4), img_size=(16, 16, 16))
    model = Model(lambda r: ViT3D(cfg, rngs=r), mesh)
    encs = {"random init": (model, model.init(jax.random.key(0)))}
    res = segtasks.brain_tissue(encs, mni_prep, mesh, window=cfg.img_size, steps=120, batch=8, lrs=(1e-2,),
                                seeds=(0,), n_random=32)
    assert res["shape"][0] > cfg.img_size[0] and res["eval_windows"] > 1  # larger than a window: really tiled
    rows = {r["head"]: r for r in res["rows"]}
    assert set(rows) == {"linear", "decoder", "unetr"}
    # Real anatomy at 6 mm: the image-skip head segments both tissues of the unseen hemisphere.
    assert rows["unetr"]["dice_grey_matter"] > 0.6 and rows["unetr"]["dice_white_matter"] > 0.6, rows["unetr"]
    assert rows["unetr"]["dice_mean_fg"] > rows["linear"]["dice_mean_fg"]
    assert np.isfinite(rows["unetr"]["hd95_grey_matter_mm"])
    # Written out and rendered with an overlay figure.
    w = tmp_path / "run"
    os.makedirs(w / "eval" / "segmentation")  # the segmentation evaluator's files
    ex = res.pop("example")
    pred = ex["preds"][("random init", "unetr")]
    z = ex["image"].shape[2] // 2
    np.savez(w / "eval" / "segmentation" / "examples.npz", brain_tissue_image=ex["image"][None, :, :, z],
             brain_tissue_label=ex["label"][None, :, :, z], brain_tissue_pred=pred[None, :, :, z],
             brain_tissue_title=np.asarray("random init, unetr head"))
    with open(w / "eval" / "segmentation.json", "w") as f:
        json.dump({"brain_tissue": res, "lesions": {}}, f)
    html = open(report.build(str(w))).read()
    assert "Segmentation on frozen encoders" in html and "dice_grey_matter" in html and "<img" in html


def test_the_lesion_task_takes_its_own_schedule_and_brain_tissue_keeps_the_shared_one(monkeypatch, tmp_path):
    """``segtasks.run(lesion=...)``: the lesion heads' steps, batch, lrs and kinds reach the lesion
    task alone; the Segmentation evaluator's ``lesion_*`` settings build that dict, and the
    ladder's config sets 600 steps x batch 8 on the decoder and unetr heads."""
    from decipher_jax.eval import evaluators, segtasks
    from decipher_jax.trainers import common

    seen = {}
    monkeypatch.setattr(segtasks, "brain_tissue", lambda *a, **k: seen.setdefault("brain_tissue", k) and {})
    monkeypatch.setattr(segtasks, "lesions", lambda *a, **k: seen.setdefault("lesions", k) and {})
    shared = {"steps": 150, "batch": 4, "lrs": (1e-2, 3e-2), "seeds": (0,), "skip_convs": 1}
    segtasks.run({}, "prep", None, size=(8, 8, 8), lesion={"steps": 600, "batch": 8, "kinds": ("unetr",)}, **shared)
    assert {k: seen["brain_tissue"][k] for k in shared} == shared and "kinds" not in seen["brain_tissue"]
    assert {k: seen["lesions"][k] for k in shared} == {**shared, "steps": 600, "batch": 8}
    assert seen["lesions"]["kinds"] == ("unetr",)
    seen.clear()
    segtasks.run({}, "prep", None, size=(8, 8, 8), **shared)  # no lesion settings: both tasks alike
    assert {k: seen["lesions"][k] for k in shared} == shared and "kinds" not in seen["lesions"]

    assert evaluators.Segmentation().lesion_grid() == {"anomaly": True}  # defaults: the shared schedule
    assert evaluators.Segmentation(lesion_anomaly=False).lesion_grid() == {"anomaly": False}
    e = evaluators.Segmentation(lesion_steps=600, lesion_batch=8, lesion_lrs=(1e-2,), lesion_kinds=("decoder", "unetr"))
    assert e.lesion_grid() == {"steps": 600, "batch": 8, "lrs": (1e-2,), "kinds": ("decoder", "unetr"), "anomaly": True}
    with pytest.raises(ValueError, match="lesion_kinds.*'conv'"):  # at construction, before any evaluator runs
        evaluators.Segmentation(lesion_kinds=("conv",))
    monkeypatch.undo()  # the real lesions(): refuses an unknown head kind before reading any data
    with pytest.raises(ValueError, match="lesion head kinds"):
        segtasks.lesions({}, "no_such_prep", None, size=(8, 8, 8), kinds=("conv",))

    # the evaluator hands them to segtasks.run, and its summary and the report state the schedule
    import types

    from decipher_jax import report

    got = {}
    monkeypatch.setattr(segtasks, "run", lambda *a, **k: got.update(k) or {})
    ctx = types.SimpleNamespace(legacy_encoders=lambda names: ({}, types.SimpleNamespace(img_size=(8, 8, 8))),
                                data="prep", mesh=None, dir=types.SimpleNamespace(arrays=lambda name: None))
    e.run(ctx)
    assert got["lesion"] == e.lesion_grid() and (got["steps"], got["batch"]) == (150, 4)
    res = {"brain_tissue": {}, "lesions": {"n_train": 3, "n_test": 2, "lesion_fraction_test": 0.01,
                                           "heads": {"steps": 600, "batch": 8, "lrs": [0.01], "seeds": [0],
                                                     "kinds": ["decoder", "unetr"], "anomaly": True, "bank_series": 7},
                                           "rows": [{"encoder": "random init", "head": "unetr", "dice_mean_fg": 0.5}]}}
    assert any("decoder, unetr, 600 steps x batch 8, lrs 0.01; tokens and their distance to 7 normal" in line
               for line in e.summary(res, None))
    w = tmp_path / "run"
    os.makedirs(w / "eval")
    with open(w / "eval" / "segmentation.json", "w") as f:
        json.dump(res, f)
    sec = report.segmentation_section(str(w))
    assert "Heads: decoder, unetr, 600 steps at batch 8, lr from 0.01. Beside the tokens the heads read" in sec

    for arg in ("", "gpu"):
        lad = common.load_config("experiments/configs/ladder.py" + (f":{arg}" if arg else ""))
        ecfg = common.load_config("experiments/configs/" + lad.stages.eval.config, dict(lad.stages.eval.overrides))
        seg = {e.name: e for e in evaluators.from_config(ecfg.evals, ecfg.order)}["segmentation"]
        assert seg.lesion_grid() == {"steps": 600, "batch": 8, "kinds": ("decoder", "unetr"), "anomaly": True}
        assert (seg.settings["steps"], seg.settings["batch"]) == (150, 4)  # brain tissue as the demo's
    demo_eval = common.load_config("experiments/configs/eval.py")
    assert {e.name: e for e in evaluators.from_config(demo_eval.evals, demo_eval.order)}["segmentation"].lesion_grid() == {
        "anomaly": True}


def test_lesion_heads_read_each_patch_distance_to_the_normal_bank(monkeypatch):
    """``lesions(anomaly=True)``: each encoder's tokens of the normal training series form its
    bank; every split's tokens reach the heads with one more channel, the patch's distance to
    the nearest bank patch of its body region and sequence (not its own patient's) over the
    bank's tau, large where the volume differs from the normals."""
    from decipher_jax.eval import features, segtasks

    mesh = sh.make_mesh({"data": -1})
    cfg = ViTConfig(dim=16, depth=1, heads=2, mlp_dim=32, patch_size=(4, 4, 4), img_size=(8, 8, 8))
    model = Model(lambda r: ViT3D(cfg, rngs=r), mesh)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    normal = 0.5 + 0.02 * rng.normal(size=(6, 8, 8, 8, 1)).astype(np.float32)
    sick = normal[:3].copy()
    sick[:, :4, :4, :4] = 1.0 - sick[:, :4, :4, :4]  # one patch changed
    lab = np.zeros((3, 8, 8, 8), np.int32)
    lab[:, :4, :4, :4] = 1
    groups = ["brain/T1"] * 4 + ["knee/T2"] * 2  # the knee series are no neighbours of a brain lesion's
    normal[4:] = 1.0 - normal[4:]
    bank_meta = {"series_id": [f"n{i}" for i in range(6)], "patient_id": [f"p{i}" for i in range(6)], "group": groups}
    monkeypatch.setattr(segtasks, "normal_volumes", lambda prep, size, per_group=64: (normal, bank_meta))
    meta = {"series_id": ["a", "b", "c"], "patient_id": ["p0", "q", "q"], "group": ["brain/T1"] * 3}
    monkeypatch.setattr(segtasks, "_split_arrays", lambda prep, split, size, lesion_only: (
        sick, lab, meta["series_id"], np.ones((3, 3)), meta))
    seen = {}

    def fit(tokens, *a, **k):
        seen["tokens"] = tokens
        raise StopIteration

    monkeypatch.setattr(segtasks, "_fit", fit)
    with pytest.raises(StopIteration):
        segtasks.lesions({"random init": (model, params)}, "prep", mesh, size=cfg.img_size, anomaly=True)
    plain = segtasks.encode(model, params, sick, mesh)
    tok = seen["tokens"]
    assert tok.shape == (*plain.shape[:-1], plain.shape[-1] + 1)
    np.testing.assert_array_equal(tok[..., :-1], plain)
    bt = segtasks.encode(model, params, normal, mesh).reshape(6, 8, -1)
    bank = features.NormalBank.build(bt, groups, bank_meta["series_id"], (2, 2, 2), patient_id=bank_meta["patient_id"])
    brain = features.NormalBank.build(bt[:4], groups[:4], bank_meta["series_id"][:4], (2, 2, 2),
                                      patient_id=bank_meta["patient_id"][:4])
    want = brain.distances(plain.reshape(3, 8, -1), meta["group"], meta["series_id"], meta["patient_id"]) / bank.tau
    np.testing.assert_allclose(tok[..., -1].reshape(3, 8), want, rtol=1e-4, atol=1e-5)
    assert (tok[:, 0, 0, 0, -1] > tok[:, 1:, 1:, 1:, -1].reshape(3, -1).max(1)).all()  # the changed patch stands out
