"""Fine-tuning the 3D ViT end to end on one supervised task (and, from random init, the
supervised reference every frozen encoder is measured against).

    decipher train --config experiments/configs/finetune.py:findings,tiny --workdir W --config.init=RUN
    decipher train --config experiments/configs/finetune.py:sex,tiny --workdir W --config.init=   # from scratch

Tasks (``task``) come from the records' metadata as the probes read them
(:mod:`decipher_jax.eval.suite`): ``findings`` (multi-label: one logit per finding seen in
training, each scored only on the body regions where it occurs in training), ``abnormal`` (any
finding), ``body_region`` / ``sequence`` / ``sex`` (one class each; a class unseen in training
is left out) and ``age`` (regression on the training split's standardised age; MAE in years).

``init``: a ``vision_ssl`` workdir (its EMA teacher's backbone), a ``clip_align`` workdir (its
image tower) or "" (random init). The backbone learns with layer-wise lr decay
(``optim.layer_decay``; 0 turns it off) and may stay frozen for ``optim.freeze_backbone_steps`` steps (its
parameters bitwise unchanged: the head first, then everything). From a pretrained run the
settings of ``optim.pretrained`` replace the others (its ``lr_rules`` add to them): with the
anomaly pool (below) LP-FT, the backbone frozen for half the steps and then at 0.1x the head's
lr, the supervised reference from random init keeping the full lr throughout. With
``model.head_init="probe"`` (and an ``init`` run) the head starts as the probes' linear probe of
the initial features (:func:`fit_head`), scored on val as step 0. Training crops are random
resized crops with flips and intensity jitter; evaluation resizes the whole volume, as the
probes' features do. ``data.label_fraction`` draws that fraction of the training *patients*
(``data.label_seed``), as the probes' label subsets. Every ``eval.every`` steps the val split
is scored; the best step's parameters are kept in ``best/`` and the run stops after
``eval.patience`` evaluations without improvement. At the end the best parameters are scored
on the test split (``test.json``, with per-series predictions in ``test_predictions.npz``).

With ``"anomaly"`` in ``model.pool`` the head also reads the probes' anomaly pool of the findings
(:class:`decipher_jax.models.classifier.Classifier`): the patch tokens weighted towards those
far from a bank of the training split's normal series, the bank being the *initial* encoder's
tokens (:func:`fill_bank`; it never trains) and every batch carrying each series' group and
patient among the bank's (:class:`BankIndex`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np

from decipher_jax import checkpoint as ckpt
from decipher_jax import optim, runs, runspec
from decipher_jax.data import pipelines as P
from decipher_jax.models.classifier import DEFAULT_POOL, Classifier
from decipher_jax.models.vit3d import ViTConfig
from decipher_jax.trainers import common

TASKS = ("findings", "abnormal", "body_region", "sequence", "sex", "age")
META = ("patient_id", "study_id", "series_id", "body_region", "sequence", "sex", "age", "findings")


# -- the task ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What the head predicts, fixed from the training split (and written in the run spec)."""

    task: str
    kind: str  # "multilabel", "multiclass" or "regression"
    names: tuple[str, ...]  # the findings (multilabel), the classes (multiclass), (task,) (regression)
    regions: tuple[tuple[str, ...], ...] = ()  # per finding: the body regions where it is scored
    mean: float = 0.0  # regression: the training targets' mean and std
    std: float = 1.0

    @property
    def n_out(self) -> int:
        return len(self.names)


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def read_meta(source) -> dict[str, np.ndarray]:
    """The metadata columns of every record of ``source`` (one pass; the volumes are not decoded)."""
    rows = {k: [] for k in META}
    for i in range(len(source)):
        ex = source[i]
        for k in META:
            rows[k].append(float(ex[k]) if k == "age" else _text(ex.get(k, "")))
    return {k: np.asarray(v, np.float64 if k == "age" else object) for k, v in rows.items()}


def _findings(value) -> set[str]:
    return set(str(value).split(";")) - {""}


def task_spec(task: str, meta: dict) -> TaskSpec:
    """The task as the training split defines it (the findings, the classes, the age scale)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")
    if task == "findings":
        sets = [_findings(v) for v in meta["findings"]]
        names = tuple(sorted(set().union(*sets)))
        if not names:
            raise ValueError("no findings in the training split")
        regions = tuple(tuple(sorted({r for r, s in zip(meta["body_region"], sets) if f in s})) for f in names)
        return TaskSpec(task, "multilabel", names, regions)
    if task == "abnormal":
        return TaskSpec(task, "multilabel", ("abnormal",), ((),))  # () = every region
    if task == "age":
        age = meta["age"][np.isfinite(meta["age"])]
        if len(age) < 2:
            raise ValueError("fewer than two training series with an age")
        return TaskSpec(task, "regression", ("age",), mean=float(age.mean()), std=float(age.std() + 1e-6))
    classes = tuple(sorted({str(v) for v in meta[task]} - {""}))
    if len(classes) < 2:
        raise ValueError(f"task {task!r}: fewer than two classes in the training split ({classes})")
    return TaskSpec(task, "multiclass", classes)


def targets(spec: TaskSpec, meta_row: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(y, y_mask)`` of one series: float vectors of length ``n_out`` (multilabel), else a
    class id / standardised target and a 0-1 weight (0: the series is outside the task)."""
    if spec.kind == "multilabel":
        fs, region = _findings(meta_row["findings"]), str(meta_row["body_region"])
        if spec.task == "abnormal":
            return np.array([float(bool(fs))], np.float32), np.ones(1, np.float32)
        y = np.array([float(f in fs) for f in spec.names], np.float32)
        return y, np.array([float(region in r) for r in spec.regions], np.float32)
    if spec.kind == "regression":
        a = float(meta_row["age"])
        ok = np.isfinite(a)
        return np.float32((a - spec.mean) / spec.std if ok else 0.0), np.float32(ok)
    v = str(meta_row[spec.task])
    return np.int32(spec.names.index(v) if v in spec.names else -1), np.float32(v in spec.names)


@dataclasses.dataclass(frozen=True)
class BankIndex:
    """The anomaly pool's normal bank (``"anomaly"`` in ``model.pool``): its rows of the training
    split (:func:`decipher_jax.eval.localisation.normal_index`), and the small integers a batch
    carries for each series: its group (body region / sequence) and patient among the bank's."""

    rows: tuple[int, ...]
    groups: tuple[str, ...]  # per bank row
    patients: tuple[str, ...]  # per bank row: its patient (or "series:<id>" without one)

    @classmethod
    def of(cls, meta: dict, rows) -> BankIndex:
        from decipher_jax.eval import localisation

        rows = tuple(int(i) for i in rows)
        sub = {k: np.asarray(meta[k])[list(rows)] for k in ("body_region", "sequence", "patient_id", "series_id")}
        return cls(rows, tuple(localisation.groups_of(sub).tolist()),
                   tuple(_patient_key(p, s) for p, s in zip(sub["patient_id"], sub["series_id"])))

    @functools.cached_property
    def _ids(self) -> tuple[dict[str, int], dict[str, int]]:
        return ({g: i for i, g in enumerate(sorted(set(self.groups)))},
                {p: i for i, p in enumerate(sorted(set(self.patients) - {""}))})

    def keys(self, meta_row: dict) -> dict[str, np.int32]:
        """A series' ``bank_group`` / ``bank_patient`` (-1: none of the bank's)."""
        from decipher_jax.eval import localisation

        gid, pid = self._ids
        g = localisation.group_of(str(meta_row["body_region"]), str(meta_row["sequence"]))
        p = _patient_key(meta_row["patient_id"], meta_row.get("series_id", ""))
        return {"bank_group": np.int32(gid.get(g, -1)), "bank_patient": np.int32(pid.get(p, -1))}

    def arrays(self) -> dict[str, np.ndarray]:
        """The bank rows' own group and patient integers (``bank_group`` / ``bank_patient`` params)."""
        gid, pid = self._ids
        return {"bank_group": np.array([gid[g] for g in self.groups], np.float32),
                "bank_patient": np.array([pid.get(p, -1) for p in self.patients], np.float32)}


BANK_KEYS = ("bank_group", "bank_patient")


def _patient_key(patient_id, series_id) -> str:
    """Whom a series is never compared with: its patient, or without a patient id the series
    itself (a training series in the bank must not find itself)."""
    p, s = str(patient_id), str(series_id)
    return p if p else (f"series:{s}" if s else "")


@dataclasses.dataclass
class Targets(grain.transforms.Map):
    """Adds ``y`` / ``y_mask`` (:func:`targets`) to a decoded record, and with a ``bank`` the
    record's ``bank_group`` / ``bank_patient`` (:class:`BankIndex`)."""

    spec: TaskSpec
    bank: BankIndex | None = None

    def map(self, ex):
        meta = {k: _text(ex.get(k, "")) if k != "age" else ex.get("age", np.nan) for k in META}
        y, w = targets(self.spec, meta)
        return {**ex, "y": y, "y_mask": w, **(self.bank.keys(meta) if self.bank else {})}


def loss(spec: TaskSpec, out, y, w):
    """Masked BCE (per finding), cross-entropy or MSE (standardised target), over ``w`` > 0."""
    out = out.astype(jnp.float32)
    if spec.kind == "multilabel":
        per = jnp.maximum(out, 0) - out * y + jnp.log1p(jnp.exp(-jnp.abs(out)))
    elif spec.kind == "regression":
        per = jnp.square(out[:, 0] - y)
    else:
        per = -jnp.take_along_axis(jax.nn.log_softmax(out), jnp.maximum(y, 0)[:, None], axis=1)[:, 0]
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def scores_of(spec: TaskSpec, out):
    """Probabilities (per finding, or per class) or the prediction in years."""
    out = out.astype(jnp.float32)
    if spec.kind == "multilabel":
        return jax.nn.sigmoid(out)
    if spec.kind == "regression":
        return out[:, 0] * spec.std + spec.mean
    return jax.nn.softmax(out)


def score(spec: TaskSpec, scores, y, w) -> dict:
    """Held-out metrics: mean AUROC over the findings (each on its regions), macro AUROC over
    the classes, MAE in years; ``score`` is the one to maximise (-MAE for age)."""
    from decipher_jax.eval import probes

    scores, y, w = np.asarray(scores), np.asarray(y), np.asarray(w) > 0
    if spec.kind == "multilabel":
        per = {n: probes.auroc(scores[w[:, j], j], y[w[:, j], j]) for j, n in enumerate(spec.names)}
        vals = [v for v in per.values() if np.isfinite(v)]
        mean = float(np.mean(vals)) if vals else float("nan")
        return {"score": mean, "auroc": mean, "per_finding": per, "n": int(w.any(1).sum())}
    if spec.kind == "regression":
        mae = probes.mae(scores[w], y[w] * spec.std + spec.mean) if w.any() else float("nan")
        return {"score": -mae, "mae": mae, "n": int(w.sum())}
    auc = probes.macro_auroc(scores[w], y[w], spec.n_out) if w.any() else float("nan")
    acc = float(np.mean(scores[w].argmax(1) == y[w])) if w.any() else float("nan")
    return {"score": auc, "auroc": auc, "accuracy": acc, "n": int(w.sum())}


# -- the model (decipher_jax.models.classifier) -----------------------------------------------------

def vit_config(cfg) -> ViTConfig:
    """The init run's ViT (its run spec), else ``model.vit``; ``model.vit_overrides`` on top."""
    d = dict(cfg.model.vit)
    if cfg.init:
        spec = runs.read_spec(cfg.init)
        d = spec.get("vit") or spec["config"]["model"]["vit"]
    d.update(dict(cfg.model.get("vit_overrides", {})))
    return ViTConfig(**runs.from_json(d))


def init_kind(workdir: str) -> str:
    kind = runs.read_spec(workdir).get("kind", "")
    if kind not in ("vision_ssl", "clip_align"):
        raise ValueError(f"init={workdir}: a {kind or 'pre-schema'} run; fine-tuning starts from a vision_ssl "
                         f"or clip_align run (or \"\" for random init)")
    return kind


def backbone_params(workdir: str, shapes, shardings) -> tuple[dict, str]:
    """The pretrained backbone of an init run, on ``shardings``; and where it came from."""
    kind = init_kind(workdir)
    target = common.abstract(shapes, shardings)
    sub = {"teacher": {"backbone": target}} if kind == "vision_ssl" else {"params": {"image": target}}
    step, part = ckpt.restore_subtree(os.path.join(workdir, "checkpoints"), sub)
    if kind == "vision_ssl":
        return part["teacher"]["backbone"], f"{workdir} (stage-1 EMA teacher, step {step})"
    return part["params"]["image"], f"{workdir} (stage-2 image tower, step {step})"


def predict(fn, params, source, spec, size, mesh, batch_size: int, max_series: int | None = None,
            bank: BankIndex | None = None) -> dict:
    """``{"out": fn(params, batch), "y", "y_mask", ids}`` over ``source`` in order (the first
    ``max_series`` rows when given), whole volumes resized to ``size``, through the evaluations'
    split scan (:func:`decipher_jax.eval.embed.scan_split`: padded, every host in step). ``batch``
    holds ``image`` (and with ``bank`` the :data:`BANK_KEYS`)."""
    from decipher_jax.data import transforms as T
    from decipher_jax.eval import embed

    if max_series is not None and max_series < len(source):
        source = P.Subset(source, np.arange(max_series))
    batches = embed.scan_split(source, [T.Decode(), Targets(spec, bank), T.Resize(tuple(size))],
                               embed.round_batch(batch_size, mesh))
    keys = ("image", *(BANK_KEYS if bank else ()))
    return embed.apply(lambda g: {"out": fn(params, g)}, batches, mesh, keys,
                       meta_keys=("y", "y_mask", "series_id", "study_id", "patient_id"))


def apply(model, params, batch, *, features: bool = False, **kw):
    """The classifier's output on a batch (with ``features`` its pooled features), its bank keys
    passed on when it has them."""
    m = model(params)
    return (m.features if features else m)(batch["image"], group=batch.get("bank_group"),
                                           patient=batch.get("bank_patient"), **kw)


def _put(model, params, **arrays) -> dict:
    """``params`` with ``arrays`` (float32) placed on their parameters' shardings."""
    return {**params, **{k: jax.device_put(np.asarray(v, np.float32), model.shardings[k]) for k, v in arrays.items()}}


def set_feature_stats(cfg, spec, model, params, source, size, mesh, max_series: int = 256,
                      bank: BankIndex | None = None) -> dict:
    """``params`` with ``feat_mean`` / ``feat_scale`` from the pooled features of (up to
    ``max_series``) training volumes, whole-volume resized as in evaluation."""
    feats = jax.jit(lambda p, b: apply(model, p, b, features=True))
    f = predict(feats, params, source, spec, size, mesh, cfg.eval.batch_size, max_series, bank)["out"].astype(np.float64)
    mean, scale = f.mean(0), 1.0 / (f.std(0) + 1e-6)
    return _put(model, params, feat_mean=mean, feat_scale=scale)


HEAD_INIT = ("random", "probe")
INV_REGS = tuple(10.0 ** np.arange(-3, 3))  # the probes' grid of C (eval.probes.logistic_sweep)
LAMS = tuple(10.0 ** np.arange(-1, 7))  # and of the ridge penalty (eval.probes.ridge_sweep)


def fit_head(cfg, spec, model, params, source, rows, size, mesh, bank: BankIndex | None = None) -> tuple[dict, dict]:
    """``params`` with the head fitted as the probes fit theirs, on the initial encoder's
    standardised features of the labelled training rows (LP-FT's linear probe, Kumar et al.
    2022): a logistic probe per finding (the 2-class probe's logit difference; each finding on
    its regions' rows), a multinomial one for a class, ridge regression on the standardised age;
    the penalty from the probes' grids, one for all outputs, chosen on the val split (pooled
    held-out log-likelihood or MAE, glmnet's one-standard-error rule), C = 1 without a val split.
    Returns the params and what was fitted (``penalty``: C, or the ridge penalty; ``on``: "val"
    or "default"; ``n``: the training series)."""
    from decipher_jax.eval import evaluators, probes

    feats = jax.jit(lambda p, b: (apply(model, p, b, features=True) - p["feat_mean"]) * p["feat_scale"])
    tr = predict(feats, params, P.Subset(source, rows), spec, size, mesh, cfg.eval.batch_size, bank=bank)
    try:
        va = predict(feats, params, evaluators.open_split(cfg.data.dir, "val"), spec, size, mesh, cfg.eval.batch_size,
                     bank=bank)
    except evaluators.MissingSplit:
        va = None
    x, y, w = (np.asarray(tr[k]) for k in ("out", "y", "y_mask"))
    if spec.kind == "regression":
        lams = LAMS if va is not None else (1.0,)
        fits = [probes.fit_ridge(jnp.asarray(x), jnp.asarray(y[:, None]), jnp.asarray(w), lam) for lam in lams]
        errs = [[0.0]] if va is None else [
            list(np.abs(np.asarray(va["out"]) @ np.asarray(f["w"])[:, 0] + float(f["b"][0]) - va["y"])[va["y_mask"] > 0]
                 * spec.std) for f in fits]
        best = probes._choose([errs], higher_better=False, one_se=True, strongest_first=False)[1][0]
        kernel, bias, penalty = np.asarray(fits[best]["w"]), np.asarray(fits[best]["b"]), lams[best]
    else:
        # One probe per output (a finding: two classes on its rows) or one multinomial probe.
        if spec.kind == "multilabel":
            ys, ws, k = y.T.astype(np.int32), w.T, 2
        else:
            ys, ws, k = np.maximum(y, 0).astype(np.int32)[None], w[None], spec.n_out
        inv = INV_REGS if va is not None else (1.0,)
        n_out = len(ys)
        fit = probes.fit_many(x, np.repeat(ys, len(inv), 0), np.repeat(ws, len(inv), 0),
                              np.tile(np.asarray(inv), n_out), np.ones((n_out * len(inv), k), bool))
        wk = np.asarray(fit["w"]).reshape(n_out, len(inv), x.shape[1], k)
        bk = np.asarray(fit["b"]).reshape(n_out, len(inv), k)
        best = 0
        if va is not None:
            xv, yv, wv = (np.asarray(va[kk]) for kk in ("out", "y", "y_mask"))
            yv = yv.T.astype(np.int32) if spec.kind == "multilabel" else np.maximum(yv, 0).astype(np.int32)[None]
            wv = wv.T if spec.kind == "multilabel" else wv[None]
            loglik = [[] for _ in inv]
            for o in range(n_out):
                for c in range(len(inv)):
                    lg = xv @ wk[o, c] + bk[o, c]
                    lp = lg - lg.max(1, keepdims=True)
                    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
                    loglik[c] += list(lp[np.arange(len(lg)), yv[o]][wv[o] > 0])
            best = int(probes._choose([loglik], higher_better=True, one_se=True, strongest_first=True)[1][0])
        if spec.kind == "multilabel":  # the sigmoid of the 2-class probe's logit difference
            kernel = (wk[:, best, :, 1] - wk[:, best, :, 0]).T
            bias = bk[:, best, 1] - bk[:, best, 0]
        else:
            kernel, bias = wk[0, best], bk[0, best]
        penalty = inv[best]
    info = {"penalty": float(penalty), "on": "val" if va is not None else "default", "n": len(x)}
    return _put(model, params, head_kernel=kernel, head_bias=bias), info


def fill_bank(cfg, spec, model, params, source, bank: BankIndex, vit: ViTConfig, mesh) -> dict:
    """``params`` with the anomaly pool's bank: the patch tokens of the bank's training series
    under ``params``' backbone (the initial encoder), their groups and patients, and tau, the
    bank's own spread of distances (:class:`decipher_jax.eval.features.NormalBank`, as the
    probes' anomaly pool)."""
    from decipher_jax.eval import features

    tokens = predict(jax.jit(lambda p, b: model(p).backbone(b["image"])["patch"].astype(jnp.float32)), params,
                     P.Subset(source, np.asarray(bank.rows)), spec, tuple(vit.img_size), mesh, cfg.eval.batch_size)["out"]
    grid = tuple(int(s) // int(p) for s, p in zip(vit.img_size, vit.patch_size))
    tau = features.NormalBank.build(tokens, np.asarray(bank.groups), np.arange(len(tokens)).astype(str), grid,
                                    patient_id=np.asarray(bank.patients)).tau
    return _put(model, params, bank_tokens=tokens, bank_tau=tau, **bank.arrays())


# -- the step ------------------------------------------------------------------------------------

def make_step(cfg, spec: TaskSpec, model: common.Model, tx):
    seed_key = jax.random.key(cfg.seed + 1)

    def step(state, batch):
        key = jax.random.fold_in(seed_key, state["step"])

        def loss_fn(params):
            out = apply(model, params, batch, drop_path=cfg.model.drop_path, key=key)
            return loss(spec, out, batch["y"], batch["y_mask"])

        value, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        new, guard = common.guard_update(value, {"step": state["step"] + 1, "params": params, "opt": opt}, state,
                                         params=state["params"], new_params=params,
                                         max_update_ratio=cfg.guard_update_ratio)
        return new, {"loss": value, **guard, "grad_norm": common.tree_norm(grads),
                     "grad_norm_head": common.tree_norm({k: v for k, v in grads.items() if k != "backbone"}),
                     **optim.current_hparams(opt)}

    return step


# -- data ----------------------------------------------------------------------------------------

def label_indices(meta: dict, fraction: float, seed: int) -> np.ndarray:
    """The training rows of ``fraction`` of the patients (stratified so each class of the
    'any finding' indicator keeps a patient), as the probes' label subsets."""
    from decipher_jax.eval import probes

    if fraction >= 1.0:
        return np.arange(len(meta["patient_id"]))
    strata = np.array([int(bool(_findings(v))) for v in meta["findings"]])
    keep = probes.subset_mask(strata, fraction, seed, groups=meta["patient_id"].astype(str))
    return np.flatnonzero(keep)


# -- the trainer ---------------------------------------------------------------------------------

def setup(cfg, mesh) -> common.Setup:
    """The fine-tuner on ``mesh``. Reads the training split's metadata (the task's classes); no
    weights until ``init``."""
    train_src = P.data_source(cfg.data.dir, "train")
    meta = read_meta(train_src)
    spec = task_spec(cfg.task, meta)
    rows = label_indices(meta, cfg.data.label_fraction, cfg.data.label_seed)
    vit = vit_config(cfg)
    pool = tuple(cfg.model.get("pool", DEFAULT_POOL))
    bank = anomaly_bank(pool, train_src, meta)
    model = common.Model(lambda r: Classifier(vit, spec.n_out, rngs=r, pool=pool,
                                              bank_size=len(bank.rows) if bank else 0), mesh)
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    oc = optim_config(cfg)
    tx = optim.build(oc, params_shape, depth=vit.depth)
    shardings, shapes = common.params_state(model, tx, mesh, params_shape)
    size = tuple(vit.img_size)
    best = Best(cfg, spec, model, mesh, size, bank, frozen=int(oc.get("freeze_backbone_steps", 0) or 0))
    probe_head = head_init(cfg) == "probe"
    s = common.Setup("finetune", cfg, mesh, model, tx, shardings, shapes, make_step(cfg, spec, model, tx),
                     batch_spec(cfg, vit, spec, bank), init=None, data=None, spec=None, vit=vit)

    def init():
        params = model.init(jax.random.key(cfg.seed))
        if cfg.init:
            params["backbone"], where = backbone_params(cfg.init, params_shape["backbone"],
                                                        model.shardings["backbone"])
            print(f"finetune: backbone <- {where}", flush=True)
        if bank:
            params = fill_bank(cfg, spec, model, params, train_src, bank, vit, mesh)
            print(f"finetune: anomaly pool over a bank of {len(bank.rows)} normal training series "
                  f"(tau {float(params['bank_tau']):.4f})", flush=True)
        params = set_feature_stats(cfg, spec, model, params, P.Subset(train_src, rows), size, mesh, bank=bank)
        if probe_head:
            params, info = fit_head(cfg, spec, model, params, train_src, rows, size, mesh, bank)
            what = "ridge penalty" if spec.kind == "regression" else "logistic C"
            print(f"finetune: head fitted as a probe on {info['n']} training series' features ({what} "
                  f"{info['penalty']:g}, {'chosen on val' if info['on'] == 'val' else 'no val split: the default'})",
                  flush=True)
        opt = jax.jit(tx.init, out_shardings=shardings["opt"])(params)
        return {"step": jnp.zeros([], jnp.int32), "params": params, "opt": opt}

    def data():
        print(f"finetune: {spec.task} ({spec.kind}, {spec.n_out} outputs) on {len(rows)} of {len(train_src)} "
              f"training series (label fraction {cfg.data.label_fraction:g})", flush=True)
        loader = P.LoaderConfig(batch_size=cfg.data.batch_size, seed=cfg.seed, num_workers=0)
        return iter(P.supervised(P.Subset(train_src, rows), loader, size, Targets(spec, bank), train=True,
                                 scale=tuple(cfg.data.crop_scale), flip_p=float(cfg.data.get("flip_p", 0.5))))

    def run_spec():
        extra = {"anomaly_bank": dataclasses.asdict(bank)} if bank else {}
        return runspec.RunSpec("finetune", {**runspec.as_json(cfg), "task_spec": dataclasses.asdict(spec), **extra},
                               vit=vit, preprocessing=runspec.preprocessing(cfg.data.dir))

    def on_start(state, workdir, fresh):
        best.open(workdir)
        if fresh:  # a run killed before its first checkpoint starts again: so does its record
            best.reset()
        if fresh and probe_head:  # the fitted head is the first candidate for the best step
            best.after_step(0, state)
        return ()

    def after_step(step, state):
        return best.after_step(step, state)

    def stopped(workdir):
        best.open(workdir)
        return best.record.get("stopped", False)

    def on_end(state, metrics, workdir):
        return {**metrics, **best.finish(state)}

    s.init, s.data, s.spec, s.on_start, s.on_end = init, data, run_spec, on_start, on_end
    s.after_step, s.stopped = after_step, stopped
    return s


def optim_config(cfg):
    """``cfg.optim`` resolved for this run: the feature statistics and the anomaly bank never
    train, and from a pretrained run (``init``) ``optim.pretrained``'s settings replace the
    others (its ``lr_rules`` go after the user's, so a user's rule wins)."""
    oc = cfg.optim.copy_and_resolve_references()
    pre = dict(oc.get("pretrained", {})) if cfg.init else {}
    rules = [("feat_.*", None), ("bank_.*", None)] + [tuple(r) for r in oc.get("lr_rules", ())]
    rules += [tuple(r) for r in pre.pop("lr_rules", ())]
    for k, v in pre.items():
        if k not in oc:
            raise KeyError(f"optim.pretrained.{k}: not an optim setting")
        oc[k] = v
    oc.lr_rules = rules
    return oc


def head_init(cfg) -> str:
    """How the head starts: ``model.head_init`` from a pretrained run (``init``); from random
    init always at random (the supervised reference)."""
    how = str(cfg.model.get("head_init", "random"))
    if how not in HEAD_INIT:
        raise ValueError(f"model.head_init={how!r}: one of {HEAD_INIT}")
    return how if cfg.init else "random"


def anomaly_bank(pool, train_src, meta) -> BankIndex | None:
    """The bank of the ``"anomaly"`` pool, when ``pool`` has it: the training split's series
    without findings, at most 64 per body region and sequence, as the probes' bank."""
    if "anomaly" not in pool:
        return None
    from decipher_jax.eval import localisation

    rows = localisation.normal_index(train_src)
    if len(rows) < 2:
        raise ValueError(f"pool 'anomaly': {len(rows)} training series without findings in {train_src}; the "
                         "normal bank needs at least 2")
    return BankIndex.of(meta, rows)


def batch_spec(cfg, vit: ViTConfig, spec: TaskSpec, bank: BankIndex | None = None) -> dict:
    b = cfg.data.batch_size
    y = ((b, spec.n_out), jnp.float32) if spec.kind == "multilabel" else \
        ((b,), jnp.int32 if spec.kind == "multiclass" else jnp.float32)
    w = ((b, spec.n_out), jnp.float32) if spec.kind == "multilabel" else ((b,), jnp.float32)
    out = {"image": ((b, *vit.img_size, vit.in_channels), jnp.float32), "y": y, "y_mask": w}
    return out | ({k: ((b,), jnp.int32) for k in BANK_KEYS} if bank else {})


class Best:
    """Early stopping on the val split: scores every ``eval.every`` steps, keeps the best step's
    parameters (``best/``) and its record (``best.json``, read back on resume)."""

    label = "finetune"  # the trainer's name in what it prints
    frozen = 0  # the steps the backbone stays frozen: evaluations up to them use none of the patience

    def __init__(self, cfg, spec, model, mesh, size, bank: BankIndex | None = None, frozen: int = 0):
        self.cfg, self.spec, self.model, self.mesh, self.size, self.bank = cfg, spec, model, mesh, size, bank
        self.frozen = frozen
        self.workdir = None
        self.record = {"step": None, "score": None, "evals": {}}
        self.predict = jax.jit(lambda p, b: scores_of(spec, apply(model, p, b)))

    def open(self, workdir: str):
        if self.workdir == workdir:  # stopped() opened it already
            return
        self.workdir = workdir
        path = os.path.join(workdir, "best.json")
        if os.path.exists(path):
            with open(path) as f:
                self.record = json.load(f)
        self.has_val = True
        try:
            from decipher_jax.eval import evaluators

            evaluators.open_split(self.cfg.data.dir, "val")
        except evaluators.MissingSplit as e:  # no early stopping: the last step is the result
            print(f"{self.label}: no val split ({e}); the last step's parameters are kept", flush=True)
            self.has_val = False

    def reset(self):
        """Forgets an earlier attempt's record and best parameters (a fresh start in a workdir
        whose run was killed before its first checkpoint)."""
        import shutil

        self.record = {"step": None, "score": None, "evals": {}}
        if jax.process_index() == 0:
            shutil.rmtree(os.path.join(self.workdir, "best"), ignore_errors=True)
            if os.path.exists(os.path.join(self.workdir, "best.json")):
                os.remove(os.path.join(self.workdir, "best.json"))

    def evaluate(self, params, split: str) -> tuple[dict, dict]:
        """``(metrics, per-series predictions)`` of ``params`` on ``split``."""
        src = P.data_source(self.cfg.data.dir, split)
        res = predict(self.predict, params, src, self.spec, self.size, self.mesh, self.cfg.eval.batch_size,
                      bank=self.bank)
        preds = {"scores": res.pop("out"), **{k: np.asarray(v) for k, v in res.items()}}
        return score(self.spec, preds["scores"], preds["y"], preds["y_mask"]), preds

    def _save(self, step, params):
        mngr = ckpt.manager(os.path.join(self.workdir, "best"), max_to_keep=1, async_save=False)
        ckpt.save(mngr, step, {"params": params}, force=True)
        mngr.wait_until_finished()
        mngr.close()

    def _write(self):
        if jax.process_index() == 0:
            tmp = os.path.join(self.workdir, "best.json.tmp")
            with open(tmp, "w") as f:
                json.dump(self.record, f, indent=1)
            os.replace(tmp, os.path.join(self.workdir, "best.json"))

    def after_step(self, step: int, state) -> bool:
        every = self.cfg.eval.every
        if not self.has_val or not every or step % every:
            return False
        m, _ = self.evaluate(state["params"], "val")
        self.record["evals"][str(step)] = m["score"]
        if self.record["score"] is None or m["score"] > self.record["score"]:
            self.record.update(step=step, score=m["score"])
            self._save(step, state["params"])
        self._write()
        print(f"{self.label}: val {self.spec.task} {m['score']:.3f} at step {step} (best {self.record['score']:.3f} "
              f"at step {self.record['step']})", flush=True)
        # Evaluations while the backbone is still frozen do not use up the patience.
        later = [s for s in map(int, self.record["evals"]) if s > max(self.record["step"], self.frozen)]
        if len(later) >= self.cfg.eval.patience:
            self.record["stopped"] = True  # a rerun goes straight to the test split
            self._write()
            print(f"{self.label}: no val improvement in {len(later)} evaluations; stopping at step {step}", flush=True)
            return True
        return False

    def finish(self, state) -> dict:
        """The best step's parameters on the test split (else the last step's)."""
        params, step = state["params"], int(state["step"])
        if self.record["step"] is not None:
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["params"])
            step, part = ckpt.restore_subtree(os.path.join(self.workdir, "best"),
                                              {"params": common.abstract(shapes, self.model.shardings)})
            params = part["params"]
        m, preds = self.evaluate(params, "test")
        out = {"task": self.spec.task, "best_step": step, "val": self.record, "test": m}
        if jax.process_index() == 0:
            with open(os.path.join(self.workdir, "test.json"), "w") as f:
                json.dump(out, f, indent=1, default=float)
            np.savez(os.path.join(self.workdir, "test_predictions.npz"), **preds)
        return {"test/score": m["score"], "best_step": step}


@common.locked
def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) a fine-tuning run; returns the last metrics and the test score."""
    return common.train(setup(cfg, common.make_mesh(cfg, "finetune")), workdir)


def summary(cfg, m: dict, seconds: float) -> str:
    start = f"from {cfg.init}" if cfg.init else "from random init (supervised reference)"
    return (f"fine-tuned {cfg.task} {start}, {cfg.steps} steps in {seconds:.0f} s: test score {m['test/score']:.3f} "
            f"(best val step {m['best_step']})")
