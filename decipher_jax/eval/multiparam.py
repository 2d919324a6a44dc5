"""Findings from multi-parametric studies with sequences missing: score against the sequences present.

    res = multiparam.evaluate({"multi-sequence": "W/multiparam", "single-sequence": "W/multiparam_single"},
                              data="W/multiparam/prep", findings=("infarct", "mass"))

Every encoder is frozen; a logistic probe per finding reads its study features. The probes train on the training studies under random
missing-sequence patterns (each study's native set and ``copies`` draws that keep each present
sequence with probability 1/2, at least one), choose their penalty on the val split (native and
one draw), and are scored on the *complete* test studies (every sequence acquired) under each of
the 2^S - 1 subsets of sequences, so that every subset is scored on the same studies.

Encoders and how each reads a subset:
- a multi-sequence run (``context = "all"``): the subset's tokens, the others absent
  (``"mask"``), or the others replaced by the run's templates (``"template"``, BrainMVP's
  missing-modality input; its probe trains on template-filled drops);
  with ``arrays``, :func:`examples` for the report's figure go to ``arrays/examples.npz``;
- a single-sequence run (``context = "target"``, BrainMVP's one-channel encoder): each present
  sequence encoded alone and the features averaged (late fusion; one sequence is that encoder
  as it is);
- ``random``: the multi-sequence architecture at random init (the floor), read both ways
  (absent masked, and late fusion: the late-fusion floor).
Each is read out two ways (:class:`Encoder`'s ``pool``): the study's tokens pooled together, or
each sequence's tokens pooled apart and set side by side. A finding's score on a subset is its
test AUROC; the table's cell is the mean over the findings.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from decipher_jax.data import pipelines as P
from decipher_jax.eval import probes
from decipher_jax.models.multiseq import fill_missing

MODES = ("mask", "template", "late")


def study_arrays(data: str, split: str, size, sequences, findings, *, complete_only: bool = False) -> dict:
    """A split's studies in memory: ``image`` (n, X, Y, Z, S), ``present`` (n, S), ``y`` (n, F),
    ``label`` (n, X, Y, Z) the union of the series' lesion maps, ``patient`` (n,) hashes. Empty
    arrays when the split has no such study."""
    source = P.data_source(data, split)  # KeyError / ValueError without the split (the evaluator's MissingSplit)
    loader = P.LoaderConfig(batch_size=8, seed=0, shuffle=False, repeat=False, drop_remainder=False)
    parts = {"image": [], "present": [], "y": [], "patient": [], "label": []}
    for b in P.studies(source, loader, tuple(size), tuple(sequences), train=False, findings=tuple(findings),
                       complete_only=complete_only, keep_label=True):
        parts["label"].append(np.asarray(b["label"], np.uint8))
        parts["image"].append(np.asarray(b["image"], np.float32))
        parts["present"].append(np.asarray(b["present"], bool))
        parts["y"].append(np.asarray(b["y"], np.float32))
        parts["patient"].append(np.asarray(b["patient_id_hash"]))
    if not parts["image"]:
        s = len(sequences)
        return {"image": np.zeros((0, *size, s), np.float32), "present": np.zeros((0, s), bool),
                "y": np.zeros((0, len(findings)), np.float32), "patient": np.zeros((0,), np.int32),
                "label": np.zeros((0, *size), np.uint8)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def subsets(sequences) -> list[tuple[int, ...]]:
    """Every non-empty subset of the sequence indices, smallest first."""
    s = len(sequences)
    return [c for k in range(1, s + 1) for c in itertools.combinations(range(s), k)]


def subset_name(sub, sequences) -> str:
    return "+".join(sequences[i] for i in sub)


def random_drops(present, copies: int, seed: int) -> np.ndarray:
    """``copies`` missing-sequence patterns per study (``(copies * n, S)``): each present sequence
    kept with probability 1/2, at least one (drawn among the present)."""
    r = np.random.default_rng(seed)
    out = []
    for _ in range(copies):
        keep = present & (r.random(present.shape) < 0.5)
        for i in np.flatnonzero(~keep.any(1) & present.any(1)):
            keep[i, r.choice(np.flatnonzero(present[i]))] = True
        out.append(keep)
    return np.concatenate(out) if out else np.zeros((0,) + present.shape[1:], bool)


POOLS = ("study", "sequence")


def batched(fn, arrays, pad_values, batch: int):
    """``fn(*arrays)`` (a jitted function of row-aligned arrays returning a pytree of row-aligned
    arrays) over fixed batches of ``batch`` rows: the last batch is padded with ``pad_values``
    (one per array) so that every call has one compiled shape; the padding's outputs are dropped.
    ``None`` for zero rows."""
    n, outs = len(arrays[0]), []
    for i in range(0, n, batch):
        chunk = [np.asarray(a[i:i + batch]) for a in arrays]
        pad = batch - len(chunk[0])
        if pad:
            chunk = [np.concatenate([c, np.full((pad,) + c.shape[1:], v, c.dtype)]) for c, v in zip(chunk, pad_values)]
        o = fn(*(jnp.asarray(c) for c in chunk))
        outs.append(jax.tree.map(lambda a: np.asarray(a)[: batch - pad], o))  # noqa: B023
    return jax.tree.map(lambda *a: np.concatenate(a), *outs) if outs else None


# padding rows: zero images with every sequence present (no all-absent row to pool over)
STUDY_PAD = (0.0, True)


def alone(present, j: int) -> np.ndarray:
    """Only sequence ``j`` present, in every row (late fusion's pass for it)."""
    return np.broadcast_to(np.arange(present.shape[1]) == j, present.shape)


def subset_present(sub, n: int, s: int) -> np.ndarray:
    """``(n, s)`` presence rows with exactly the sequences of ``sub`` present."""
    return np.broadcast_to(np.isin(np.arange(s), sub), (n, s)).copy()


def absent_zeroed(image, present) -> np.ndarray:
    """The images ``(n, X, Y, Z, S)`` with the absent sequences' channels set to 0 (float32)."""
    return np.where(present[:, None, None, None, :], image, 0.0).astype(np.float32)


class Encoder:
    """A frozen multi-sequence encoder: ``features(image, present)`` in batches.

    ``pool``: ``"study"``, the CLS token and the present patch tokens' mean and max ``(n, 3E)``:
    which sequence a signal came from is lost in the pooling; ``"sequence"``, the CLS token and
    each sequence's own token mean and max, concatenated in the vocabulary's order with zeros for
    an absent one ``(n, E + 2 S E)``: a linear probe can then weigh a bright spot on DWI apart from
    one on FLAIR (the DWI-FLAIR mismatch is exactly that). Late fusion (``mode = "late"``) encodes
    each present sequence alone: ``study`` averages their features, ``sequence`` takes each
    sequence's own pooled tokens from its own pass (and averages the CLS tokens).
    :meth:`pooled` encodes once for several readouts."""

    def __init__(self, model, params, mode: str, batch: int = 16, pool: str = "study"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.model, self.params, self.mode, self.batch, self.pool = model, params, mode, batch, pool

        def encode(params, x, present):
            m = model(params)
            if mode == "template":
                x, present = fill_missing(x, present, m.templates[...])
            o = m.encoder(x, present)
            return o, o["patch"].astype(jnp.float32), present

        def pooled(params, x, present):
            o, patch, _ = encode(params, x, present)
            return {"cls": o["cls"].astype(jnp.float32), "mean": o["mean"], "max": o["max"],
                    "seq_mean": patch.mean(2), "seq_max": patch.max(2)}

        def tokens(params, x, present):
            _, patch, present = encode(params, x, present)
            return patch * present[:, :, None, None]

        # the parameters stay an argument (not constants folded into the program)
        self._pooled = functools.partial(jax.jit(pooled), params)
        self._tokens = functools.partial(jax.jit(tokens), params)

    def _run(self, fn, image, present):
        return batched(fn, (image, present), STUDY_PAD, self.batch)

    def tokens(self, image, present):
        """Per-sequence patch tokens side by side on the token grid, ``(n, gx, gy, gz, S * E)``,
        zeros for an absent sequence (template mode: the template's tokens; late fusion: each
        sequence's from its own pass)."""
        present = np.asarray(present, bool)
        vit = self.model(self.params).config.vit
        grid = tuple(a // b for a, b in zip(image.shape[1:4], vit.patch_size))
        if self.mode == "late":
            s = present.shape[1]
            t = np.stack([self._run(self._tokens, image, alone(present, j))[:, j] for j in range(s)], 1)
            t = t * present[:, :, None, None]
        else:
            t = self._run(self._tokens, image, present)
        n, s, _, e = t.shape
        return np.moveaxis(t, 1, -2).reshape(n, *grid, s * e)

    @staticmethod
    def _assemble(o, present, pool):
        if pool == "study":
            return np.concatenate([o["cls"], o["mean"], o["max"]], -1)
        w = present.astype(np.float32)[:, :, None]
        n = len(present)
        return np.concatenate([o["cls"], (o["seq_mean"] * w).reshape(n, -1), (o["seq_max"] * w).reshape(n, -1)], -1)

    def pooled(self, image, present, pools=None) -> dict:
        """``{pool: features}`` for each readout in ``pools`` (default: this encoder's), from one
        pass of the encoder (late fusion: one per sequence)."""
        pools = tuple(pools or (self.pool,))
        present = np.asarray(present, bool)
        if self.mode != "late":
            o = self._run(self._pooled, image, present)
            filled = np.ones_like(present) if self.mode == "template" else present
            return {pool: self._assemble(o, filled, pool) for pool in pools}
        # late fusion: each present sequence alone
        s = present.shape[1]
        per = [self._run(self._pooled, image, alone(present, j)) for j in range(s)]
        w = present.astype(np.float32)
        cnt = np.maximum(w.sum(1, keepdims=True), 1.0)
        out = {}
        for pool in pools:
            if pool == "study":
                feats = [self._assemble(o, present, pool) for o in per]
                out[pool] = sum(feats[j] * w[:, j:j + 1] for j in range(s)) / cnt
            else:
                cls = sum(per[j]["cls"] * w[:, j:j + 1] for j in range(s)) / cnt
                own = {k: np.stack([per[j][k][:, j] for j in range(s)], 1) for k in ("seq_mean", "seq_max")}
                out[pool] = self._assemble({"cls": cls, **own}, present, pool)
        return out

    def features(self, image, present):
        return self.pooled(image, present)[self.pool]


def subset_rows(scores: dict, test_y, used, findings, sequences) -> dict:
    """A row of the table from test scores per subset (``{subset name: (n, len(used))}``, the
    findings ``used``): per subset the mean AUROC over those findings and each one's, the means
    by number of sequences, and the scores themselves under ``"_scores"`` (for the bootstrap:
    :func:`intervals` removes them). An empty row when no finding is scorable."""
    if not len(used):
        return {"subsets": {}, "by_size": {}, "findings": []}
    out = {}
    for sub in subsets(sequences):
        name = subset_name(sub, sequences)
        per = {findings[j]: probes.auroc(scores[name][:, k], test_y[:, j]) for k, j in enumerate(used)}
        out[name] = {"size": len(sub), "auroc": float(np.mean(list(per.values()))), "per_finding": per}
    by_size = {k: float(np.mean([v["auroc"] for v in out.values() if v["size"] == k])) for k in range(1, len(sequences) + 1)}
    return {"subsets": out, "by_size": by_size, "findings": [findings[j] for j in used],
            "_scores": {k: np.asarray(v) for k, v in scores.items()}, "_used": list(used)}


def scorable(findings, train_y, test_y) -> list[int]:
    """The findings with both classes among the training and among the test studies."""
    return [j for j in range(len(findings)) if len(np.unique(train_y[:, j])) > 1 and len(np.unique(test_y[:, j])) > 1]


def subset_inputs(test: dict, sequences):
    """The complete test studies once per subset of sequences, stacked (subset-major): the
    presence rows and the image indices."""
    subs, nt, s = subsets(sequences), len(test["present"]), len(sequences)
    present = np.concatenate([subset_present(sub, nt, s) for sub in subs])
    return present, np.tile(np.arange(nt), len(subs))


def score_encoder(enc: Encoder, train: dict, val: dict, test: dict, findings, sequences, *, pools=None, copies: int = 4,
                  seed: int = 0) -> dict:
    """One encoder's probes, trained under random drops, scored on every subset of the complete
    test studies, for each readout in ``pools`` (default the encoder's; one encoding serves
    them all): ``{pool: row}``, a row as :func:`subset_rows` makes it."""
    pools = tuple(pools or (enc.pool,))
    tr_p = np.concatenate([train["present"], random_drops(train["present"], copies, seed)])
    tr_idx = np.tile(np.arange(len(train["present"])), copies + 1)
    va_p = np.concatenate([val["present"], random_drops(val["present"], 1, seed + 1)])
    va_idx = np.tile(np.arange(len(val["present"])), 2)
    te_p, te_idx = subset_inputs(test, sequences)
    xtr = enc.pooled(train["image"][tr_idx], tr_p, pools)
    xva = enc.pooled(val["image"][va_idx], va_p, pools)
    xte = enc.pooled(test["image"][te_idx], te_p, pools)
    nt, subs = len(test["present"]), subsets(sequences)
    used = scorable(findings, train["y"], test["y"])
    if not used:
        return {pool: {"subsets": {}, "by_size": {}, "findings": []} for pool in pools}
    tasks = [probes.Task(findings[j], train["y"][tr_idx, j].astype(int), np.tile(test["y"][:, j].astype(int), len(subs)),
                         val_y=val["y"][va_idx, j].astype(int)) for j in used]
    out = {}
    for pool in pools:
        _, scores = probes.logistic_sweep(xtr[pool], xte[pool], tasks, val_x=xva[pool], return_scores=True)
        per_sub = {subset_name(sub, sequences): np.stack([sc[si * nt:(si + 1) * nt, 1] for sc in scores], 1)
                   for si, sub in enumerate(subs)}
        out[pool] = subset_rows(per_sub, test["y"], used, findings, sequences)
    return out


# -- study-bootstrap intervals -------------------------------------------------------------------

def study_weights(patient, draws: int, seed: int) -> np.ndarray:
    """``(draws, n)`` bootstrap weights of the rows: the patients (a study's unit: a patient's
    rows move together) drawn with replacement, each row weighted by its patient's count."""
    ids, inv = np.unique(np.asarray(patient), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(ids), np.full(len(ids), 1.0 / max(len(ids), 1)), size=draws)
    return counts[:, inv].astype(np.float64)


def weighted_auroc(scores, y, w) -> np.ndarray:
    """AUROC of ``scores`` for labels ``y`` under each row of weights ``w`` ``(D, n)`` (the
    Mann-Whitney statistic of the rows repeated by their weights; ties count one half); NaN
    where a draw holds no positive or no negative."""
    s, pos = np.asarray(scores, np.float64), np.asarray(y) > 0
    sp, sn = s[pos], s[~pos]
    c = (sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])
    w = np.atleast_2d(w)
    wp, wn = w[:, pos], w[:, ~pos]
    num = ((wp @ c) * wn).sum(1)
    den = wp.sum(1) * wn.sum(1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _quantiles(d, level):
    d = d[np.isfinite(d)]
    q = (1 - level) / 2
    return (float(np.quantile(d, q)), float(np.quantile(d, 1 - q))) if len(d) else (float("nan"), float("nan"))


def intervals(rows: dict, test_y, w, *, level: float = 0.95) -> dict:
    """Adds ``lo`` / ``hi`` (the ``level`` study-bootstrap interval of the mean AUROC over the
    findings) to every subset of every row, and to each row's ``by_size``, in place (the rows'
    ``_scores`` are removed). Returns the draws ``{(row, subset or k): (D,)}`` for paired
    comparisons (the same draws for every row)."""
    out = {}
    for name, row in rows.items():
        sc, used = row.pop("_scores", None), row.pop("_used", None)
        if not sc or not used:
            continue
        row["by_size_interval"] = {}
        for sub, v in row["subsets"].items():
            a = np.stack([weighted_auroc(sc[sub][:, k], test_y[:, j], w) for k, j in enumerate(used)])
            ok = np.isfinite(a)  # a draw may hold no positive of a finding: the mean of the others
            d = np.where(ok.any(0), np.where(ok, a, 0.0).sum(0) / np.maximum(ok.sum(0), 1), np.nan)
            out[(name, sub)] = d
            v["lo"], v["hi"] = _quantiles(d, level)
        for k in row["by_size"]:
            d = np.mean(np.stack([out[(name, sub)] for sub, v in row["subsets"].items() if v["size"] == k]), 0)
            out[(name, k)] = d
            row["by_size_interval"][k] = _quantiles(d, level)
    return out


def gain(a, b, full: float, level: float = 0.95) -> dict:
    """``a`` minus ``b`` (paired bootstrap draws, ``(D,)`` each) with its interval and the
    fraction of draws where ``a`` is not above ``b``; ``full``: the gain on the whole sample."""
    d = a - b
    lo, hi = _quantiles(d, level)
    fin = d[np.isfinite(d)]
    return {"gain": float(full), "lo": lo, "hi": hi, "p_not_above": float(np.mean(fin <= 0)) if len(fin) else float("nan")}


def graceful(multi: dict, single: dict, sequences) -> dict:
    """The issue's tests: the multi-sequence encoder with every sequence against the best
    single-sequence encoder (one sequence), and, for each number of sequences k, whether the
    multi-sequence encoder's mean over the k-subsets stays above that best single score."""
    full = "+".join(sequences)
    singles = {s: single["subsets"][s]["auroc"] for s in sequences if s in single["subsets"]}
    best_s = max(singles, key=singles.get) if singles else ""
    best = singles.get(best_s, float("nan"))
    all_seq = multi["subsets"].get(full, {}).get("auroc", float("nan"))
    above = {k: bool(v > best) for k, v in multi["by_size"].items()}
    return {"all_sequences": all_seq, "best_single": best, "best_single_sequence": best_s,
            "beats_best_single": bool(all_seq > best), "above_best_single_by_size": above,
            "graceful": bool(all(above[k] for k in above if k >= 2))}


def examples(model, params, cfg, test: dict, n: int = 3, seed: int = 0) -> dict:
    """For the report's figure: ``n`` complete test studies through the pretraining views (same
    draw of target, fill sequence and mask as a step would make): axial mid-slices of the target
    sequence, the mask, the template-filled input and its reconstruction, the cross-filled input
    and its reconstruction, and every template."""
    from decipher_jax import multiparam as mp

    c = cfg.pretrain
    x, present = jnp.asarray(test["image"][:n]), jnp.asarray(test["present"][:n])

    @jax.jit
    def run(params, x, present):
        m = model(params)
        v = mp.views(x, present, m.templates[...], jax.random.key(seed), block=c.block, ratio=c.mask_ratio)
        r1, _ = mp.reconstruct(m, x, present, v["v1"], v["t"], c.context, c.get("residual", False))
        r2, _ = mp.reconstruct(m, x, present, v["v2"], v["t"], c.context, c.get("residual", False))
        return v, r1, r2, m.templates[...]

    v, r1, r2, tm = run(params, x, present)
    z = x.shape[3] // 2
    sl = lambda a: np.asarray(a)[..., z].astype(np.float32)  # noqa: E731
    return {"target": sl(v["target"]), "mask": sl(v["mask"]), "v1": sl(v["v1"]), "recon1": sl(r1), "v2": sl(v["v2"]),
            "recon2": sl(r2), "templates": sl(tm), "t": np.asarray(v["t"]), "o": np.asarray(v["o"]),
            "has_o": np.asarray(v["has_o"])}


def evaluate(runs: dict, data: str, findings, *, random: bool = True, copies: int = 4, seed: int = 0,
             mesh=None, arrays: str = "", pools=POOLS, trained_steps: int = 0, seg_steps: int = 0,
             draws: int = 1000) -> dict:
    """``runs``: ``{"multi-sequence": workdir, "single-sequence": workdir}`` (either may be
    missing); see the module docstring. Returns the table (JSON)."""
    from decipher_jax import multiparam as mp

    loaded = {name: mp.load(w, mesh) for name, w in runs.items() if w}
    if not loaded:
        raise ValueError("no multiparam run to evaluate")
    cfg = next(iter(loaded.values()))[2]
    seqs, size = tuple(cfg.data.sequences), tuple(cfg.data.size)
    data = data or cfg.data.dir
    train = study_arrays(data, "train", size, seqs, findings)
    val = study_arrays(data, "val", size, seqs, findings)
    test = study_arrays(data, "test", size, seqs, findings, complete_only=True)
    if not len(test["present"]):
        raise ValueError(f"{data}: the test split has no complete study (every one of {seqs})")
    for split, arr in (("train", train), ("val", val)):
        if not len(arr["present"]):
            raise ValueError(f"{data}: the {split} split has no study with any of {seqs}: the probes need it")
    rows = {}
    for name, (model, params, c) in loaded.items():
        if tuple(c.data.sequences) != seqs or tuple(c.data.size) != size:
            raise ValueError(f"{runs[name]}: sequences / size {tuple(c.data.sequences)} {tuple(c.data.size)} differ "
                             f"from {seqs} {size}")
        modes = ("late",) if c.pretrain.context == "target" else ("mask", "template")
        for mode in modes:
            by_pool = score_encoder(Encoder(model, params, mode), train, val, test, findings, seqs, pools=pools,
                                    copies=copies, seed=seed)
            rows |= {f"{name} ({mode}, {pool} pool)": row for pool, row in by_pool.items()}
    if random:
        model, params, c = next(v for v in loaded.values())
        rand = model.init(jax.random.key(seed + 17))
        for mode in ("mask", "late"):
            by_pool = score_encoder(Encoder(model, rand, mode), train, val, test, findings, seqs, pools=pools,
                                    copies=copies, seed=seed)
            rows |= {f"random init ({mode}, {pool} pool)": row for pool, row in by_pool.items()}
    if trained_steps:
        # The ladder's trained rungs: the same ViT end to end from random init (supervised) and
        # from the multi-sequence run (fine-tuned).
        model, params, c = next(v for v in loaded.values())
        inits = {"supervised (random init, end to end)": model.init(jax.random.key(seed + 17))}
        if "multi-sequence" in loaded:
            inits["fine-tuned (multi-sequence init)"] = loaded["multi-sequence"][1]
        for name, p0 in inits.items():
            _, val_auc, predict = train_end_to_end(model, p0, train, val, steps=trained_steps, seed=seed)
            rows[name] = score_predictions(predict, test, findings, seqs, train["y"]) | {"val_auroc": val_auc}
    if arrays and "multi-sequence" in loaded:
        import os

        os.makedirs(arrays, exist_ok=True)
        model, params, c = loaded["multi-sequence"]
        np.savez_compressed(os.path.join(arrays, "examples.npz"), **examples(model, params, c, test, seed=seed))
    if seg_steps:
        encs = {}
        for name, (model, params, c) in loaded.items():
            for mode in (("late",) if c.pretrain.context == "target" else ("mask", "template")):
                encs[f"{name} ({mode})"] = Encoder(model, params, mode)
        model, params, c = next(v for v in loaded.values())
        encs["random init (mask)"] = Encoder(model, model.init(jax.random.key(seed + 17)), "mask")
        seg = segment(encs, train, val, test, seqs, steps=seg_steps, seed=seed, draws=draws)
    w = study_weights(test["patient"], draws, seed)
    boot = intervals(rows, test["y"], w)
    res = {"sequences": list(seqs), "findings": list(findings), "data": data, "pools": list(pools),
           "studies": {"train": int(len(train["present"])), "val": int(len(val["present"])),
                       "test_complete": int(len(test["present"]))},
           "bootstrap": {"draws": draws, "unit": "patient", "level": 0.95}, "rows": rows}
    if seg_steps:
        res["segmentation"] = seg
    # The criteria, per readout: the multi-sequence encoder (absent masked; and
    # template-filled) against the single-sequence encoder read the same way, with paired
    # study-bootstrap intervals of the gains.
    full = "+".join(seqs)
    for pool in pools:
        sname = f"single-sequence (late, {pool} pool)"
        for mode in ("mask", "template"):
            mname = f"multi-sequence ({mode}, {pool} pool)"
            multi, single = rows.get(mname), rows.get(sname)
            if not (multi and single and multi["subsets"] and single["subsets"]):
                continue
            c = graceful(multi, single, seqs)
            # the best single sequence is chosen again in every draw: the interval counts the
            # choice of the best of S, not only the noise of the one chosen on the whole sample
            best = np.max(np.stack([boot[(sname, q)] for q in seqs if (sname, q) in boot]), 0)
            c["gain"] = gain(boot[(mname, full)], best, c["all_sequences"] - c["best_single"])
            c["gain_by_size"] = {k: gain(boot[(mname, k)], best, v - c["best_single"]) for k, v in multi["by_size"].items()}
            res.setdefault("criteria", {})[f"{mode}, {pool} pool"] = c
    return res


def by_size_cell(row: dict, k) -> str:
    """``mean [lo, hi]`` of a row's ``by_size`` at ``k`` sequences (keys are ints, or strings once
    read back from JSON)."""
    get = lambda d: d.get(k, d.get(str(k))) if d else None  # noqa: E731
    v, ci = get(row["by_size"]), get(row.get("by_size_interval"))
    if v is None:
        return "-"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def summary(r: dict) -> list[str]:
    seqs = r["sequences"]
    lines = [f"multi-parametric findings ({', '.join(r['findings'])}; mean test AUROC over "
             f"{r['studies']['test_complete']} complete test studies, by number of sequences present, "
             "[95 % patient-bootstrap interval]):"]
    for name, row in r["rows"].items():
        lines.append(f"  {name}: " + ", ".join(f"{k}: {by_size_cell(row, k)}" for k in row["by_size"]))
    for name, row in (r.get("segmentation") or {}).get("rows", {}).items():
        lines.append(f"  lesion Dice, {name}: " + ", ".join(f"{k}: {by_size_cell(row, k)}" for k in row["by_size"]))
    for key, c in (r.get("criteria") or {}).items():
        g = c.get("gain")
        gtxt = f" (gain {g['gain']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}])" if g else ""
        lines.append(f"  [{key}] all {len(seqs)} sequences {c['all_sequences']:.3f} against the best single-sequence "
                     f"encoder ({c['best_single_sequence']}) {c['best_single']:.3f}{gtxt}: "
                     f"{'beats it' if c['beats_best_single'] else 'does not beat it'}; graceful degradation "
                     f"{'holds' if c['graceful'] else 'does not hold'}")
    return lines


# -- trained rungs: the same multi-sequence ViT trained end to end on the findings -----------------

def _seq_pool(o, present):
    """The ``sequence`` readout inside a jitted function: CLS, then each sequence's token mean
    and max side by side, zeros for an absent sequence."""
    patch = o["patch"].astype(jnp.float32)
    w = present.astype(jnp.float32)[:, :, None]
    b = patch.shape[0]
    return jnp.concatenate([o["cls"].astype(jnp.float32), (patch.mean(2) * w).reshape(b, -1),
                            (patch.max(2) * w).reshape(b, -1)], -1)


def train_end_to_end(model, params, train: dict, val: dict, *, steps: int = 300, batch: int = 8, lr: float = 1e-3,
                     keep: float = 0.75, eval_every: int = 50, seed: int = 0):
    """The multi-sequence encoder and a linear head (the ``sequence`` readout) trained end to end
    on the findings (binary cross-entropy, AdamW, warm-up then cosine), each training study's
    present sequences kept with probability ``keep`` per step (at least one). ``params``: random
    init (the supervised reference) or a pretrained run's (fine-tuned). The step with the best
    mean val AUROC (every ``eval_every``) is kept. Returns ``(params, head, predict)`` with
    ``predict(image, present) -> (n, F)`` probabilities."""
    import optax

    f = train["y"].shape[1]
    e = model(params).config.vit.dim
    s = train["present"].shape[1]
    r = np.random.default_rng(seed)
    head = {"w": jnp.zeros((e + 2 * s * e, f)), "b": jnp.zeros((f,))}
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps, lr * 1e-3), weight_decay=0.05)
    state = {"p": params, "h": head}
    opt = tx.init(state)

    def logits(st, x, present):
        o = model(st["p"]).encoder(x, present)
        return _seq_pool(o, present) @ st["h"]["w"] + st["h"]["b"]

    @jax.jit
    def step(st, opt, x, present, y):
        def loss(st):
            return optax.sigmoid_binary_cross_entropy(logits(st, x, present), y).mean()

        v, g = jax.value_and_grad(loss)(st)
        u, opt = tx.update(g, opt, st)
        return optax.apply_updates(st, u), opt, v

    pred_fn = jax.jit(lambda st, x, p: jax.nn.sigmoid(logits(st, x, p)))

    def predict(st, image, present, bs=16):
        return batched(functools.partial(pred_fn, st), (image, present), STUDY_PAD, bs)

    def val_score(st):
        pr = predict(st, val["image"], val["present"])
        sc = [probes.auroc(pr[:, j], val["y"][:, j]) for j in range(f) if len(np.unique(val["y"][:, j])) > 1]
        return float(np.mean(sc)) if sc else 0.0

    best, best_state = -1.0, state
    n = len(train["present"])
    for i in range(steps):
        idx = r.choice(n, size=batch, replace=n < batch)
        p = train["present"][idx] & (r.random((batch, s)) < keep)
        for k in np.flatnonzero(~p.any(1)):
            p[k, r.choice(np.flatnonzero(train["present"][idx[k]]))] = True
        x = absent_zeroed(train["image"][idx], p)
        state, opt, _ = step(state, opt, jnp.asarray(x), jnp.asarray(p), jnp.asarray(train["y"][idx]))
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            v = val_score(state)
            if v > best:
                best, best_state = v, jax.tree.map(lambda a: a, state)
    return best_state, best, lambda image, present: predict(best_state, image, present)


def score_predictions(predict, test: dict, findings, sequences, train_y) -> dict:
    """A trained model's test AUROC per subset of sequences (a row as :func:`score_encoder`'s: the
    findings with both classes in the training and the test studies)."""
    used, nt, s = scorable(findings, train_y, test["y"]), len(test["present"]), len(sequences)
    per_sub = {}
    for sub in subsets(sequences):  # one subset at a time: the images stay one copy of the test split
        p = subset_present(sub, nt, s)
        per_sub[subset_name(sub, sequences)] = predict(absent_zeroed(test["image"], p), p)[:, used]
    return subset_rows(per_sub, test["y"], used, findings, sequences)


# -- lesion segmentation from the frozen encoders ----------------------------------------------------

def _dice(pred, gt) -> np.ndarray:
    """Per-study lesion Dice ``2|P n G| / (|P| + |G|)`` (studies with a lesion only)."""
    inter = (pred & gt).reshape(len(gt), -1).sum(1)
    return 2.0 * inter / np.maximum(pred.reshape(len(gt), -1).sum(1) + gt.reshape(len(gt), -1).sum(1), 1)


def segment(encoders: dict, train: dict, val: dict, test: dict, sequences, *, steps: int = 300, lrs=(3e-3, 1e-2),
            seeds=(0,), hidden: int = 32, batch: int = 8, copies: int = 1, seed: int = 0, draws: int = 1000) -> dict:
    """Lesion segmentation from frozen encoders (``{name: Encoder}``): a UNETR-style head
    (:mod:`decipher_jax.eval.seghead`, kind ``unetr``) over the sequences' tokens side by side,
    with the study's present sequences as its image skip, trained on the training studies (native
    and ``copies`` random drops), its lr chosen on val Dice, scored on the complete test studies
    with a lesion under every subset of sequences: mean per-study Dice. The skip sees the present
    sequences only (absent channels zero); a ``template`` encoder fills its tokens' input. Each
    mean has its 95 % study-bootstrap interval (``lo``, ``hi``; ``by_size_interval``)."""
    from decipher_jax.eval import seghead as S

    tr_p = np.concatenate([train["present"], random_drops(train["present"], copies, seed)])
    tr_idx = np.tile(np.arange(len(train["present"])), copies + 1)
    keep_va = val["label"].reshape(len(val["label"]), -1).any(1)
    keep_te = test["label"].reshape(len(test["label"]), -1).any(1)
    te_img, te_lab = test["image"][keep_te], test["label"][keep_te].astype(bool)
    nt, subs, s = len(te_img), subsets(sequences), len(sequences)
    size = train["image"].shape[1:4]
    predict = jax.jit(lambda p, t, x: jnp.argmax(S.apply_head("unetr", p, t, size, x), -1))
    w = study_weights(test["patient"][keep_te], draws, seed)
    boot = lambda d: w @ d / np.maximum(w.sum(1), 1)  # noqa: E731  the mean Dice under each draw
    rows = {}
    for name, enc in encoders.items():
        xtr = absent_zeroed(train["image"][tr_idx], tr_p)
        ttr = enc.tokens(train["image"][tr_idx], tr_p)
        heads, _ = S.train_heads(ttr, train["label"][tr_idx].astype(np.int32), kind="unetr", classes=2, lrs=lrs,
                                 seeds=seeds, steps=steps, hidden=hidden, batch=batch, images=xtr)
        tva = enc.tokens(val["image"][keep_va], val["present"][keep_va])
        xva = absent_zeroed(val["image"][keep_va], val["present"][keep_va])
        n_heads = len(lrs) * len(seeds)
        vd = [float(np.mean(_dice(np.asarray(predict(jax.tree.map(lambda a: a[i], heads), tva, xva)).astype(bool),  # noqa: B023
                                  val["label"][keep_va].astype(bool)))) for i in range(n_heads)]
        best = int(np.argmax(vd))
        hp = jax.tree.map(lambda a: a[best], heads)
        out, per = {}, {}
        for sub in subs:
            p = subset_present(sub, nt, s)
            xin = absent_zeroed(te_img, p)
            pred = np.asarray(predict(hp, enc.tokens(xin, p), xin))
            d = _dice(pred.astype(bool), te_lab)
            drawn = boot(d)
            per.setdefault(len(sub), []).append(drawn)
            out[subset_name(sub, sequences)] = {"size": len(sub), "dice": float(np.mean(d)),
                                                **dict(zip(("lo", "hi"), _quantiles(drawn, 0.95)))}
        rows[name] = {"subsets": out, "val_dice": vd[best], "lr": float(lrs[best // len(seeds)]),
                      "by_size": {k: float(np.mean([v["dice"] for v in out.values() if v["size"] == k]))
                                  for k in range(1, s + 1)},
                      "by_size_interval": {k: _quantiles(np.mean(per[k], 0), 0.95) for k in range(1, s + 1)}}
    return {"rows": rows, "test_studies_with_lesion": int(nt), "steps": steps}
