"""Is each scored task learnable from the image at the evaluation's input size? (issue 18, item 4)

    .venv/bin/python benchmarks/learnability.py --prep outputs/demo/data/prep --size 32

For every per-finding task (scored within the body regions where the finding occurs, as the
probes are) and the attributes, on the prepared records resized whole to ``--size``:

- lesion: mean lesion voxels per positive series at that size (from the records' masks) and
  the lesion's share of the volume;
- hist LR: a logistic regression (scikit-learn, C chosen by 3-fold CV on train) on simple image
  statistics that need no location: a 32-bin intensity histogram of the volume, its 90/99/99.9th
  percentiles, each crossed with the series' sequence (a bright blob means something else on T1);
- voxel LR: a logistic regression on the raw voxels downsampled to 16^3 (a location-bound
  linear model: it sees where anatomy is, not where a lesion moved).
- nuisance: no image at all: each test series scored with the training split's prevalence of the
  finding among series of the same sequence and sex. A model that learns such patient-level
  attributes instead of the lesion scores like this column, which on a small test split can sit
  far from 0.5 in either direction;
- test positives: the test split's positive series and the distinct patients they come from
  (the AUROC's effective sample size).

Age, a regression, gets its own table: per body region, the test MAE of a ridge regression
(penalty by CV on train) on the histogram statistics and on the 8^3 voxels (each crossed with the
sequence), against predicting the training mean age (the floor the suite's probes report).

Test AUROC of each. A task neither statistic learns and no supervised model learns either
(``benchmarks/monai_anchor.py``) is not measuring an encoder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from decipher_jax import env  # noqa: E402

env.setup(devices=1, platform="cpu")  # sklearn / torch on the CPU; jax only reads the records (no accelerator probe)


def load(prep: str, split: str, size: int, masks: bool = True):
    """(images (N, S, S, S), lesion masks (N, S, S, S) or None, metadata) of one split, resized whole."""
    import numpy as np

    from decipher_jax.data import pipelines as P
    from decipher_jax.data import transforms as T
    from decipher_jax.eval import embed

    src = P.data_source(prep, split)
    xs, ls, meta = [], [], {}
    for b, n in embed.scan_split(src, [T.Decode(keep_label=masks), T.Resize((size,) * 3)], 16):
        xs.append(b["image"][:n, ..., 0].astype(np.float32))
        if "label" in b:
            ls.append(np.asarray(b["label"][:n]) > 0)
        for k in embed.META:
            if k in b:
                meta.setdefault(k, []).extend(list(b[k][:n]))
    return np.concatenate(xs), (np.concatenate(ls) if ls else None), {k: np.asarray(v) for k, v in meta.items()}


def hist_features(x, seq, sequences):
    """Location-free statistics per volume, crossed with the sequence (one block per sequence)."""
    import numpy as np

    flat = x.reshape(len(x), -1)
    h = np.stack([np.histogram(v, bins=32, range=(0.0, 1.0))[0] for v in flat]).astype(np.float64) / flat.shape[1]
    q = np.percentile(flat, [90, 99, 99.9], axis=1).T
    f = np.concatenate([np.sqrt(h), q], 1)
    return np.concatenate([f, crossed(f, seq, sequences)], 1)


def crossed(f, seq, sequences):
    """``f`` once per sequence, zero on the other sequences' rows (one block each)."""
    import numpy as np

    return np.concatenate([f * (seq == s)[:, None] for s in sequences], 1)


def nuisance_auroc(mtr, ytr, mte, yte, keys=("sequence", "sex")) -> float:
    """Test AUROC of the training prevalence of the label within each group of ``keys``."""
    import numpy as np

    from decipher_jax.eval import probes

    gtr = list(zip(*[np.asarray(mtr[k]).astype(str) for k in keys]))
    gte = list(zip(*[np.asarray(mte[k]).astype(str) for k in keys]))
    groups: dict = {}
    for g, y in zip(gtr, ytr):
        if y >= 0:
            groups.setdefault(g, []).append(y)
    prior = float(np.mean(ytr[ytr >= 0]))
    s = np.array([np.mean(groups[g]) if g in groups else prior for g in gte])
    ok = yte >= 0
    return probes.auroc(s[ok], yte[ok])


def voxel_features(x, k: int = 16):
    n, s = len(x), x.shape[1]
    r = s // k
    return x[:, : k * r, : k * r, : k * r].reshape(n, k, r, k, r, k, r).mean((2, 4, 6)).reshape(n, -1)


def fit_auroc(ftr, ytr, fte, yte):
    """Test AUROC (one-vs-rest mean for several classes) of a CV-tuned logistic regression."""
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(ftr)
    folds = max(2, min(3, int(np.bincount(ytr).min())))
    m = LogisticRegressionCV(Cs=[0.01, 0.1, 1.0, 10.0], cv=folds, max_iter=2000).fit(sc.transform(ftr), ytr)
    p = m.predict_proba(sc.transform(fte))
    if p.shape[1] == 2:
        return float(roc_auc_score(yte, p[:, 1]))
    return float(roc_auc_score(yte, p, multi_class="ovr", labels=m.classes_))


def age_rows(xtr, mtr, xte, mte, sequences) -> list[list[str]]:
    """Per body region and overall: (region, train / test series, floor MAE, hist ridge MAE,
    voxel ridge MAE) in years; rows without an age are left out."""
    import numpy as np
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    atr, ate = np.asarray(mtr["age"], float), np.asarray(mte["age"], float)
    ok_tr, ok_te = np.isfinite(atr), np.isfinite(ate)
    rtr, rte = np.asarray(mtr["body_region"]), np.asarray(mte["body_region"])
    pred = {k: np.full(len(ate), atr[ok_tr].mean()) for k in ("hist", "voxel")}
    rows = []
    for reg in sorted(set(rtr[ok_tr])):
        tr, te = ok_tr & (rtr == reg), ok_te & (rte == reg)
        if not te.any():
            continue
        feats = {"hist": (hist_features(xtr[tr], mtr["sequence"][tr], sequences),
                          hist_features(xte[te], mte["sequence"][te], sequences)),
                 "voxel": (crossed(voxel_features(xtr[tr], 8), mtr["sequence"][tr], sequences),
                           crossed(voxel_features(xte[te], 8), mte["sequence"][te], sequences))}
        for k, (ftr, fte) in feats.items():
            sc = StandardScaler().fit(ftr)
            m = RidgeCV(alphas=10.0 ** np.arange(-2, 6)).fit(sc.transform(ftr), atr[tr])
            pred[k][te] = m.predict(sc.transform(fte))
        rows.append([reg, f"{int(tr.sum())} / {int(te.sum())}", f"{np.abs(ate[te] - atr[ok_tr].mean()).mean():.1f}",
                     f"{np.abs(pred['hist'][te] - ate[te]).mean():.1f}", f"{np.abs(pred['voxel'][te] - ate[te]).mean():.1f}"])
    rows.append(["all", f"{int(ok_tr.sum())} / {int(ok_te.sum())}", f"{np.abs(ate[ok_te] - atr[ok_tr].mean()).mean():.1f}",
                 f"{np.abs(pred['hist'][ok_te] - ate[ok_te]).mean():.1f}",
                 f"{np.abs(pred['voxel'][ok_te] - ate[ok_te]).mean():.1f}"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", required=True)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args(argv)

    import numpy as np

    from benchmarks.common import table
    from decipher_jax.eval import suite

    t0 = time.perf_counter()
    xtr, ltr, mtr = load(args.prep, "train", args.size)
    xte, lte, mte = load(args.prep, "test", args.size)
    sequences = sorted(set(mtr["sequence"]))
    htr, hte = hist_features(xtr, mtr["sequence"], sequences), hist_features(xte, mte["sequence"], sequences)
    vtr, vte = voxel_features(xtr), voxel_features(xte)
    print(f"train {xtr.shape} test {xte.shape} loaded in {time.perf_counter() - t0:.0f} s", flush=True)

    rows, hist_f, vox_f, nui_f = [], [], [], []
    for name, ytr, yte in suite.tasks(mtr, mte, names=("findings", "body_region", "sequence", "sex")):
        ok_tr, ok_te = ytr >= 0, yte >= 0
        if len(set(yte[ok_te])) < 2:
            continue
        a_h = fit_auroc(htr[ok_tr], ytr[ok_tr], hte[ok_te], yte[ok_te])
        a_v = fit_auroc(vtr[ok_tr], ytr[ok_tr], vte[ok_te], yte[ok_te])
        lesion = nuisance = positives = "-"
        if name.startswith(suite.FINDING):
            a_n = nuisance_auroc(mtr, ytr, mte, yte)
            nuisance = f"{a_n:.2f}"
            pos_te = yte == 1
            positives = f"{int(pos_te.sum())} ({len(set(np.asarray(mte['patient_id'])[pos_te]))})"
            hist_f.append(a_h)
            vox_f.append(a_v)
            nui_f.append(a_n)
            if ltr is not None:
                pos = ok_tr & (ytr == 1)
                vox = ltr[pos].reshape(pos.sum(), -1).sum(1)
                lesion = f"{vox.mean():.0f} ({100 * vox.mean() / ltr[0].size:.2f}%)"
        counts = f"{int((ytr[ok_tr] == 1).sum())}/{int(ok_tr.sum())}" if ytr.max() == 1 else str(int(ok_tr.sum()))
        rows.append([name.removeprefix(suite.FINDING), counts, str(int(ok_te.sum())), positives, lesion,
                     f"{a_h:.2f}", f"{a_v:.2f}", nuisance])
    rows.append(["mean of findings", "", "", "", "", f"{np.mean(hist_f):.3f}", f"{np.mean(vox_f):.3f}",
                 f"{np.mean(nui_f):.3f}"])
    print(table(["task", "train pos/n", "test n", "test pos (patients)", f"lesion voxels at {args.size}^3",
                 "hist LR", "voxel LR", "nuisance"], rows))
    if "age" in mtr:
        print(table(["age: body region", "train / test series", "floor (training mean)", "hist ridge", "voxel ridge"],
                    age_rows(xtr, mtr, xte, mte, sequences)))
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
