"""Frozen probes on each pooled feature of a pipeline run's saved features: the patch tokens'
mean, their max, and both side by side, per encoder (random init, stage 1, stage 2).

    .venv/bin/python benchmarks/frozen_pools.py --workdir W     # W: a `decipher pipeline` workdir

Reads ``W/features/<encoder>/{train,test}`` (written by the probes evaluator) and fits, per
finding task (:func:`decipher_jax.eval.suite.tasks`: the finding's body regions only), a
standardised logistic regression with its inverse penalty chosen by 3-fold cross-validation
grouped by patient (scikit-learn), on all training labels; prints the test AUROC per finding and
the mean. The suite's own probes stay the reference; this only compares the pools side by side.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--pools", default="mean,max,mean+max")
    args = p.parse_args(argv)
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from decipher_jax import layout
    from decipher_jax.eval import features, suite

    root = layout.PipelineDir(args.workdir).features
    encs = [e for e in ("random_init", "stage_1", "stage_2") if os.path.isdir(os.path.join(root, e, "test"))]
    if not encs:
        raise SystemExit(f"{root}: no saved features (run the pipeline's probes first)")
    print("| encoder | pool | mean AUROC | " + " | ".join(["per finding"]) + " |")
    print("|---|---|---|---|")
    for enc in encs:
        tr, te = (features.load(os.path.join(root, enc, s)) for s in ("train", "test"))
        todo = [t for t in suite.tasks(tr, te, names=("findings",)) if t[0].startswith(suite.FINDING)]
        for pool in args.pools.split(","):
            xtr_all, xte_all = features.combined(tr, pool), features.combined(te, pool)
            res = []
            for name, ytr, yte in todo:
                a, b = suite.known(ytr), suite.known(yte)
                grid = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                                    {"logisticregression__C": [1e-3, 1e-2, 1e-1, 1.0]}, cv=GroupKFold(3),
                                    scoring="roc_auc")
                grid.fit(xtr_all[a], ytr[a], groups=tr["patient_id"][a])
                res.append((name[len(suite.FINDING):], roc_auc_score(yte[b], grid.predict_proba(xte_all[b])[:, 1])))
            print(f"| {enc} | {pool} | {np.mean([r for _, r in res]):.3f} | "
                  + ", ".join(f"{n} {r:.2f}" for n, r in res) + " |", flush=True)


if __name__ == "__main__":
    main()
