"""Multi-parametric pretraining end to end on a tiny embedded corpus (issue 22): the trainer on
prepared multi-sequence studies, exact resume, the held-out reconstruction against the copy
baselines, and the evaluation by sequences present with its report section."""

import json
import os

import jax
import numpy as np
import pytest

from data_prep import prep, volume
from decipher_jax import report
from decipher_jax.data import synthetic
from decipher_jax.eval import multiparam as mpe
from decipher_jax.trainers import common
from decipher_jax.trainers import multiparam as mp

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "multiparam.py")
VIT = dict(dim=32, depth=1, heads=4, mlp_dim=64, patch_size=(8, 8, 8), img_size=(16, 16, 16), num_registers=0,
           layerscale=None, pos_embed="learned", stem="linear")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    manifest = synthetic.generate_multiparam_corpus(str(root / "raw"), n_patients=24, seed=3, matrix=24, p_complete=0.6)
    cfg = prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(8.0,) * 3), split_fractions=(0.5, 0.2, 0.3),
                          studies="resample", workers=1)
    res = prep.run(manifest, str(root / "prep"), cfg, progress=False)
    assert res.ok
    return str(root / "prep")


def _cfg(data, *opts, **over):
    base = {"data.dir": data, "data.size": (16, 16, 16), "data.batch_size": 4, "model.vit": VIT, "model.proj_dim": 16,
            "steps": 12, "log_every": 4, "checkpoint_every": 6, "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
            "async_checkpoints": False, "pretrain.block": 8}
    return common.load_config(CONFIG + ":" + ",".join(("tiny",) + opts), {**base, **over})


def _params(workdir):
    _, params, _ = mp.load(workdir)
    return jax.tree.map(np.asarray, params)


def test_train_resume_heldout_and_evaluation(prepared, tmp_path):
    w = str(tmp_path / "multi")
    m = mp.train(_cfg(prepared), w)
    assert np.isfinite(m["loss"]) and m["step_ok"]
    held = json.load(open(os.path.join(w, mp.HELDOUT)))
    assert held["studies"] > 0 and held["split"] == "val"
    for k in ("masked_mse_template", "masked_mse_cross", "copy_template", "copy_other"):
        assert np.isfinite(held[k]) and held[k] >= 0
    # the residual decoder starts at the fills: after 12 steps it is no worse than copying them
    assert held["masked_mse_template"] <= 1.1 * held["copy_template"]
    tm = _params(w)["templates"]
    assert np.all(np.isfinite(tm)) and float(np.abs(tm).max()) > 0.05  # moved from zeros

    # exact resume: stopped at 6 and resumed equals the uninterrupted run
    w2 = str(tmp_path / "resumed")
    mp.train(_cfg(prepared, stop_after=6), w2)
    mp.train(_cfg(prepared), w2)
    a, b = _params(w), _params(w2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)

    single = str(tmp_path / "single")
    mp.train(_cfg(prepared, "single", steps=6), single)
    out = str(tmp_path / "eval")
    r = mpe.evaluate({"multi-sequence": w, "single-sequence": single}, "", ("infarct", "hemorrhage", "mass"),
                     copies=1, arrays=os.path.join(out, "eval", "multiparam"), trained_steps=10, seg_steps=5)
    assert set(r["rows"]) == {f"{e} ({m}, {p} pool)" for e, m in (("multi-sequence", "mask"), ("multi-sequence", "template"),
                                                                  ("single-sequence", "late"), ("random init", "mask"),
                                                                  ("random init", "late")) for p in ("study", "sequence")} | {
        "supervised (random init, end to end)", "fine-tuned (multi-sequence init)"}
    for row in r["rows"].values():
        assert len(row["subsets"]) == 15 and set(row["by_size"]) == {1, 2, 3, 4}
        assert all(0.0 <= v["auroc"] <= 1.0 for v in row["subsets"].values())
        # study-bootstrap intervals on every cell; the scores behind them are not kept in the JSON
        assert all(0.0 <= v["lo"] <= v["hi"] <= 1.0 for v in row["subsets"].values()) and "_scores" not in row
        assert all(lo <= hi for lo, hi in row["by_size_interval"].values())
    assert set(r["criteria"]) == {"mask, study pool", "template, study pool", "mask, sequence pool",
                                  "template, sequence pool"}
    seg = r["segmentation"]
    assert set(seg["rows"]) == {"multi-sequence (mask)", "multi-sequence (template)", "single-sequence (late)",
                                "random init (mask)"} and seg["test_studies_with_lesion"] > 0
    for row in seg["rows"].values():
        assert len(row["subsets"]) == 15 and all(0.0 <= v["dice"] <= 1.0 for v in row["subsets"].values())
    for row in seg["rows"].values():
        assert all(v["lo"] <= v["hi"] for v in row["subsets"].values())
    c = r["criteria"]["mask, sequence pool"]
    assert c["best_single_sequence"] in synthetic.SEQUENCES and isinstance(c["beats_best_single"], bool)
    assert c["beats_best_single"] == (c["all_sequences"] > c["best_single"])
    g = c["gain"]
    assert g["gain"] == pytest.approx(c["all_sequences"] - c["best_single"]) and g["lo"] <= g["hi"]
    assert 0.0 <= g["p_not_above"] <= 1.0 and set(c["gain_by_size"]) == {1, 2, 3, 4}
    assert any("gain" in line for line in mpe.summary(r))
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    with open(os.path.join(out, "eval", "multiparam.json"), "w") as f:
        json.dump(r, f, default=float)
    html = report.multiparam_section(out)
    assert "findings by the sequences present" in html and "T1+T2+FLAIR+DWI" in html and "data:image/png" in html
    assert "bootstrap draws" in html and "Lesion Dice" in html


def test_the_late_fusion_of_one_sequence_is_that_sequence_alone():
    """The single-sequence encoder on a subset: the mean of its features of each sequence alone."""
    from decipher_jax.models.multiseq import MultiParamModel, MultiSeqConfig
    from decipher_jax.models.vit3d import ViTConfig
    from decipher_jax import sharding as sh
    from decipher_jax.state import Model

    cfg = MultiSeqConfig(ViTConfig(**{k: v for k, v in VIT.items()}))
    model = Model(lambda r: MultiParamModel(cfg, proj_dim=8, rngs=r), sh.make_mesh(None, jax.devices()[:1]))
    params = model.init(jax.random.key(0))
    r = np.random.default_rng(0)
    x = r.random((3, 16, 16, 16, 4)).astype(np.float32)
    late, mask = mpe.Encoder(model, params, "late", batch=2), mpe.Encoder(model, params, "mask", batch=2)
    late_s, mask_s = (mpe.Encoder(model, params, m, batch=2, pool="sequence") for m in ("late", "mask"))
    p = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], bool)
    f = late.features(x, p)
    alone = [mask.features(x, np.broadcast_to(np.arange(4) == j, p.shape)) for j in range(4)]
    np.testing.assert_allclose(f[0], (alone[0][0] + alone[2][0]) / 2, atol=1e-5)
    np.testing.assert_allclose(f[1], alone[3][1], atol=1e-5)
    # the sequence pool: each sequence's own block, zeros where absent; late = each from its own pass
    e = 32
    fs = late_s.features(x, p)
    a2 = mask_s.features(x, np.broadcast_to(np.arange(4) == 2, p.shape))
    blk = lambda f, j, k: f[:, e + k * 4 * e + j * e: e + k * 4 * e + (j + 1) * e]  # noqa: E731  k 0: mean, 1: max
    np.testing.assert_allclose(blk(fs, 2, 0)[0], blk(a2, 2, 0)[0], atol=1e-5)
    np.testing.assert_allclose(blk(fs, 2, 1)[0], blk(a2, 2, 1)[0], atol=1e-5)
    assert np.all(blk(fs, 1, 0)[0] == 0) and np.all(blk(fs, 3, 1)[0] == 0)
    m = mask_s.features(x, p)
    assert m.shape == (3, e + 8 * e) and np.all(blk(m, 1, 0)[0] == 0) and np.any(blk(m, 0, 0)[0] != 0)


def test_demo_full_adds_the_multiparam_stages_and_the_plain_demo_does_not():
    from decipher_jax import demo

    full, plain = demo.config(full=True), demo.config()
    assert full.order[-5:] == ("multiparam_data", "multiparam", "multiparam_single", "multiparam_eval", "report")
    assert full.order[:-5] == plain.order[:-1] and not any(s.startswith("multiparam") for s in plain.order)
    assert full.stages.multiparam_eval.config == "eval.py:multiparam"


def test_weighted_auroc_is_the_auroc_of_the_repeated_rows():
    r = np.random.default_rng(1)
    s, y = r.normal(size=30).round(1), r.random(30) < 0.4  # rounding makes ties
    w = mpe.study_weights(np.repeat(np.arange(10), 3), draws=5, seed=2)
    assert w.shape == (5, 30) and np.all(w.sum(1) == 30)  # 10 patients drawn, 3 rows each
    assert np.all(w.reshape(5, 10, 3) == w.reshape(5, 10, 3)[:, :, :1])  # a patient's rows move together
    from decipher_jax.eval import probes

    got = mpe.weighted_auroc(s, y, w)
    for d in range(5):
        idx = np.repeat(np.arange(30), w[d].astype(int))
        assert got[d] == pytest.approx(probes.auroc(s[idx], y[idx]))
    assert mpe.weighted_auroc(s, y, np.ones(30))[0] == pytest.approx(probes.auroc(s, y))
    assert np.isnan(mpe.weighted_auroc(s, y, np.where(y, 0.0, 1.0))[0])  # no positive drawn


def test_batched_pads_to_one_shape_and_drops_the_padding():
    calls = []

    def fn(x, p):
        calls.append(x.shape)
        return {"s": x.sum(1) + p.sum(1), "x": x}

    x, p = np.arange(14.0).reshape(7, 2), np.zeros((7, 3), bool)
    out = mpe.batched(fn, (x, p), (0.0, True), 3)
    assert calls == [(3, 2)] * 3
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["s"], x.sum(1))
    assert mpe.batched(fn, (x[:0], p[:0]), (0.0, True), 3) is None


def test_one_pass_gives_every_readout_as_each_encoder_would_and_intervals_hold_the_point():
    """``Encoder.pooled`` with both readouts equals an encoder of each pool (mask, template, late);
    ``intervals`` under all-ones weights reproduces every cell's AUROC, the unscorable finding
    left out."""
    from decipher_jax.models.multiseq import MultiParamModel, MultiSeqConfig
    from decipher_jax.models.vit3d import ViTConfig
    from decipher_jax import sharding as sh
    from decipher_jax.state import Model

    cfg = MultiSeqConfig(ViTConfig(**VIT))
    model = Model(lambda r: MultiParamModel(cfg, proj_dim=8, rngs=r), sh.make_mesh(None, jax.devices()[:1]))
    params = model.init(jax.random.key(1))
    r = np.random.default_rng(2)
    x = r.random((5, 16, 16, 16, 4)).astype(np.float32)
    p = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]], bool)
    for mode in mpe.MODES:
        both = mpe.Encoder(model, params, mode, batch=2).pooled(x, p, mpe.POOLS)
        for pool in mpe.POOLS:
            np.testing.assert_allclose(both[pool], mpe.Encoder(model, params, mode, batch=3, pool=pool).features(x, p),
                                       atol=1e-5, err_msg=f"{mode} {pool}")

    seqs, findings = ("T1", "T2"), ("a", "b", "c")
    y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 0, 1], [0, 1, 1]], np.float32)  # c: one class
    used = mpe.scorable(findings, y, y)
    assert used == [0, 1]
    scores = {mpe.subset_name(s, seqs): r.random((6, 2)) for s in mpe.subsets(seqs)}
    row = mpe.subset_rows(scores, y, used, findings, seqs)
    draws = mpe.intervals({"row": row}, y, np.ones((3, 6)))
    assert "_scores" not in row and row["findings"] == ["a", "b"]
    for name, cell in row["subsets"].items():
        assert cell["lo"] == pytest.approx(cell["auroc"]) and cell["hi"] == pytest.approx(cell["auroc"])
        np.testing.assert_allclose(draws[("row", name)], cell["auroc"])
    assert mpe.subset_rows(scores, y, [], findings, seqs) == {"subsets": {}, "by_size": {}, "findings": []}
