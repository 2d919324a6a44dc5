"""Frozen-encoder evaluation of a pipeline workdir: linear probes of the stage-2, stage-1 and
randomly initialised image encoders on the metadata tasks of a prepared dataset.

    rows = probe_encoders("outputs/demo", "outputs/demo/data/prep")   # also writes eval/probes.{csv,json}

Tasks come from the records' metadata:

- attributes: body region, sequence and sex (classes seen in the training split; test rows of
  unseen classes are dropped), and age, a regression (ridge probes, MAE; rows without an age
  are dropped; one linear map per body region, :func:`regional`);
- findings (the disease probes): one binary task per finding seen in training, "finding:
  infarct", over the series of the body regions where that finding occurs in training (an
  infarct probe is fitted and scored on brain series only). An empty finding list is a normal
  study.

Probe inputs: the attributes read the mean and max pools of the patch tokens side by side; the
findings and "abnormal" read the ``"anomaly"`` pool (:mod:`decipher_jax.eval.features`): the
patch tokens weighted towards those farthest from every normal training series' patches of
the same body region and sequence. A finding fills a few patches, and the mean and max pools
carry mostly the anatomy all series share (BENCHMARKS.md, "Finding probes on the patches that
differ from normal"). Each encoder gets its own bank, from its own tokens.

Probes: logistic (ridge for age), fitted on the training split over label fractions x seeds,
all in batched calls (:mod:`decipher_jax.eval.probes`). The penalty is chosen on the val split
(patients no encoder was trained on) where it has the task, else by 3-fold CV by patient: the
strongest penalty within one standard error of the best score (a small val split's best is
partly noise). The pretrained encoders learnt from the training split's reports, which state
age, sex and the findings: their features of those series can carry the report's answer,
which CV inside the training split reads as signal and held-out patients do not have
(BENCHMARKS.md, "Stage 2 with series descriptions, centred text, held-out penalty
selection", item 4). :func:`summarise` groups the finding tasks into one score ("findings":
the mean over them), the figure a reader looks at first.
"""

from __future__ import annotations

import csv
import json
import os
import warnings

import numpy as np

from decipher_jax import layout
from decipher_jax import sharding as sh
from decipher_jax.data import pipelines as P
from decipher_jax.eval import features, probes
from decipher_jax.models.vit3d import ViTConfig
from decipher_jax.state import Model

TASKS = ("body_region", "sequence", "sex", "age", "abnormal", "findings")
REGRESSION = ("age",)  # real-valued targets: ridge probes, MAE
FINDING = "finding: "


def known(y) -> np.ndarray:
    """Rows inside a task: class ids >= 0, or finite regression targets."""
    y = np.asarray(y)
    return np.isfinite(y) & (y >= 0) if y.dtype.kind == "f" else y >= 0


def regression_inputs(splits: dict, tr_ok, te_ok, xtr, xte, xva):
    """A regression task's probe inputs ``(train, test, val)``: the features of its known rows
    crossed with the body region (:func:`regional`, the levels of the training rows), as is
    where the split holds one region or no region field. ``splits``: ``{"train", "test"[,
    "val"]}`` metadata; ``xva`` (all val rows) may be None."""
    lv = region_levels(splits["train"], tr_ok)
    if not lv:
        return xtr, xte, xva
    return (regional(xtr, splits["train"]["body_region"][tr_ok], lv), regional(xte, splits["test"]["body_region"][te_ok], lv),
            None if xva is None else regional(xva, splits["val"]["body_region"], lv))


def region_levels(train: dict, rows=slice(None)) -> tuple[str, ...]:
    """The body regions a regression probe is fitted within (:func:`regional`): those of the
    training ``rows``; () when the field is missing or holds one region (then no crossing)."""
    if "body_region" not in train:
        return ()
    levels = tuple(sorted(set(np.asarray(train["body_region"]).astype(str)[rows]) - {""}))
    return levels if len(levels) > 1 else ()


def regional(x: np.ndarray, regions, levels: tuple[str, ...]) -> np.ndarray:
    """A regression probe's input (age): the features crossed with each row's body region (one
    block per region of ``levels``, zero on other rows) beside the region's indicator, so one
    ridge fit is a linear model per region under one penalty. Age reads differently in each
    region (CSF in a brain, fatty muscle in a knee or an abdomen); a single linear map of every
    region's features read it barely below the training-mean floor even where a per-region one
    read it well (BENCHMARKS.md, "Age in the image"). The body region is in every series'
    header (DICOM BodyPartExamined), as the sequence is. ``levels`` () returns ``x``; a row of
    another region gets zeros (the training mean)."""
    if not levels:
        return x
    regions = np.asarray(regions).astype(str)
    inside = [(regions == level)[:, None] for level in levels]
    return np.concatenate([x * m for m in inside] + [m.astype(x.dtype) for m in inside], 1)


def encoders(workdir: str, mesh) -> tuple[dict, ViTConfig]:
    """``({name: (model, params)}, vit config)`` of a pipeline workdir: the stage-2 image tower,
    the stage-1 teacher (when trained) and a random init (:func:`decipher_jax.runs.encoders`)."""
    from decipher_jax import runs

    pdir = layout.PipelineDir(workdir)
    s1 = pdir.run("stage1_vision")
    encs = runs.encoders(align=pdir.run("stage2").path, mesh=mesh,
                         ssl_teacher=s1.path if os.path.isdir(s1.checkpoints) else "")
    return {e.name: (e.model, e.params) for e in encs.values()}, encs["align"].vit


def stage1_teacher(ssl_workdir: str, model: Model):
    """The EMA teacher's backbone of a ``vision_ssl`` workdir (:func:`decipher_jax.runs.ssl_teacher_params`)."""
    from decipher_jax import runs

    return runs.ssl_teacher_params(ssl_workdir, model)


def tasks(train: dict, test: dict, names=TASKS) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, train ids, test ids) per task; -1 marks a row outside the task (a class unseen in
    training, or a body region where the finding does not occur), NaN a regression row without
    a target (:func:`known`). ``names``: metadata fields, and "findings" for the per-finding
    binary tasks. Tasks without a test row are left out."""
    out = []
    for name in names:
        if name == "findings":
            out += _finding_tasks(train, test)
        elif name == "abnormal" and "findings" in train:  # any finding (NeuroBERT's triage), every series
            ytr, yte = (np.array([int(bool(finding_set(v))) for v in d["findings"]]) for d in (train, test))
            if min(np.sum(ytr == 1), np.sum(ytr == 0)) >= 2:
                out.append((name, ytr, yte))
        elif name in REGRESSION and name in train:
            ytr, yte = (np.asarray(d[name], np.float64) for d in (train, test))
            if known(ytr).sum() >= 6 and np.ptp(ytr[known(ytr)]) > 0:
                out.append((name, ytr, yte))
        elif name in train:
            ytr, yte, k = probes.metadata_labels(train[name], test[name])
            if k >= 2:
                out.append((name, ytr, yte))
    return [t for t in out if known(t[2]).any()]


def finding_set(value) -> set[str]:
    """A record's findings field ("infarct;mass", "" for a normal study) as a set."""
    return set(str(value).split(";")) - {""}


def task_order(name: str):
    """Sort key: attributes first, then the finding tasks (grouped or one by one)."""
    return name.startswith("finding"), name


def _finding_tasks(train: dict, test: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    if "findings" not in train or "body_region" not in train:
        return []
    out = []
    sets = {sp: [finding_set(v) for v in d["findings"]] for sp, d in (("train", train), ("test", test))}
    for f in sorted(set().union(*sets["train"])):
        regions = {r for r, fs in zip(train["body_region"], sets["train"]) if f in fs}
        ys = [np.where(np.isin(d["body_region"], list(regions)), [int(f in fs) for fs in sets[sp]], -1)
              for sp, d in (("train", train), ("test", test))]
        if min(np.sum(ys[0] == 1), np.sum(ys[0] == 0)) >= 2:  # both classes in training
            out.append((FINDING + f, ys[0], ys[1]))
    return out


def task_feature(task: str, feature: str, finding_feature: str | None) -> str:
    """The readout setting a task's probe reads: ``finding_feature`` (when set) for the findings
    and the "abnormal" task, ``feature`` for the attributes (region, sequence, sex, age). A
    setting may name candidates separated by "|" (:func:`readouts`)."""
    return finding_feature if finding_feature and (task == "abnormal" or task.startswith(FINDING)) else feature


def readouts(spec: str) -> list[str]:
    """The candidate features of a readout setting: ``"mean+max|anomaly"`` -> ``["mean+max",
    "anomaly"]``; each candidate is a :func:`decipher_jax.eval.features.combined` name."""
    out = [f.strip() for f in spec.split("|") if f.strip()]
    if not out:
        raise ValueError(f"probes: no feature named in the readout setting {spec!r}")
    return out


def readout_family(task: str) -> str:
    """The tasks that choose their readout together: the findings and "abnormal" (one question,
    where the encoder shows what differs from normal; each finding's val rows are few), every
    attribute alone."""
    return "findings" if task == "abnormal" or task.startswith(FINDING) else task


def select_readout(results: dict[str, list[tuple[str, list[dict], list]]]) -> dict[str, tuple[list[dict], list]]:
    """Choose each probe's readout. ``results``: per task, ``[(feature, rows, test scores), ...]``
    from :func:`sweep_readouts`, one entry per candidate readout, with one row per fraction x
    seed in the same order for every task and candidate. For each fraction and seed, and each
    :func:`readout_family`, the candidate with the lowest held-out loss pooled over the family's
    tasks wins: the mean of the tasks' selection losses at their chosen penalties (log-loss;
    MAE for ridge), each weighted by its held-out rows (``n_selection``), on the val split or by
    CV as the penalty was chosen (only the val-scored tasks when there are any). The first candidate wins a tie. Returns per task ``(rows,
    scores)``, each row with its ``feature`` (and with several candidates each candidate's
    pooled loss, ``readout_losses``).

    The readout is a hyperparameter like the penalty: which pool carries the findings depends
    on the encoder and on the corpus's scale (BENCHMARKS.md, "the ladder at 400 patients"),
    and the test split never chooses it. It is chosen per family, not per finding: the demo's
    val split holds 9-17 series per finding, too few to choose between readouts one finding at
    a time (on the default draw that choice swung stage 2's findings from 0.74 to 0.70)."""
    lengths = {len(rows) for cands in results.values() for _, rows, _ in cands}
    if len(lengths) > 1:
        raise ValueError(f"probes: the readouts' sweeps differ in length ({sorted(lengths)})")
    families: dict[str, list[str]] = {}
    for task in results:
        families.setdefault(readout_family(task), []).append(task)
    out = {}
    for members in families.values():
        names = [f for f, _, _ in results[members[0]]]
        if any([f for f, _, _ in results[t]] != names for t in members):
            raise ValueError(f"probes: the tasks {members} of one family read different candidates")
        for t in members:
            out[t] = ([], [])
        for i in range(min(lengths, default=0)):
            if len({(results[t][j][1][i]["fraction"], results[t][j][1][i]["seed"])
                    for t in members for j in range(len(names))}) != 1:
                raise ValueError("probes: the readouts' sweeps are not in the same (fraction, seed) order")
            # A member whose val split lacks a class chose its penalty by CV on training rows: a
            # loss on another scale (and optimistic for a pretrained encoder); left out of the
            # pool when any member was scored on val.
            on_val = [t for t in members if results[t][0][1][i].get("selection") == "val"]
            pool = on_val or members
            loss = []
            for j in range(len(names)):  # the family's held-out loss, row-weighted over its tasks
                num = den = 0.0
                for t in pool:
                    r = results[t][j][1][i]
                    v, n = r["cv_mae"] if "cv_mae" in r else r["cv_log_loss"], r.get("n_selection", 1)
                    if n and np.isfinite(v):
                        num, den = num + v * n, den + n
                loss.append(num / den if den else np.inf)
            best = int(np.argmin(loss))  # the first of equal losses
            for t in members:
                row = dict(results[t][best][1][i], feature=names[best])
                if len(names) > 1:  # (None: no held-out row scored)
                    row["readout_losses"] = {f: float(v) if np.isfinite(v) else None for f, v in zip(names, loss)}
                out[t][0].append(row)
                out[t][1].append(results[t][best][2][i])
    return {t: out[t] for t in results}


def readout_choices(rows: list[dict]) -> dict[str, dict[str, int]]:
    """``{encoder: {feature: probes}}``: how often each encoder's probes chose each candidate
    readout, over the probe rows that had candidates (``readout_losses``)."""
    out: dict = {}
    for r in rows:
        if len(r.get("readout_losses", ())) > 1:
            c = out.setdefault(r["encoder"], {f: 0 for f in r["readout_losses"]})
            c[r["feature"]] = c.get(r["feature"], 0) + 1
    return out


def sweep_readouts(feats: dict, tname: str, ytr, yte, spec: str, *, yva=None, fractions=(1.0,), seeds=(0,),
                   train_rows=None) -> list[tuple[str, list[dict], list]]:
    """One task's probes (logistic; ridge within each body region for age) on each candidate
    readout of ``spec``: fitted on the training rows with a known label, scored on the test rows
    with one, the penalty chosen on the val targets ``yva`` when given, else by CV by patient.
    ``train_rows``: fit only these known-label rows (a cross-group test). Returns ``[(feature,
    rows, test scores), ...]``, a row per fraction x seed; :func:`select_readout` chooses."""
    tr_ok, te_ok = known(ytr), known(yte)  # rows with a known label, one task at a time
    cv = cv_groups(feats["train"], tr_ok)  # label subsets (and CV folds) by patient
    results = []
    for tf in readouts(spec):
        xtr, xte = feats["train"][tf][tr_ok], feats["test"][tf][te_ok]
        xva = feats["val"][tf] if yva is not None else None
        if tname in REGRESSION:
            xtr, xte, xva = regression_inputs(feats, tr_ok, te_ok, xtr, xte, xva)  # a linear map per region
            res, sc = probes.ridge_sweep(xtr, xte, tname, ytr[tr_ok], yte[te_ok], fractions=fractions, seeds=seeds,
                                         return_scores=True, cv_groups=cv, val_x=xva, val_y=yva,
                                         train_rows=train_rows)
        else:
            res, sc = probes.logistic_sweep(xtr, xte, [probes.Task(tname, ytr[tr_ok], yte[te_ok], yva)],
                                            fractions=fractions, seeds=seeds, iters=100, return_scores=True,
                                            cv_groups=cv, val_x=xva, train_rows=train_rows)
        results.append((tf, res, sc))
    return results


def probe_encoders(workdir: str, prep_dir: str, *, fractions=(0.1, 0.3, 1.0), seeds=(0, 1, 2), mesh=None,
                   feature: str = "mean+max", finding_feature: str | None = "mean+max|anomaly",
                   encs: tuple[dict, ViTConfig] | None = None) -> list[dict]:
    """``encs``: the output of :func:`encoders` when the caller already holds it. ``feature``:
    the attributes' probe input, ``finding_feature`` the findings' and "abnormal"'s (None: also
    ``feature``). Either may name candidates ("mean+max|anomaly"), chosen with the penalty per
    encoder, fraction and seed on the val split, the findings and "abnormal" together
    (:func:`select_readout`); a name with
    ``anomaly`` pools by the distance to each encoder's bank of normal training series
    (:func:`decipher_jax.eval.features.normal_bank`)."""
    mesh = mesh or sh.make_mesh({"data": -1})
    encs, vit = encs or encoders(workdir, mesh)
    rows, preds, scores, cross = [], {}, {}, []
    pdir = layout.PipelineDir(workdir)
    out_dir = pdir.eval
    sources = split_sources(prep_dir)
    has_anomaly = lambda spec: any("anomaly" in f.split("+") for f in readouts(spec))  # noqa: E731
    normal_rows = None  # the training split's series without findings: every encoder's bank, read once
    if finding_feature and has_anomaly(finding_feature) and not has_anomaly(feature):
        from decipher_jax.eval import localisation

        normal_rows = localisation.normal_index(sources["train"])
        if len(normal_rows) < 2:
            rest = "|".join(f for f in readouts(finding_feature) if "anomaly" not in f.split("+")) or None
            warnings.warn(f"probes: {len(normal_rows)} training series without findings, 2 needed for the anomaly "
                          f"pool's bank; the findings read {rest or feature!r}")
            finding_feature = rest
    used = set(readouts(feature)) | (set(readouts(finding_feature)) if finding_feature else set())
    anomaly = any("anomaly" in f.split("+") for f in used)
    for name, (model, params) in encs.items():
        tag = "_".join(name.split(" ")[:2])  # "stage_2", "stage_1", "random_init"
        bank = features.normal_bank(model, params, sources["train"], mesh, size=vit.img_size,
                                    patch_size=vit.patch_size, rows=normal_rows) if anomaly else None
        feats = {}
        for split, source in sources.items():
            feats[split] = features.extract(model, params, source, mesh, size=vit.img_size, bank=bank,
                                            out_dir=os.path.join(pdir.features, tag, split))
        for split in feats:  # "mean+max": the named vectors side by side
            for f in used:
                feats[split][f] = features.combined(feats[split], f)
        held = val_targets(feats["train"], feats.get("val"))
        found = {tname: (ytr, yte) for tname, ytr, yte in tasks(feats["train"], feats["test"])}
        chosen = select_readout({t: sweep_readouts(feats, t, ytr, yte, task_feature(t, feature, finding_feature),
                                                   yva=held.get(t), fractions=fractions, seeds=seeds)
                                 for t, (ytr, yte) in found.items()})
        for tname, (ytr, yte) in found.items():
            res, sc = chosen[tname]
            te_ok = known(yte)
            rows += [{"encoder": name, **r} for r in res]
            for f in fractions:  # every fraction's first seed: the ladder's frozen rungs
                i = [i for i, r in enumerate(res) if r["fraction"] == f][0]
                scores[(name, tname, float(f))] = (yte[te_ok], sc[i], feats["test"]["study_id"][te_ok])
            preds[(name, tname)] = scores[(name, tname, float(max(fractions)))]  # all labels: the comparison
        cross += [{"encoder": name, **r} for r in cross_group(feats, held, feature=feature, finding_feature=finding_feature)]
    os.makedirs(out_dir, exist_ok=True)
    with open(pdir.result(CROSS_RESULT), "w") as f:
        json.dump(cross, f, indent=1)
    from decipher_jax.eval import ladder

    ladder.save_probe_scores(os.path.join(pdir.arrays("probes"), ladder.PROBE_SCORES), scores)
    with open(pdir.result("probes"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, "probes.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # ridge rows differ
        w.writeheader()
        w.writerows(rows)
    names = list(encs)
    if len(names) >= 2 and "random init" in names:  # each pretrained encoder against random init
        cmp = [c for a in names if a != "random init" for c in compare(preds, a, "random init")]
        with open(pdir.result("compare"), "w") as f:
            json.dump(cmp, f, indent=1)
    return rows


CROSS_RESULT = "cross_sex"  # eval/cross_sex.json


def cross_group(feats: dict, held: dict, *, group: str = "sex", feature: str = "mean", finding_feature: str | None = None,
                names=TASKS) -> list[dict]:
    """Probes fitted on one group's training series only (one sex) and scored on each group's
    test series: the paper's cross-sex robustness test. One row per (task, fitted on, scored
    on) with the score (AUROC; minus the MAE for age) and the row counts; a task is left out for
    a group whose training rows lack a class, and a score where the test rows lack one. All
    labels, seed 0, the penalty (and readout: :func:`select_readout`) chosen on the fitted
    group's val rows (else CV inside it). Features are standardised over all training rows, labels unseen: as the full probes."""
    train, test = feats["train"], feats["test"]
    if group not in train:
        return []
    gtr, gte = (np.asarray(d[group]).astype(str) for d in (train, test))
    levels = sorted((set(gtr) & set(gte)) - {""})
    if len(levels) != 2:
        return []
    gva = np.asarray(feats["val"][group]).astype(str) if "val" in feats else None
    out = []
    found = {tname: (ytr, yte) for tname, ytr, yte in tasks(train, test, tuple(n for n in names if n != group))}
    for fit in levels:
        results, fitted = {}, {}
        for tname, (ytr, yte) in found.items():
            rows = gtr[known(ytr)] == fit
            y_fit = ytr[known(ytr)][rows]
            yva = held.get(tname)
            if tname in REGRESSION:
                if rows.sum() < 6:
                    continue
                va = None if yva is None else np.where(gva == fit, yva, np.nan)
            else:
                if len(np.unique(y_fit)) < 2 or min(np.bincount(y_fit)[np.unique(y_fit)]) < 2:
                    continue
                va = None if yva is None else np.where(gva == fit, yva, -1)
            results[tname] = sweep_readouts(feats, tname, ytr, yte, task_feature(tname, feature, finding_feature),
                                            yva=va, train_rows=rows)
            fitted[tname] = int(rows.sum())
        for tname, ((r,), (s,)) in select_readout(results).items():
            yte = found[tname][1]
            for on in levels:
                sel = gte[known(yte)] == on
                y_on = yte[known(yte)][sel]
                if tname not in REGRESSION and len(np.unique(y_on)) < 2:
                    continue
                out.append({"task": tname, "fit_on": fit, "score_on": on, "score": float(_score(tname, y_on, s[sel])),
                            "metric": "-MAE" if tname in REGRESSION else "AUROC", "n_train": fitted[tname],
                            "n_test": int(sel.sum()), "feature": r["feature"]})
    return out


def cross_summary(rows: list[dict]) -> list[dict]:
    """Per (encoder, task group): the mean score fitted and scored on the same group, on the
    other group, and their gap (same minus cross). The finding tasks pool as "findings"."""
    cells: dict = {}
    for r in rows:
        key = (r["encoder"], "findings" if r["task"].startswith(FINDING) else r["task"])
        cells.setdefault(key, {"same": [], "cross": []})["same" if r["fit_on"] == r["score_on"] else "cross"].append(
            r["score"])
    out = []
    for (enc, task), c in cells.items():
        if c["same"] and c["cross"]:
            same, cross = float(np.mean(c["same"])), float(np.mean(c["cross"]))
            out.append({"encoder": enc, "task": task, "same": same, "cross": cross, "gap": same - cross,
                        "n": len(c["same"]) + len(c["cross"])})
    return out


def split_sources(prep_dir: str, splits=("train", "val", "test"), optional=("val",)) -> dict:
    """``{split: data source}`` of a prepared dataset; an ``optional`` split it lacks is left out
    (a corpus prepared without a val split), any other raises."""
    out = {}
    for split in splits:
        try:
            out[split] = P.data_source(prep_dir, split)
        except (KeyError, ValueError, FileNotFoundError):
            if split not in optional:
                raise
    return out


def val_targets(train: dict, val: dict | None, names=TASKS) -> dict[str, np.ndarray]:
    """Per task, the val split's targets (class ids, -1 outside the task; or values, NaN) where
    the val split can choose the task's penalty; ``{}`` without a val split."""
    if not val:
        return {}
    return {t: y for t, _, y in tasks(train, val, names) if _selectable(t, y)}


def _selectable(task: str, y_val) -> bool:
    """Whether the val split can choose a task's penalty: 4+ rows with a target, or for a
    classification 2+ classes among its rows."""
    ok = known(y_val)
    if task in REGRESSION:
        return int(ok.sum()) >= 4
    return len(np.unique(np.asarray(y_val)[ok])) >= 2


def cv_groups(meta: dict, rows=slice(None)):
    """The id that each of ``rows`` draws its CV fold by: its patient (a patient's studies share
    age and sex), else its study; None (row-wise folds) when neither is known for every row."""
    for k in ("patient_id", "study_id"):
        ids = np.asarray(meta[k]).astype(str)[rows] if k in meta else None
        if ids is not None and all(ids):
            return ids
    return None


def _score(task: str, y, s) -> float:
    """Higher is better: AUROC (binary or one-vs-rest macro), or minus the MAE (regression)."""
    if task in REGRESSION:
        return -probes.mae(s, y)
    return probes.auroc(s[:, 1], y) if s.shape[1] == 2 else probes.macro_auroc(s, y, s.shape[1])


def compare(preds: dict, a: str, b: str, *, draws: int = 1000, seed: int = 0, level: float = 0.95) -> list[dict]:
    """Encoder ``a`` against ``b`` on the same test rows: per task the gain (AUROC of a minus
    AUROC of b; for regression, MAE of b minus MAE of a, so positive always means a is
    better), with a paired bootstrap over *studies* (the series of one study move together,
    as they share a patient and a report): the ``level`` interval and the fraction of draws in
    which a is not better. The finding tasks are also grouped into the mean gain ("findings
    (K)"), resampled jointly. ``preds``: ``{(encoder, task): (y, scores, study_ids)}``."""
    tasks_ = [t for (e, t) in preds if e == a and (b, t) in preds]
    studies = np.unique(np.concatenate([np.asarray(preds[(a, t)][2]).astype(str) for t in tasks_])) if tasks_ else []
    index = {s: i for i, s in enumerate(studies)}
    rng = np.random.default_rng(seed)
    counts = [np.bincount(rng.integers(0, len(studies), len(studies)), minlength=len(studies)) for _ in range(draws)]
    gains, full = {}, {}
    for t in tasks_:
        (y, sa, st), (yb, sb, _) = preds[(a, t)], preds[(b, t)]
        if len(y) != len(yb) or not np.array_equal(y, yb):
            raise ValueError(f"task {t!r}: encoders {a!r} and {b!r} were scored on different test rows")
        si = np.array([index[s] for s in np.asarray(st).astype(str)])
        full[t] = _score(t, y, sa) - _score(t, y, sb)
        g = []
        for c in counts:
            idx = np.repeat(np.arange(len(y)), c[si])
            g.append(_score(t, y[idx], sa[idx]) - _score(t, y[idx], sb[idx]) if len(idx) else np.nan)
        gains[t] = np.asarray(g)
    finding = [t for t in tasks_ if t.startswith(FINDING)]
    if finding:
        name = f"findings ({len(finding)})"
        with np.errstate(all="ignore"):
            full[name] = float(np.nanmean([full[t] for t in finding]))
            gains[name] = np.nanmean(np.stack([gains[t] for t in finding]), 0)
    out = []
    q = (1 - level) / 2
    for t in sorted(gains, key=task_order):
        g = gains[t][np.isfinite(gains[t])]
        rows_t = len(preds[(a, t)][0]) if (a, t) in preds else sum(len(preds[(a, f)][0]) for f in finding)
        out.append({"a": a, "b": b, "task": t, "metric": "MAE" if t in REGRESSION else "AUROC",
                    "gain": float(full[t]), "lo": float(np.quantile(g, q)) if len(g) else float("nan"),
                    "hi": float(np.quantile(g, 1 - q)) if len(g) else float("nan"),
                    "p_not_better": float(np.mean(g <= 0)) if len(g) else float("nan"),
                    "n_test": int(rows_t), "n_studies": len(studies), "draws": draws})
    return out


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
