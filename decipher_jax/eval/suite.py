"""Frozen-encoder evaluation of a pipeline workdir: linear probes of the stage-2, stage-1 and
randomly initialised image encoders on the metadata tasks of a prepared dataset.

    rows = probe_encoders("outputs/demo", "outputs/demo/data/prep")   # also writes eval/probes.{csv,json}

Tasks come from the records' metadata:

- attributes: body region, sequence and sex (classes seen in the training split; test rows of
  unseen classes are dropped), and age, a regression (ridge probes, MAE; rows without an age
  are dropped);
- findings (the disease probes): one binary task per finding seen in training, "finding:
  infarct", over the series of the body regions where that finding occurs in training (an
  infarct probe is fitted and scored on brain series only). An empty finding list is a normal
  study.

Probes: logistic (ridge for age), the penalty chosen by 3-fold CV, over label fractions x
seeds, all in batched calls (:mod:`decipher_jax.eval.probes`). :func:`summarise` groups the finding tasks into one score
("findings": the mean over them), the figure a reader looks at first.
"""

from __future__ import annotations

import csv
import json
import os

import jax
import numpy as np

from decipher_jax import checkpoint as ckpt
from decipher_jax import sharding as sh
from decipher_jax.data import pipelines as P
from decipher_jax.eval import features, probes
from decipher_jax.models.vit3d import ViT3D, ViTConfig
from decipher_jax.trainers import common

TASKS = ("body_region", "sequence", "sex", "age", "findings")
REGRESSION = ("age",)  # real-valued targets: ridge probes, MAE
FINDING = "finding: "


def known(y) -> np.ndarray:
    """Rows inside a task: class ids >= 0, or finite regression targets."""
    y = np.asarray(y)
    return np.isfinite(y) & (y >= 0) if y.dtype.kind == "f" else y >= 0


def encoders(workdir: str, mesh) -> tuple[dict, ViTConfig]:
    """``({name: (model, params)}, vit config)`` for the stage-2 image tower, the stage-1 teacher
    and a random init."""
    from decipher_jax.trainers import clip_align

    out = {}
    mesh = mesh or sh.make_mesh({"data": -1})
    s2 = os.path.join(workdir, "stage2")
    _, params2, spec = clip_align.load(s2, mesh=mesh)
    vit = ViTConfig(**clip_align.from_json(spec["vit"]))
    model = common.Model(lambda r: ViT3D(vit, rngs=r), mesh)
    out["stage 2 (CLIP)"] = (model, params2["image"])
    s1 = os.path.join(workdir, "stage1_vision")
    if os.path.isdir(os.path.join(s1, "checkpoints")):
        out["stage 1 (DINO teacher)"] = (model, stage1_teacher(s1, model))
    out["random init"] = (model, model.init(jax.random.key(123)))
    return out, vit


def stage1_teacher(ssl_workdir: str, model: common.Model):
    """The EMA teacher's backbone from a ``vision_ssl`` workdir's latest checkpoint, on ``model``'s
    shardings (a ViT3D of the same config)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    _, part = ckpt.restore_subtree(os.path.join(ssl_workdir, "checkpoints"),
                                   {"teacher": {"backbone": common.abstract(shapes, model.shardings)}})
    return part["teacher"]["backbone"]


def tasks(train: dict, test: dict, names=TASKS) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, train ids, test ids) per task; -1 marks a row outside the task (a class unseen in
    training, or a body region where the finding does not occur), NaN a regression row without
    a target (:func:`known`). ``names``: metadata fields, and "findings" for the per-finding
    binary tasks. Tasks without a test row are left out."""
    out = []
    for name in names:
        if name == "findings":
            out += _finding_tasks(train, test)
        elif name in REGRESSION and name in train:
            ytr, yte = (np.asarray(d[name], np.float64) for d in (train, test))
            if known(ytr).sum() >= 6 and np.ptp(ytr[known(ytr)]) > 0:
                out.append((name, ytr, yte))
        elif name in train:
            ytr, yte, k = probes.metadata_labels(train[name], test[name])
            if k >= 2:
                out.append((name, ytr, yte))
    return [t for t in out if known(t[2]).any()]


def task_order(name: str):
    """Sort key: attributes first, then the finding tasks (grouped or one by one)."""
    return name.startswith("finding"), name


def _finding_tasks(train: dict, test: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    if "findings" not in train or "body_region" not in train:
        return []
    out = []
    sets = {sp: [set(str(v).split(";")) - {""} for v in d["findings"]] for sp, d in (("train", train), ("test", test))}
    for f in sorted(set().union(*sets["train"])):
        regions = {r for r, fs in zip(train["body_region"], sets["train"]) if f in fs}
        ys = [np.where(np.isin(d["body_region"], list(regions)), [int(f in fs) for fs in sets[sp]], -1)
              for sp, d in (("train", train), ("test", test))]
        if min(np.sum(ys[0] == 1), np.sum(ys[0] == 0)) >= 2:  # both classes in training
            out.append((FINDING + f, ys[0], ys[1]))
    return out


def probe_encoders(workdir: str, prep_dir: str, *, fractions=(0.1, 0.3, 1.0), seeds=(0, 1, 2), mesh=None,
                   feature: str = "mean", encs: tuple[dict, ViTConfig] | None = None) -> list[dict]:
    """``encs``: the output of :func:`encoders` when the caller already holds it."""
    mesh = mesh or sh.make_mesh({"data": -1})
    encs, vit = encs or encoders(workdir, mesh)
    rows = []
    out_dir = os.path.join(workdir, "eval")
    for name, (model, params) in encs.items():
        tag = "_".join(name.split(" ")[:2])  # "stage_2", "stage_1", "random_init"
        feats = {}
        for split in ("train", "test"):
            feats[split] = features.extract(model, params, P.data_source(prep_dir, split), mesh, size=vit.img_size,
                                            out_dir=os.path.join(out_dir, "features", tag, split))
        for tname, ytr, yte in tasks(feats["train"], feats["test"]):
            tr_ok, te_ok = known(ytr), known(yte)  # rows with a known label, one task at a time
            xtr, xte = feats["train"][feature][tr_ok], feats["test"][feature][te_ok]
            if tname in REGRESSION:
                res = probes.ridge_sweep(xtr, xte, tname, ytr[tr_ok], yte[te_ok], fractions=fractions, seeds=seeds)
            else:
                res = probes.logistic_sweep(xtr, xte, [probes.Task(tname, ytr[tr_ok], yte[te_ok])],
                                            fractions=fractions, seeds=seeds, iters=100)
            rows += [{"encoder": name, "feature": feature, **r} for r in res]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "probes.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, "probes.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # ridge rows differ
        w.writeheader()
        w.writerows(rows)
    return rows


def summarise(rows: list[dict], metric: str = "balanced_accuracy", group_findings: bool = False) -> dict:
    """``{(encoder, task, fraction): (mean, std over seeds)}``. With ``group_findings`` the
    finding tasks become one task, "findings (K)": per seed, the mean over the K finding tasks
    that have a score (a test split may lack one class of a task)."""
    n_find = len({r["task"] for r in rows if r["task"].startswith(FINDING)})
    per_seed: dict = {}
    for r in rows:
        v = r.get(metric)
        if v is None or not np.isfinite(v):
            continue
        task = r["task"]
        if group_findings and task.startswith(FINDING):
            task = f"findings ({n_find})"
        per_seed.setdefault((r["encoder"], task, r["fraction"], r["seed"]), []).append(v)
    groups: dict = {}
    for (enc, task, frac, _), v in per_seed.items():
        groups.setdefault((enc, task, frac), []).append(float(np.mean(v)))
    return {key: (float(np.mean(v)), float(np.std(v))) for key, v in groups.items()}
