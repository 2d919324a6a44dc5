"""Evaluation sweeps: grids over feature sets x tasks x heads x hyper-parameters in one process.

    decipher sweep --sweep experiments/sweeps/probes.py --workdir outputs/demo

A sweep file defines ``get_sweep() -> dict`` (see ``experiments/sweeps/probes.py``):

    features:  {name: dir}        dirs with train/, test/ (and val/) feature chunks (features.extract), or
    pipeline:  "outputs/demo"     extract the stage-2 / stage-1 / random-init encoders of a run
    data:      prepared data dir  (with ``pipeline``)
    tasks:     metadata fields used as labels ("body_region", "sequence", ...), and "findings":
               one binary probe per finding, on the body regions where it occurs (eval.suite)
    pool:      ["mean", "cls"]    which feature vector
    heads:     {"logistic": {"C": [...], "fractions": [...], "seeds": [...], "folds": 3},
                "knn": {"k": [...], "temperature": 0.07},
                "ridge": {"lambda": [...], "fractions": [...], "seeds": [...]}}   # regression tasks (age)

Every (feature set, pool, task) runs all logistic probes of its grid in two batched calls
(penalty selection, then refit) and all kNN settings from one similarity matrix; jitted functions are cached
by shape, so later cells reuse the compilations of the first. Results: ``sweep.csv`` and
``sweep.json`` in ``workdir/eval``. Penalties are chosen on the val split where the feature
set has one holding the task (as in ``eval.suite``), else by CV folds drawn by patient.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import time

import jax.numpy as jnp
import numpy as np

from decipher_jax import layout
from decipher_jax.eval import features as F
from decipher_jax.eval import probes


def load_sweep(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"sweep file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"decipher_sweep_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_sweep()


def feature_sets(sw: dict, workdir: str) -> dict[str, dict]:
    """The sweep's feature sets: precomputed feature dirs, and a pipeline workdir's encoders."""
    sets = {}
    for name, d in sw.get("features", {}).items():
        sets[name] = {split: F.load(os.path.join(d, split)) for split in ("train", "val", "test")
                      if split != "val" or os.path.isdir(os.path.join(d, split))}
    if sw.get("pipeline"):
        from decipher_jax.eval import suite

        encs, vit = suite.encoders(sw["pipeline"], None)
        sets |= encoder_sets(encs, vit, suite.split_sources(sw["data"]))  # val when the data has one
    if not sets:
        raise ValueError("the sweep names no features and no pipeline workdir")
    return sets


def run(sw: dict, workdir: str) -> list[dict]:
    """The sweep over its feature sets; ``sweep.json`` and ``sweep.csv`` in ``workdir/eval``."""
    rows = grid(sw, feature_sets(sw, workdir))
    write(rows, layout.PipelineDir(workdir).eval)
    return rows


def encoder_sets(encs: dict, vit, splits: dict) -> dict[str, dict]:
    """Feature sets of frozen encoders (``{name: (model, params)}``) over ``{split: source}``."""
    return {name: {split: F.extract(model, params, src, model.mesh, size=vit.img_size) for split, src in splits.items()}
            for name, (model, params) in encs.items()}


def grid(sw: dict, sets: dict[str, dict]) -> list[dict]:
    """Rows of every (feature set, pool, task, head, hyper-parameters) cell of the sweep."""
    from decipher_jax.eval import suite

    rows = []
    heads = sw.get("heads", {"logistic": {}})
    for set_name, fs in sets.items():
        for pool in sw.get("pool", ["mean"]):
            for field in sw["tasks"]:
                if field not in fs["train"] and field != "findings":
                    raise KeyError(f"task {field!r} is not a metadata field of feature set {set_name!r}")
                held = suite.val_targets(fs["train"], fs.get("val"), names=(field,))
                for name, ytr, yte in suite.tasks(fs["train"], fs["test"], names=(field,)):
                    tr, te = suite.known(ytr), suite.known(yte)
                    xtr, xte = fs["train"][pool][tr], fs["test"][pool][te]
                    cvg = suite.cv_groups(fs["train"], tr)  # label subsets (and CV folds) by patient
                    yva = held.get(name)  # the val split chooses the penalty where it has the task
                    xva = fs["val"][pool] if yva is not None else None
                    base = {"features": set_name, "pool": pool, "task": name}
                    if name in suite.REGRESSION:  # age: ridge probes only, within each body region
                        xtr, xte, xva = suite.regression_inputs(fs, tr, te, xtr, xte, xva)
                        h = heads.get("ridge", {})
                        t0 = time.perf_counter()
                        res = probes.ridge_sweep(xtr, xte, name, ytr[tr], yte[te],
                                                 lams=tuple(h.get("lambda", 10.0 ** np.arange(-1, 7))),
                                                 fractions=tuple(h.get("fractions", (1.0,))),
                                                 seeds=tuple(h.get("seeds", (0,))), folds=h.get("folds", 3),
                                                 cv_groups=cvg, val_x=xva, val_y=yva)
                        dt = time.perf_counter() - t0
                        rows += [base | r | {"seconds": dt / len(res)} for r in res]
                        continue
                    task = probes.Task(name, ytr[tr], yte[te], yva)
                    k = task.num_classes
                    if "logistic" in heads:
                        h = heads["logistic"]
                        t0 = time.perf_counter()
                        res = probes.logistic_sweep(xtr, xte, [task],
                                                    inv_regs=tuple(h.get("C", 10.0 ** np.arange(-3, 3))),
                                                    fractions=tuple(h.get("fractions", (1.0,))),
                                                    seeds=tuple(h.get("seeds", (0,))), folds=h.get("folds", 3),
                                                    iters=h.get("iters", 100), cv_groups=cvg, val_x=xva)
                        dt = time.perf_counter() - t0
                        rows += [base | r | {"seconds": dt / len(res)} for r in res]
                    if "knn" in heads:
                        h = heads["knn"]
                        for kk in h.get("k", (10, 20)):
                            s = probes.knn_scores(jnp.asarray(xtr), jnp.asarray(ytr[tr]), jnp.asarray(xte), k, k=kk,
                                                  temperature=h.get("temperature", 0.07))
                            s = np.asarray(s)
                            probs = s / np.maximum(s.sum(1, keepdims=True), 1e-12)
                            rows.append(base | {"head": f"knn k={kk}", "fraction": 1.0, "seed": 0,
                                                "auroc": probes.macro_auroc(probs, yte[te], k),
                                                "balanced_accuracy": probes.balanced_accuracy(s.argmax(1), yte[te]),
                                                "accuracy": float(np.mean(s.argmax(1) == yte[te]))})
    return rows


def write(rows: list[dict], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("features", "pool", "task", "head"), k))
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return rows
