"""Linear probes: parity with scikit-learn on real packaged data, vmapped fits equal looped fits,
metrics equal scikit-learn's, and the CV sweep returns one row per (task, fraction, seed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from decipher_jax.eval import probes


def _split(loader, seed=0):
    x, y = loader(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm], y[perm]
    n = int(0.7 * len(y))
    xtr, xte = probes.standardise(x[:n], x[n:])
    return xtr, y[:n], xte, y[n:]


@pytest.mark.parametrize("loader,binary", [(load_digits, False), (load_breast_cancer, True)])
@pytest.mark.parametrize("c", [0.1, 1.0])
def test_logistic_probe_matches_sklearn(loader, binary, c):
    xtr, ytr, xte, yte = _split(loader)
    k = int(ytr.max()) + 1
    p = jax.jit(lambda x, y: probes.fit_logistic(x, y, jnp.ones(len(y)), c, jnp.ones(k, bool), iters=100))(xtr, ytr)
    ours = np.mean(np.asarray(probes.apply(p, xte)).argmax(1) == yte)
    sk = LogisticRegression(C=2 * c if binary else c, max_iter=5000).fit(xtr, ytr)
    assert abs(ours - sk.score(xte, yte)) <= 0.005  # the bar: within 0.5 pt
    w = np.asarray(p["w"])
    ours_coef = (w[:, 1] - w[:, 0])[None] if binary else (w - w.mean(1, keepdims=True)).T
    ref = sk.coef_ if binary else sk.coef_ - sk.coef_.mean(0)
    assert np.abs(ours_coef - ref).max() < (0.01 if c == 0.1 else 0.15)


def test_vmapped_fits_equal_looped_fits():
    xtr, ytr, _, _ = _split(load_digits)
    r = np.random.default_rng(1)
    parity = ytr % 2
    ys = np.stack([ytr, parity, ytr, parity, ytr, ytr])
    ws = (r.random((6, len(ytr))) < 0.7).astype(np.float32)
    cs = np.array([0.1, 0.1, 1.0, 1.0, 0.01, 0.3])
    masks = np.stack([np.arange(10) < (10 if y.max() > 1 else 2) for y in ys])
    many = probes.fit_many(xtr, ys, ws, cs, masks, iters=40)
    one = jax.jit(lambda y, w, c, m: probes.fit_logistic(jnp.asarray(xtr), y, w, c, m, iters=40))
    for i in range(6):
        p = one(ys[i], ws[i], cs[i], masks[i])
        q = jax.tree.map(lambda a: a[i], many)
        # Same optimum: objective to 1e-6, identical predictions. (The parameters agree to ~1e-4:
        # a batched matmul sums in another order, and 40 L-BFGS steps carry the rounding.)
        obj = [float(probes.logistic_objective(v, jnp.asarray(xtr), ys[i], ws[i], cs[i], masks[i])) for v in (p, q)]
        assert obj[0] == pytest.approx(obj[1], rel=1e-6)
        np.testing.assert_array_equal(np.asarray(probes.apply(q, xtr, masks[i])).argmax(1),
                                      np.asarray(probes.apply(p, xtr, masks[i])).argmax(1))
        np.testing.assert_allclose(np.asarray(q["w"]), np.asarray(p["w"]), atol=5e-4)
    # Masked classes never win: the parity probes only ever predict 0 or 1.
    logits = np.asarray(probes.apply(jax.tree.map(lambda a: a[1], many), xtr, masks[1]))
    assert set(np.unique(logits.argmax(1))) <= {0, 1}


def test_metrics_match_sklearn(rng):
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounded: many ties
    assert probes.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(probes.auroc(s, np.zeros(200)))
    y3, p3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    assert probes.balanced_accuracy(p3, y3) == pytest.approx(balanced_accuracy_score(y3, p3))
    probs = rng.dirichlet(np.ones(3), size=300)
    assert probes.macro_auroc(probs, y3, 3) == pytest.approx(roc_auc_score(y3, probs, multi_class="ovr"), abs=1e-9)
    assert probes.mae([1.0, 3.0], [2.0, 1.0]) == 1.5


def test_ridge_matches_sklearn_with_sample_weights(rng):
    x = rng.normal(size=(80, 5)).astype(np.float64)
    y = x @ rng.normal(size=(5, 2)) + 0.1 * rng.normal(size=(80, 2)) + 3.0
    w = rng.random(80)
    with jax.enable_x64(True):
        p = probes.fit_ridge(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w), 2.5)
    sk = Ridge(alpha=2.5).fit(x, y, sample_weight=w)
    np.testing.assert_allclose(np.asarray(p["w"]).T, sk.coef_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(p["b"]), sk.intercept_, rtol=1e-6)


def test_ridge_sweep_equals_a_sklearn_loop():
    """The vmapped CV + refit of ridge probes (age) against scikit-learn's Ridge in a loop, on
    real packaged data (the diabetes regression set): same chosen penalty (the largest within one
    standard error of the best pooled CV error), same test MAE."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    n = 300
    lams = (0.1, 1.0, 10.0, 100.0, 1000.0)
    rows = probes.ridge_sweep(x[:n], x[n:], "target", y[:n], y[n:], lams=lams, fractions=(0.3, 1.0), seeds=(0, 1))
    assert [(r["fraction"], r["seed"]) for r in rows] == [(0.3, 0), (0.3, 1), (1.0, 0), (1.0, 1)]
    xtr, xte = probes.standardise(x[:n], x[n:])
    for r in rows:
        sub = probes.subset_mask(np.zeros(n), r["fraction"], r["seed"], min_per_class=2)
        folds = probes.fold_ids(n, 3, r["seed"])
        cv, se = [], []
        for lam in lams:
            errs = []
            for f in range(3):
                fit, val = sub & (folds != f), sub & (folds == f)
                sk = Ridge(alpha=lam).fit(xtr[fit], y[:n][fit])
                errs += list(np.abs(sk.predict(xtr[val]) - y[:n][val]))
            cv.append(np.mean(errs))
            se.append(np.std(errs, ddof=1) / np.sqrt(len(errs)))
        i = int(np.argmin(cv))
        pick = max(j for j in range(len(lams)) if cv[j] <= cv[i] + se[i])  # the 1-SE rule
        best = lams[pick]
        assert r["lambda"] == best and r["cv_mae"] == pytest.approx(cv[pick], rel=1e-4) and r["rule"] == "1-SE"
        sk = Ridge(alpha=best).fit(xtr[sub], y[:n][sub])
        assert r["mae"] == pytest.approx(np.mean(np.abs(sk.predict(xte) - y[n:])), rel=1e-4)
        assert r["n_train"] == sub.sum()
    full = [r for r in rows if r["fraction"] == 1.0]
    assert all(r["mae"] < 0.85 * r["mae_of_mean"] and r["r2"] > 0.3 for r in full)  # it learns the target


def test_cv_folds_by_patient():
    """Grouped folds keep each patient's rows together; row-wise folds let near-duplicate series
    of one study sit on both sides of a fold, so memorising studies looks best and CV picks the
    weakest penalty. Here the target is unrelated to anything but the study's identity."""
    groups = np.repeat([f"P{i}" for i in range(40)], 4)
    f = probes.fold_ids(len(groups), 3, 0, groups)
    assert all(len(set(f[groups == g])) == 1 for g in set(groups))
    assert sorted(np.bincount(f)) == [52, 52, 56]  # 13, 13, 14 patients
    np.testing.assert_array_equal(probes.fold_ids(160, 3, 0), probes.fold_ids(160, 3, 0, None))
    with pytest.raises(ValueError, match="3 ids for 160 rows"):
        probes.fold_ids(160, 3, 0, groups[:3])

    r = np.random.default_rng(0)
    study = r.normal(size=(40, 30))
    x = np.repeat(study, 4, 0) + 0.05 * r.normal(size=(160, 30))
    y = np.repeat(r.normal(50, 15, 40), 4)
    lams = (0.01, 1.0, 100.0, 1e4)
    row = probes.ridge_sweep(x, x[:8], "age", y, y[:8], lams=lams, one_se=False)[0]  # the best CV error
    grouped = probes.ridge_sweep(x, x[:8], "age", y, y[:8], lams=lams, cv_groups=groups, one_se=False)[0]
    assert row["lambda"] == 0.01 and grouped["lambda"] == 1e4
    yc = (y > 50).astype(int)
    task = [probes.Task("old", yc, yc[:8])]
    Cs = (1e-3, 1e-1, 10.0)
    row = probes.logistic_sweep(x, x[:8], task, inv_regs=Cs, iters=50)[0]
    grouped = probes.logistic_sweep(x, x[:8], task, inv_regs=Cs, iters=50, cv_groups=groups)[0]
    assert row["cv_accuracy"] > 0.95 and grouped["cv_accuracy"] < 0.75  # the leak, and its absence


def test_label_fractions_by_patient():
    """With groups, a label fraction is a fraction of the patients with all their rows; every
    class keeps a row; the probe's n_train counts whole patients."""
    r = np.random.default_rng(0)
    groups = np.repeat([f"P{i}" for i in range(50)], 3)
    y = np.tile([0, 1, 2], 50)  # each patient has every class (like a study's sequences)
    y[groups == "P7"] = 3  # a rare class: one patient
    keep = probes.subset_mask(y, 0.2, 1, groups=groups)
    picked = set(groups[keep])
    assert all(keep[groups == g].all() for g in picked)  # whole patients
    assert 10 <= len(picked) <= 11 and "P7" in picked  # 20% of 50, plus the rare class's patient
    assert probes.subset_mask(y, 1.0, 1, groups=groups).all()
    rowwise = probes.subset_mask(y, 0.2, 1)
    assert len(set(groups[rowwise])) > 20  # rows drawn alone scatter over most patients
    x = r.normal(size=(150, 5))
    task = [probes.Task("t", y, y[:6])]
    row = probes.logistic_sweep(x, x[:6], task, fractions=(0.2,), iters=5, cv_groups=groups)[0]
    assert row["n_train"] == probes.subset_mask(y, 0.2, 0, groups=groups).sum()  # the sweep draws by patient
    assert row["n_train"] % 3 == 0


def test_held_out_selection_against_memorised_training_features():
    """Features that memorised the training rows' targets (as a text-supervised encoder's can,
    pretrained on those rows' reports) fool CV inside the training rows; a held-out val split
    picks the penalty that generalises (the floor, for a target the images do not carry)."""
    r = np.random.default_rng(0)
    groups = np.repeat([f"P{i}" for i in range(60)], 3)
    ytr = np.repeat(r.normal(50, 15, 60), 3).astype(np.float32)
    xtr = np.concatenate([r.normal(size=(180, 8)), ytr[:, None] / 15 + 0.1 * r.normal(size=(180, 1))], 1)
    yva, yte = r.normal(50, 15, 40).astype(np.float32), r.normal(50, 15, 60).astype(np.float32)
    xva, xte = r.normal(size=(40, 9)), r.normal(size=(60, 9))  # held-out rows: nothing memorised
    yva[:3] = np.nan  # rows without a target are left out of the choice
    lams = (0.1, 10.0, 1e3, 1e6)
    cv = probes.ridge_sweep(xtr, xte, "age", ytr, yte, lams=lams, cv_groups=groups)[0]
    held = probes.ridge_sweep(xtr, xte, "age", ytr, yte, lams=lams, cv_groups=groups, val_x=xva, val_y=yva)[0]
    assert cv["lambda"] <= 10.0 and cv["selection"] == "3-fold CV" and cv["mae"] > cv["mae_of_mean"] + 1
    assert held["lambda"] >= 1e3 and held["selection"] == "val"
    assert held["mae"] < cv["mae"] - 1 and held["mae"] < held["mae_of_mean"] + 2
    # Logistic: the val rows' labels decide; -1 rows (outside the task) are not scored.
    yc_tr, yc_va = (ytr > 50).astype(int), np.where(np.isnan(yva), -1, yva > 50).astype(int)
    task = probes.Task("old", yc_tr, (yte > 50).astype(int), yc_va)
    Cs = (1e-3, 1.0, 100.0)
    row = probes.logistic_sweep(xtr, xte, [task], inv_regs=Cs, iters=50, cv_groups=groups, val_x=xva)[0]
    assert row["selection"] == "val" and row["cv_accuracy"] < 0.8  # held-out accuracy, not the leak's ~1
    assert probes.logistic_sweep(xtr, xte, [task], inv_regs=Cs, iters=50, cv_groups=groups)[0]["cv_accuracy"] > 0.9


def test_one_se_rule_falls_back_to_the_strongest_penalty_on_noise():
    """Pure-noise features: the best penalty of a small selection set is luck; the 1-SE rule
    takes the strongest penalty within one standard error (glmnet's lambda.1se) and lands on
    the floor (the training mean), where the best-score rule does not."""
    picks = {True: [], False: []}
    for seed in range(6):
        r = np.random.default_rng(seed)
        x, y = r.normal(size=(60, 40)), r.normal(50, 15, 60)
        xv, yv, xt, yt = r.normal(size=(20, 40)), r.normal(50, 15, 20), r.normal(size=(40, 40)), r.normal(50, 15, 40)
        for one_se in (True, False):
            row = probes.ridge_sweep(x, xt, "age", y, yt, lams=(0.1, 10.0, 1e3, 1e6), val_x=xv, val_y=yv,
                                     one_se=one_se)[0]
            picks[one_se].append(row["lambda"])
    assert picks[True] == [1e6] * 6 and min(picks[False]) < 1e6
    # By hand: two groups x (strong, weak) C; the weak C's accuracy 0.8 has SE 0.2, so 0.75 is
    # within one SE (the strong C is taken) and 0.25 is not.
    hits = [[[1, 1, 1, 0], [1, 1, 1, 0, 1]], [[1, 0, 0, 0], [1, 1, 1, 0, 1]]]
    mean, best = probes._choose(hits, higher_better=True, one_se=True, strongest_first=True)
    np.testing.assert_allclose(mean, [[0.75, 0.8], [0.25, 0.8]])
    assert list(best) == [0, 1]
    assert list(probes._choose(hits, higher_better=True, one_se=False, strongest_first=True)[1]) == [1, 1]


def test_split_sources_leave_out_only_an_optional_split(prepared):
    """A corpus prepared without val / test splits: val (optional) is left out, test raises."""
    from decipher_jax.eval import suite

    got = suite.split_sources(prepared, splits=("train", "val"))
    assert list(got) == ["train"] and len(got["train"]) > 0
    with pytest.raises((KeyError, ValueError, FileNotFoundError)):
        suite.split_sources(prepared)


def test_knn_by_hand():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1])
    s = probes.knn_scores(jnp.asarray(train), jnp.asarray(labels), jnp.asarray([[1.0, 0.05], [0.0, 2.0]]), 2, k=2)
    np.testing.assert_array_equal(np.asarray(s).argmax(1), [0, 1])


def test_logistic_sweep_rows():
    xtr, ytr, xte, yte = _split(load_digits)
    tasks = [probes.Task("digit", ytr, yte), probes.Task("odd", ytr % 2, yte % 2)]
    rows = probes.logistic_sweep(xtr, xte, tasks, inv_regs=(0.01, 0.1, 1.0), fractions=(0.05, 1.0), seeds=(0, 1),
                                 folds=3, iters=50)
    assert len(rows) == 2 * 2 * 2
    full = {r["task"]: r for r in rows if r["fraction"] == 1.0 and r["seed"] == 0}
    assert full["digit"]["accuracy"] > 0.93 and full["odd"]["auroc"] > 0.95
    few = [r for r in rows if r["fraction"] == 0.05]
    assert all(r["n_train"] < 0.1 * len(ytr) for r in few)
    assert np.mean([r["accuracy"] for r in few]) < np.mean([r["accuracy"] for r in rows if r["fraction"] == 1.0])


def test_finding_tasks_are_binary_per_body_region():
    """One task per finding seen in training, over the regions where it occurs; other rows -1;
    age as a regression task."""
    from decipher_jax.eval import suite

    train = {"body_region": np.array(["brain"] * 4 + ["knee"] * 4),
             "findings": np.array(["infarct", "", "infarct;mass", "mass", "effusion", "", "effusion", ""]),
             "sex": np.array(["M", "F"] * 4)}
    test = {"body_region": np.array(["brain", "brain", "knee", "spine"]),
            "findings": np.array(["", "infarct", "effusion", ""]), "sex": np.array(["M", "F", "", "M"])}
    tasks = {name: (ytr, yte) for name, ytr, yte in suite.tasks(train, test)}
    assert list(tasks) == ["body_region", "sex", "abnormal", "finding: effusion", "finding: infarct", "finding: mass"]
    np.testing.assert_array_equal(tasks["finding: infarct"][0], [1, 0, 1, 0, -1, -1, -1, -1])
    np.testing.assert_array_equal(tasks["finding: infarct"][1], [0, 1, -1, -1])
    np.testing.assert_array_equal(tasks["finding: effusion"][1], [-1, -1, 1, -1])
    np.testing.assert_array_equal(tasks["sex"][1], [1, 0, -1, 1])  # unseen "" class -> -1
    np.testing.assert_array_equal(tasks["abnormal"][1], [0, 1, 1, 0])  # any finding, every series
    np.testing.assert_array_equal(tasks["abnormal"][0], [1, 0, 1, 1, 1, 0, 1, 0])
    assert [t[0] for t in suite.tasks(train, test, names=("findings",))] == list(tasks)[3:]
    no_knee = {k: v[:2] for k, v in test.items()}  # a task without a test row is left out
    assert [t[0] for t in suite.tasks(train, no_knee, names=("findings",))] == ["finding: infarct", "finding: mass"]
    # Age is a regression task; rows without an age (NaN: a real template) are outside it.
    train["age"] = np.array([20, 30, 40, np.nan, 50, 60, 70, 80], np.float32)
    test["age"] = np.array([np.nan, 33, 44, 55], np.float32)
    (name, ytr, yte), = suite.tasks(train, test, names=("age",))
    assert name == "age" and name in suite.REGRESSION
    np.testing.assert_array_equal(suite.known(ytr), [1, 1, 1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(suite.known(yte), [0, 1, 1, 1])
    np.testing.assert_array_equal(suite.known(tasks["sex"][1]), [1, 1, 0, 1])  # class ids: -1 is outside
    test["age"][:] = np.nan
    assert suite.tasks(train, test, names=("age",)) == []  # no test row with an age


def test_compare_is_a_paired_study_level_bootstrap(rng):
    """Gains of encoder a over b with bootstrap intervals over studies: zero for identical
    scores, clearly positive for a perfect encoder against noise, wider when the same rows come
    from fewer studies (the series of a study are resampled together), and the finding tasks
    grouped into their mean; regression gains are MAE differences (positive: a better)."""
    from decipher_jax.eval import suite

    y = np.tile([0, 1], 50)
    noise = rng.random(100)
    perfect = np.stack([1 - y, y], 1).astype(float)
    rand = np.stack([1 - noise, noise], 1)
    many, few = np.array([f"S{i}" for i in range(100)]), np.array([f"S{i // 10}" for i in range(100)])
    preds = {("a", "finding: x"): (y, perfect, many), ("b", "finding: x"): (y, rand, many),
             ("a", "finding: z"): (y, rand, many), ("b", "finding: z"): (y, rand, many),
             ("a", "age"): (np.arange(100.0), np.arange(100.0) + 1, many),
             ("b", "age"): (np.arange(100.0), np.arange(100.0) + 3, many)}
    out = {r["task"]: r for r in suite.compare(preds, "a", "b", draws=300)}
    assert list(out) == ["age", "finding: x", "finding: z", "findings (2)"]
    x, z = out["finding: x"], out["finding: z"]
    assert x["gain"] == pytest.approx(1.0 - probes.auroc(noise, y)) and x["lo"] > 0.2 and x["p_not_better"] == 0
    assert z["gain"] == z["lo"] == z["hi"] == 0.0 and z["p_not_better"] == 1.0  # identical scores
    assert out["findings (2)"]["gain"] == pytest.approx(x["gain"] / 2)
    assert out["age"]["gain"] == pytest.approx(2.0) and out["age"]["metric"] == "MAE"
    # Rows that repeat within studies (10 studies of 10 alike series): resampled by study, the
    # interval is much wider than if the same rows were counted as 100 independent studies.
    ys = np.tile([0, 1], 5)
    yd, dup = np.repeat(ys, 10), np.repeat([0.1, 0.5, 0.4, 0.3, 0.6, 0.9, 0.2, 0.8, 0.7, 0.35], 10)  # AUROC 0.76
    alike = {("a", "sex"): (yd, np.stack([1 - dup, dup], 1), few), ("b", "sex"): (yd, np.full((100, 2), 0.5), few)}
    cx = suite.compare(alike, "a", "b", draws=300)[0]
    nx = suite.compare({k: (v[0], v[1], many) for k, v in alike.items()}, "a", "b", draws=300)[0]
    assert cx["n_studies"] == 10 and nx["n_studies"] == 100 and cx["gain"] == nx["gain"]
    assert (cx["hi"] - cx["lo"]) > 2 * (nx["hi"] - nx["lo"])
    with pytest.raises(ValueError, match="different test rows"):
        suite.compare({("a", "sex"): (y, perfect, many), ("b", "sex"): (y[::-1], rand, many)}, "a", "b", draws=5)


def test_cross_sex_probes_fit_one_sex_and_score_each(rng):
    """A finding that shows one way in men and the opposite way in women: fitted and scored on the
    same sex the probe is right, on the other it is wrong (a gap near 1 in AUROC); a task that shows
    the same way in both sexes has no gap. The other sex's training rows are never fitted."""
    from decipher_jax.eval import probes as P
    from decipher_jax.eval import suite

    def split(n, seed):
        r = np.random.default_rng(seed)
        sex = np.array(["M", "F"] * (n // 2))
        region = np.array(["brain"] * n)
        y = r.integers(0, 2, n)
        x = r.normal(size=(n, 8)).astype(np.float32)
        x[:, 0] += np.where(sex == "M", 2.0, -2.0) * (y - 0.5) * 2  # flips with sex
        lab = r.integers(0, 2, n)
        x[:, 1] += 3.0 * (lab - 0.5)  # the same in both sexes
        return {"mean": x, "sex": sex, "body_region": region, "findings": np.where(y == 1, "infarct", ""),
                "sequence": np.where(lab == 1, "T1", "T2"), "patient_id": np.array([f"p{seed}_{i}" for i in range(n)]),
                "study_id": np.array([f"s{seed}_{i}" for i in range(n)])}

    feats = {"train": split(200, 0), "test": split(200, 1)}
    rows = suite.cross_group(feats, {}, names=("sequence", "findings"))
    by = {(r["task"], r["fit_on"], r["score_on"]): r["score"] for r in rows}
    for fit, other in (("M", "F"), ("F", "M")):
        assert by[("finding: infarct", fit, fit)] > 0.9 and by[("finding: infarct", fit, other)] < 0.1
        assert by[("sequence", fit, fit)] > 0.9 and by[("sequence", fit, other)] > 0.9
    assert {r["n_train"] for r in rows} == {100}
    summ = {(s["task"]): s for s in suite.cross_summary([{"encoder": "e", **r} for r in rows])}
    assert summ["findings"]["gap"] > 0.8 and abs(summ["sequence"]["gap"]) < 0.05
    # train_rows: the same probe as one fitted on the subset alone.
    m = feats["train"]["sex"] == "M"
    y = (feats["train"]["findings"] == "infarct").astype(int)
    yt = (feats["test"]["findings"] == "infarct").astype(int)
    a = P.logistic_sweep(feats["train"]["mean"], feats["test"]["mean"], [P.Task("t", y, yt)], train_rows=m,
                         inv_regs=(1.0,), folds=2)
    assert a[0]["n_train"] == 100


def test_age_probes_fit_one_linear_map_per_body_region(rng):
    """Age that reads one way in the brain's features and the opposite way in the knee's (as CSF
    and fatty muscle do): one ridge over every region's features learns nothing (the training-mean
    floor); the suite's age probe, crossed with the body region (``suite.regional``), reads it in
    both. A region the training rows lack gets the intercept; one region alone is not crossed."""
    from decipher_jax.eval import suite

    def split(n, seed):
        r = np.random.default_rng(seed)
        region = np.array(["brain", "knee"] * (n // 2))
        age = r.uniform(18, 90, n)
        x = r.normal(size=(n, 6)).astype(np.float32)
        x[:, 0] += np.where(region == "brain", 1.0, -1.0) * (age - 54) / 10
        return {"mean": x, "age": age, "body_region": region, "patient_id": np.array([f"p{seed}_{i}" for i in range(n)])}

    train, test, val = split(300, 0), split(200, 1), split(100, 2)
    (name, ytr, yte), = suite.tasks(train, test, names=("age",))
    lv = suite.region_levels(train)
    assert lv == ("brain", "knee")
    plain = probes.ridge_sweep(train["mean"], test["mean"], name, ytr, yte, val_x=val["mean"], val_y=val["age"])[0]
    every = np.ones(len(ytr), bool), np.ones(len(yte), bool)
    xtr, xte, xva = suite.regression_inputs({"train": train, "test": test, "val": val}, *every,
                                            train["mean"], test["mean"], val["mean"])
    np.testing.assert_array_equal(xtr, suite.regional(train["mean"], train["body_region"], lv))
    crossed = probes.ridge_sweep(xtr, xte, name, ytr, yte, val_x=xva, val_y=val["age"])[0]
    assert plain["mae"] > 0.95 * plain["mae_of_mean"]
    assert crossed["mae"] < 0.5 * crossed["mae_of_mean"], crossed
    x = suite.regional(np.ones((3, 2), np.float32), np.array(["brain", "knee", "spine"]), lv)
    np.testing.assert_array_equal(x, [[1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]])
    assert suite.region_levels({"body_region": np.array(["brain"] * 4)}) == () and suite.region_levels({}) == ()
    # The suite's cross-sex probes use the same input: age flips with region, not with sex.
    for d in (train, test, val):
        d["sex"] = np.where(np.arange(len(d["age"])) % 4 < 2, "M", "F")
    feats = {"train": train, "test": test, "val": val}
    rows = suite.cross_group(feats, suite.val_targets(train, val, names=("age",)), names=("age",))
    assert rows and all(-r["score"] < 10.0 for r in rows), rows  # MAE in years, the floor is about 18


def test_readout_chosen_per_family_on_the_held_out_rows():
    """With candidate readouts ("noise|signal"), each fraction x seed takes, for the findings and
    "abnormal" together (and for each attribute alone), the candidate with the lower held-out
    loss pooled over the family's tasks, weighted by their held-out rows: here the readout that
    carries the findings, whichever order the setting names them in, with the same rows and test
    scores as the sweep on that readout alone. A finding that the signal does not carry follows
    its family; equal readouts keep the first; the cross-sex probes choose the same way."""
    from decipher_jax.eval import suite

    def split(n, seed):
        r = np.random.default_rng(seed)
        y = r.integers(0, 2, n)
        age = r.normal(50, 15, n)
        signal = r.normal(size=(n, 6)).astype(np.float32)
        signal[:, 0] += 2.5 * (y - 0.5)
        signal[:, 1] = (age - 50) / 15 + 0.2 * r.normal(size=n)
        other = np.where(r.random(n) < 0.4, "cyst", "")  # in no readout
        findings = np.where(y == 1, np.where(other == "cyst", "infarct;cyst", "infarct"), other)
        return {"signal": signal, "noise": r.normal(size=(n, 6)).astype(np.float32), "findings": findings,
                "age": age.astype(np.float32), "body_region": np.array(["brain"] * n),
                "sex": np.array(["M", "F"] * (n // 2)), "patient_id": np.array([f"p{seed}_{i}" for i in range(n)]),
                "study_id": np.array([f"s{seed}_{i}" for i in range(n)])}

    feats = {"train": split(160, 0), "val": split(80, 1), "test": split(120, 2)}
    names = ("findings", "abnormal", "age")
    held = suite.val_targets(feats["train"], feats["val"], names=names)
    found = {t: (ytr, yte) for t, ytr, yte in suite.tasks(feats["train"], feats["test"], names=names)}
    assert set(held) == set(found) == {"finding: infarct", "finding: cyst", "abnormal", "age"}
    kw = dict(fractions=(0.3, 1.0), seeds=(0, 1))

    def sweeps(spec, **k):
        return {t: suite.sweep_readouts(feats, t, ytr, yte, spec, yva=held[t], **{**kw, **k})
                for t, (ytr, yte) in found.items()}

    alone = suite.select_readout(sweeps("signal"))
    assert all(r["feature"] == "signal" and "readout_losses" not in r for rows, _ in alone.values() for r in rows)
    noise = sweeps("noise")
    for spec in ("noise|signal", "signal | noise"):
        cand = sweeps(spec)
        chosen = suite.select_readout(cand)
        for t, (rows, sc) in chosen.items():
            assert len(rows) == 4 and all(r["feature"] == "signal" and r["selection"] == "val" for r in rows)
            assert [{k: v for k, v in r.items() if k not in ("readout_losses", "n_selection")} for r in rows] == [
                {k: v for k, v in r.items() if k != "n_selection"} for r in alone[t][0]]
            for a, b in zip(sc, alone[t][1]):
                np.testing.assert_array_equal(a, b)
        # The pooled loss by hand: the family's losses weighted by their held-out rows.
        fam = ("finding: infarct", "finding: cyst", "abnormal")
        for i in range(4):
            for name, src in (("signal", alone), ("noise", {t: suite.select_readout({t: noise[t]})[t] for t in fam})):
                rs = [src[t][0][i] for t in fam]
                want = sum(r["cv_log_loss"] * r["n_selection"] for r in rs) / sum(r["n_selection"] for r in rs)
                assert chosen["abnormal"][0][i]["readout_losses"][name] == pytest.approx(want, rel=1e-6)
            assert chosen["age"][0][i]["readout_losses"]["signal"] == alone["age"][0][i]["cv_mae"]
            assert chosen["finding: infarct"][0][i]["n_selection"] == int(suite.known(held["finding: infarct"]).sum())
    assert alone["finding: infarct"][0][-1]["auroc"] > 0.8
    # The cyst alone: neither readout carries it, so on its own it may take either; in its family it
    # takes the family's. Without a val split the choice is by CV.
    cv = suite.select_readout({t: suite.sweep_readouts(feats, t, *found[t], "noise|signal", **kw)
                               for t in ("finding: infarct", "finding: cyst")})
    assert all(r["feature"] == "signal" and r["selection"] == "3-fold CV" for rows, _ in cv.values() for r in rows)
    for d in (feats["train"], feats["val"], feats["test"]):
        d["copy"] = d["signal"].copy()
    rows, _ = suite.select_readout(sweeps("copy|signal"))["finding: cyst"]
    assert {r["feature"] for r in rows} == {"copy"}  # a tie keeps the first
    with pytest.raises(ValueError, match="no feature"):
        suite.readouts(" | ")
    with pytest.raises(ValueError, match="differ in length"):
        suite.select_readout({"age": cand["age"], "abnormal": sweeps("signal", seeds=(0,))["abnormal"]})
    cross = suite.cross_group(feats, held, feature="noise|signal", names=names)
    assert {(r["task"], r["feature"]) for r in cross} >= {("finding: infarct", "signal"), ("finding: cyst", "signal"),
                                                          ("age", "signal")}
    assert {r["feature"] for r in cross} == {"signal"}
    assert suite.readout_choices([{"encoder": "e", **r} for r in rows]) == {"e": {"copy": 4, "signal": 0}}


def test_readout_pool_leaves_out_members_chosen_by_cv():
    """A finding whose val split lacks a class chose its penalty by CV on the training rows (a
    loss on another scale, and optimistic for a pretrained encoder): when any member of the family
    was scored on val, the pooled loss reads the val-scored members only; with none, all of them.
    A candidate no held-out row scored is recorded as None and never chosen."""
    from decipher_jax.eval import suite

    def res(losses, selection, n):
        return [(f, [{"task": "t", "fraction": 1.0, "seed": 0, "cv_log_loss": v, "n_selection": n,
                      "selection": selection}], [np.full(1, v)]) for f, v in losses]

    results = {"finding: x": res([("a", 0.1), ("b", 0.9)], "3-fold CV", 300),
               "abnormal": res([("a", 0.6), ("b", 0.5)], "val", 40),
               "finding: y": res([("a", 0.7), ("b", 0.65)], "val", 10)}
    out = suite.select_readout(results)
    assert {rows[0]["feature"] for rows, _ in out.values()} == {"b"}
    assert out["finding: x"][1][0][0] == 0.9  # the chosen candidate's scores travel with it
    got = out["abnormal"][0][0]["readout_losses"]
    assert got == pytest.approx({"a": (0.6 * 40 + 0.7 * 10) / 50, "b": (0.5 * 40 + 0.65 * 10) / 50})
    cv_only = {t: res([(f, v) for f, v in [("a", r[0][1][0]["cv_log_loss"]), ("b", r[1][1][0]["cv_log_loss"])]],
                      "3-fold CV", r[0][1][0]["n_selection"]) for t, r in results.items()}
    assert {rows[0]["feature"] for rows, _ in suite.select_readout(cv_only).values()} == {"a"}  # x's 300 rows weigh
    unscored = {"abnormal": res([("a", float("nan")), ("b", 0.5)], "val", 40)}
    rows, _ = suite.select_readout(unscored)["abnormal"]
    assert rows[0]["feature"] == "b" and rows[0]["readout_losses"] == {"a": None, "b": 0.5}
