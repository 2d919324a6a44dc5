"""The ladder: every rung of a task scored on the same held-out split, against label fraction.

    rows = ladder.rows_for("findings", load_probe_scores("W/eval/probes/test_scores.npz"),
                           {("supervised", 0.1): dict(np.load("W/ladder/findings/supervised-0.1/test_predictions.npz"))},
                           fractions=[0.1, 1.0])

Rungs, bottom to top as a reader expects them:
- frozen encoders with light heads: the probes evaluator's linear probes of random init, the
  stage-1 teacher and the stage-2 image tower (``eval/probes.json``; their test scores in
  ``eval/probes/test_scores.npz``);
- ``supervised``: the same ViT trained end to end on the task from random init (the
  reference a pretrained encoder must approach with fewer labels);
- ``fine-tuned``: the same ViT fine-tuned end to end from the stage-2 image tower.
The two trained rungs are fine-tuning runs (:mod:`decipher_jax.trainers.finetune`) on the same
label fractions as the probes (whole patients, the same draw), under ``<workdir>/ladder/<task>/
<rung>-<fraction>/`` (the pipeline's ``ladder`` stage trains them; evaluation only reads them). Every (task, rung, fraction) row
carries a 95% interval over bootstrap draws of the test *studies* (a study's series move
together), the same draws for every rung so that rungs compare on the same resamples. The
findings task is the mean AUROC over the findings (each on its body regions), resampled jointly.
"""

from __future__ import annotations

import os

import numpy as np

from decipher_jax.eval import probes

# fine-tuning task -> the probes' task name (the findings: their per-finding tasks, averaged)
PROBE_TASK = {"findings": "finding: ", "abnormal": "abnormal", "body_region": "body_region",
              "sequence": "sequence", "sex": "sex", "age": "age"}
TRAINED = ("supervised", "fine-tuned")
PROBE_SCORES = "test_scores.npz"  # under eval/probes/
ROOT = "ladder"  # the trained rungs' folder in a workdir


def run_dir(workdir: str, task: str, rung: str, fraction: float) -> str:
    """Where a trained rung lives: ``<workdir>/ladder/<task>/<rung>-<fraction>/`` (:func:`find_runs`)."""
    return os.path.join(workdir, ROOT, task, f"{rung}-{fraction:g}")


def find_runs(root: str) -> dict[tuple[str, str, float], str]:
    """``{(task, rung, fraction): workdir}`` of the finished fine-tuning runs under ``root``
    (``<task>/<rung>-<fraction>/test.json``)."""
    out = {}
    if not os.path.isdir(root):
        return out
    for task in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, task)) if os.path.isdir(os.path.join(root, task)) else []):
            rung, _, frac = name.rpartition("-")
            w = os.path.join(root, task, name)
            if rung in TRAINED and os.path.exists(os.path.join(w, "test.json")):
                out[(task, rung, float(frac))] = w
    return out


def metric_of(task: str) -> str:
    return "MAE" if task == "age" else "AUROC"


def _part_score(kind: str, y, s) -> float:
    if kind == "mae":
        return probes.mae(s, y)
    if kind == "binary":
        return probes.auroc(s, y)
    return probes.macro_auroc(s, y, s.shape[1])


def bootstrap(parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], studies: np.ndarray, *, draws: int = 500,
              seed: int = 0, level: float = 0.95) -> dict:
    """``{"score", "lo", "hi"}`` of the mean over ``parts`` (``(kind, y, scores, study_ids)``:
    kind "binary" (AUROC of 1-D scores), "multiclass" (macro AUROC of class probabilities) or
    "mae"), resampling the test studies ``studies`` with replacement ``draws`` times (the same
    draws for every call with the same ``studies`` and ``seed``)."""
    index = {s: i for i, s in enumerate(np.asarray(studies).astype(str))}
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(index), np.full(len(index), 1.0 / max(len(index), 1)), size=draws)

    # each part's series -> its study's index, once (not once per draw)
    study_of = [np.array([index[x] for x in np.asarray(st).astype(str)], int) for *_, st in parts]

    def value(weights=None):
        vals = []
        for (kind, y, s, _), si in zip(parts, study_of):
            if weights is None:
                vals.append(_part_score(kind, y, s))
                continue
            idx = np.repeat(np.arange(len(y)), weights[si])
            vals.append(_part_score(kind, y[idx], s[idx]) if len(idx) else np.nan)
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    full = value()
    boot = np.array([value(c) for c in counts])
    boot = boot[np.isfinite(boot)]
    q = (1 - level) / 2
    return {"score": full, "lo": float(np.quantile(boot, q)) if len(boot) else float("nan"),
            "hi": float(np.quantile(boot, 1 - q)) if len(boot) else float("nan"), "draws": draws}


def trained_parts(task: str, preds: dict) -> list[tuple]:
    """The scored parts of a fine-tuning run's ``test_predictions.npz`` (:func:`bootstrap`)."""
    s, y, w, st = preds["scores"], preds["y"], preds["y_mask"] > 0, preds["study_id"]
    if task == "age":
        return [("mae", preds["y_years"][w], s[w], st[w])]  # the caller converts y to years
    if s.ndim == 2 and y.ndim == 2:  # multilabel: one part per finding, on its regions
        return [("binary", y[w[:, j], j], s[w[:, j], j], st[w[:, j]]) for j in range(s.shape[1])]
    return [("binary", y[w], s[w, 1], st[w])] if s.shape[1] == 2 else [("multiclass", y[w], s[w], st[w])]


def frozen_parts(task: str, scores: dict, encoder: str, fraction: float) -> list[tuple]:
    """The parts of the probes' test scores of one encoder at one label fraction (first seed)."""
    key = PROBE_TASK[task]
    out = []
    for (enc, t, f), (y, s, st) in scores.items():
        if enc != encoder or f != fraction or not (t == key or (task == "findings" and t.startswith(key))):
            continue
        if task == "age":
            out.append(("mae", y, s, st))
        elif s.shape[1] == 2:
            out.append(("binary", y, s[:, 1], st))
        else:
            out.append(("multiclass", y, s, st))
    return out


def save_probe_scores(path: str, scores: dict) -> None:
    """``{(encoder, task, fraction): (y, scores, study_ids)}`` to one npz (arrays per key)."""
    flat, keys = {}, []
    for i, ((enc, task, frac), (y, s, st)) in enumerate(scores.items()):
        keys.append([enc, task, repr(float(frac))])
        flat[f"y{i}"], flat[f"s{i}"], flat[f"st{i}"] = np.asarray(y), np.asarray(s), np.asarray(st).astype(str)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, keys=np.asarray(keys, dtype=str).reshape(-1, 3), **flat)
    os.replace(tmp, path)


def load_probe_scores(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    d = np.load(path, allow_pickle=False)
    return {(str(e), str(t), float(f)): (d[f"y{i}"], d[f"s{i}"], d[f"st{i}"]) for i, (e, t, f) in enumerate(d["keys"])}


def rows_for(task: str, frozen: dict, trained: dict, fractions, *, draws: int = 500, seed: int = 0) -> list[dict]:
    """The ladder's rows of one task: ``frozen`` = the probes' test scores
    (:func:`load_probe_scores`), ``trained`` = ``{(rung, fraction): test_predictions}``."""
    encoders = sorted({k[0] for k in frozen})
    parts = {}
    for enc in encoders:
        for f in fractions:
            p = frozen_parts(task, frozen, enc, f)
            if p:
                parts[(enc, "frozen", f)] = p
    for (rung, f), preds in trained.items():
        parts[(rung, "trained", f)] = trained_parts(task, preds)
    if not parts:
        return []
    studies = np.unique(np.concatenate([np.asarray(p[3]).astype(str) for ps in parts.values() for p in ps]))
    rows = []
    for (rung, kind, f), ps in parts.items():
        b = bootstrap(ps, studies, draws=draws, seed=seed)
        rows.append({"task": task, "rung": rung, "kind": kind, "fraction": float(f), "metric": metric_of(task), **b,
                     "n_series": int(max(len(p[1]) for p in ps)), "n_studies": int(len(studies))})
    return rows
