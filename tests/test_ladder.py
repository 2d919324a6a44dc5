"""The ladder's rows (decipher_jax.eval.ladder): study-bootstrap intervals on shared draws, the
frozen rungs read from the probes' saved test scores, the trained rungs from a fine-tuning
run's predictions, each task scored as its rungs are elsewhere."""

import numpy as np
import pytest

from decipher_jax.eval import ladder, probes


def _world(seed=0, studies=40, per=3):
    rng = np.random.default_rng(seed)
    st = np.repeat([f"S{i:03d}" for i in range(studies)], per)
    y = np.repeat(rng.integers(0, 2, studies), per)
    return rng, st, y


def test_bootstrap_interval_brackets_the_score_and_shares_draws():
    rng, st, y = _world()
    good = y + rng.normal(0, 0.6, len(y))
    noise = rng.normal(0, 1, len(y))
    studies = np.unique(st)
    a = ladder.bootstrap([("binary", y, good, st)], studies, draws=300)
    b = ladder.bootstrap([("binary", y, noise, st)], studies, draws=300)
    assert a["score"] == pytest.approx(probes.auroc(good, y))
    assert a["lo"] <= a["score"] <= a["hi"] and b["lo"] <= b["score"] <= b["hi"]
    assert a["lo"] > b["hi"]  # a real signal stands clear of noise on 40 studies
    again = ladder.bootstrap([("binary", y, good, st)], studies, draws=300)
    assert (again["lo"], again["hi"]) == (a["lo"], a["hi"])  # the same draws
    perfect = ladder.bootstrap([("binary", y, y.astype(float), st)], studies, draws=100)
    assert perfect["score"] == perfect["lo"] == perfect["hi"] == 1.0
    # MAE parts (age): a constant 2-year error is 2 in every draw.
    mae = ladder.bootstrap([("mae", y * 10.0, y * 10.0 + 2.0, st)], studies, draws=50)
    assert mae["score"] == mae["lo"] == mae["hi"] == pytest.approx(2.0)


def test_rows_put_frozen_and_trained_rungs_on_the_same_studies(tmp_path):
    rng, st, y = _world(1)
    region = np.where(np.arange(len(y)) % 2 == 0, "brain", "knee")
    frozen = {}
    for enc, noise in (("random init", 3.0), ("stage 2 (CLIP)", 0.5)):
        for f in (0.1, 1.0):
            for name in ("finding: infarct", "finding: effusion"):
                s = y + rng.normal(0, noise, len(y))
                frozen[(enc, name, f)] = (y, np.stack([-s, s], 1), st)  # class probabilities' order
            frozen[(enc, "sex", f)] = (1 - y, np.stack([s, -s], 1), st)
    path = str(tmp_path / "probes" / ladder.PROBE_SCORES)
    ladder.save_probe_scores(path, frozen)
    back = ladder.load_probe_scores(path)
    assert set(back) == set(frozen)
    np.testing.assert_array_equal(back[("random init", "sex", 0.1)][1], frozen[("random init", "sex", 0.1)][1])
    # A fine-tuning run's predictions: two findings, each scored only on its region (y_mask).
    w = np.stack([region == "brain", region == "knee"], 1).astype(np.float32)
    yy = np.stack([y, y], 1).astype(np.float32)
    trained = {("supervised", 1.0): {"scores": yy + rng.normal(0, 1.0, yy.shape), "y": yy, "y_mask": w,
                                     "study_id": st}}
    rows = ladder.rows_for("findings", back, trained, [0.1, 1.0], draws=200)
    got = {(r["rung"], r["kind"], r["fraction"]): r for r in rows}
    assert set(got) == {("random init", "frozen", 0.1), ("random init", "frozen", 1.0),
                        ("stage 2 (CLIP)", "frozen", 0.1), ("stage 2 (CLIP)", "frozen", 1.0),
                        ("supervised", "trained", 1.0)}
    assert len({r["n_studies"] for r in rows}) == 1
    # The findings task is the mean over its findings (of the positive class's probability).
    exp = np.mean([probes.auroc(back[("stage 2 (CLIP)", n, 1.0)][1][:, 1], y)
                   for n in ("finding: infarct", "finding: effusion")])
    assert got[("stage 2 (CLIP)", "frozen", 1.0)]["score"] == pytest.approx(exp)
    sup = np.mean([probes.auroc(trained[("supervised", 1.0)]["scores"][w[:, j] > 0, j], y[w[:, j] > 0])
                   for j in range(2)])
    assert got[("supervised", "trained", 1.0)]["score"] == pytest.approx(sup)
    assert got[("stage 2 (CLIP)", "frozen", 1.0)]["score"] > got[("random init", "frozen", 1.0)]["score"]
    # sex: a binary task from the probes' two-class probabilities; a task without rungs has no rows
    sex = ladder.rows_for("sex", back, {}, [1.0], draws=50)
    assert {r["rung"] for r in sex} == {"random init", "stage 2 (CLIP)"} and all(r["metric"] == "AUROC" for r in sex)
    assert ladder.rows_for("age", back, {}, [1.0]) == []
