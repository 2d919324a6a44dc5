"""Findings from multi-parametric studies with sequences missing: score against the sequences present.

    res = multiparam.evaluate({"multi-sequence": "W/multiparam", "single-sequence": "W/multiparam_single"},
                              data="W/multiparam/prep", findings=("infarct", "mass"))

Every encoder is frozen; a logistic probe per finding reads its study features (the CLS token and
the present patch tokens' mean and max). The probes train on the training studies under random
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
- ``random``: the multi-sequence architecture at random init (the floor).
A finding's score on a subset is its test AUROC; the table's cell is the mean over the findings.
"""

from __future__ import annotations

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
    ``patient`` (n,) hashes. Empty arrays when the split has no such study."""
    source = P.data_source(data, split)  # KeyError / ValueError without the split (the evaluator's MissingSplit)
    loader = P.LoaderConfig(batch_size=8, seed=0, shuffle=False, repeat=False, drop_remainder=False)
    parts = {"image": [], "present": [], "y": [], "patient": []}
    for b in P.studies(source, loader, tuple(size), tuple(sequences), train=False, findings=tuple(findings),
                       complete_only=complete_only):
        parts["image"].append(np.asarray(b["image"], np.float32))
        parts["present"].append(np.asarray(b["present"], bool))
        parts["y"].append(np.asarray(b["y"], np.float32))
        parts["patient"].append(np.asarray(b["patient_id_hash"]))
    if not parts["image"]:
        s = len(sequences)
        return {"image": np.zeros((0, *size, s), np.float32), "present": np.zeros((0, s), bool),
                "y": np.zeros((0, len(findings)), np.float32), "patient": np.zeros((0,), np.int32)}
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


class Encoder:
    """A frozen multi-sequence encoder: ``features(image, present) -> (n, 3E)`` in batches."""

    def __init__(self, model, params, mode: str, batch: int = 16):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.params, self.mode, self.batch = model, params, mode, batch

        def f(params, x, present):
            m = model(params)
            if mode == "template":
                x, present = fill_missing(x, present, m.templates[...])
            o = m.encoder(x, present)
            return jnp.concatenate([o["cls"].astype(jnp.float32), o["mean"], o["max"]], -1)

        self._f = jax.jit(f)

    def _run(self, image, present):
        n, out = len(image), []
        for i in range(0, n, self.batch):
            x, p = image[i:i + self.batch], present[i:i + self.batch]
            pad = self.batch - len(x)
            if pad:  # one compiled shape
                x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
                p = np.concatenate([p, np.ones((pad,) + p.shape[1:], bool)])
            out.append(np.asarray(self._f(self.params, jnp.asarray(x), jnp.asarray(p)))[: self.batch - pad])
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

    def features(self, image, present):
        present = np.asarray(present, bool)
        if self.mode != "late":
            return self._run(image, present)
        # late fusion: each present sequence alone, the features averaged over the present ones
        s = present.shape[1]
        per = [self._run(image, np.broadcast_to(np.arange(s) == j, present.shape)) for j in range(s)]
        w = present.astype(np.float32)
        return sum(per[j] * w[:, j:j + 1] for j in range(s)) / np.maximum(w.sum(1, keepdims=True), 1.0)


def score_encoder(enc: Encoder, train: dict, val: dict, test: dict, findings, sequences, *, copies: int = 4,
                  seed: int = 0) -> dict:
    """One encoder's probes, trained under random drops, scored on every subset of the complete
    test studies: ``{"subsets": {name: {"auroc": mean, "per_finding": {...}}}, "by_size": {k: mean}}``."""
    tr_p = np.concatenate([train["present"], random_drops(train["present"], copies, seed)])
    tr_idx = np.tile(np.arange(len(train["present"])), copies + 1)
    va_p = np.concatenate([val["present"], random_drops(val["present"], 1, seed + 1)])
    va_idx = np.tile(np.arange(len(val["present"])), 2)
    xtr = enc.features(train["image"][tr_idx], tr_p)
    xva = enc.features(val["image"][va_idx], va_p)
    subs = subsets(sequences)
    nt = len(test["present"])
    te_p = np.concatenate([np.broadcast_to(np.isin(np.arange(len(sequences)), sub), (nt, len(sequences))) for sub in subs])
    xte = enc.features(np.tile(test["image"], (len(subs), 1, 1, 1, 1)), te_p)
    tasks, used = [], []
    for j, f in enumerate(findings):
        ytr, yva, yte = (d["y"][idx, j].astype(int) for d, idx in ((train, tr_idx), (val, va_idx), (test, np.arange(nt))))
        if len(np.unique(ytr)) < 2 or len(np.unique(yte)) < 2:
            continue  # a finding the split cannot score
        tasks.append(probes.Task(f, ytr, np.tile(yte, len(subs)), val_y=yva))
        used.append(j)
    if not tasks:
        return {"subsets": {}, "by_size": {}, "findings": []}
    _, scores = probes.logistic_sweep(xtr, xte, tasks, val_x=xva, return_scores=True)
    out = {}
    for si, sub in enumerate(subs):
        rows = slice(si * nt, (si + 1) * nt)
        per = {t.name: probes.auroc(sc[rows, 1], t.test_y[rows]) for t, sc in zip(tasks, scores)}
        out[subset_name(sub, sequences)] = {"size": len(sub), "auroc": float(np.mean(list(per.values()))),
                                            "per_finding": per}
    by_size = {k: float(np.mean([v["auroc"] for v in out.values() if v["size"] == k])) for k in range(1, len(sequences) + 1)}
    return {"subsets": out, "by_size": by_size, "findings": [t.name for t in tasks]}


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
             mesh=None, arrays: str = "") -> dict:
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
    rows = {}
    for name, (model, params, c) in loaded.items():
        if tuple(c.data.sequences) != seqs or tuple(c.data.size) != size:
            raise ValueError(f"{runs[name]}: sequences / size {tuple(c.data.sequences)} {tuple(c.data.size)} differ "
                             f"from {seqs} {size}")
        modes = ("late",) if c.pretrain.context == "target" else ("mask", "template")
        for mode in modes:
            rows[f"{name} ({mode})"] = score_encoder(Encoder(model, params, mode), train, val, test, findings, seqs,
                                                     copies=copies, seed=seed)
    if random:
        model, params, c = next(v for v in loaded.values())
        rand = model.init(jax.random.key(seed + 17))
        rows["random init (mask)"] = score_encoder(Encoder(model, rand, "mask"), train, val, test, findings, seqs,
                                                   copies=copies, seed=seed)
    if arrays and "multi-sequence" in loaded:
        import os

        os.makedirs(arrays, exist_ok=True)
        model, params, c = loaded["multi-sequence"]
        np.savez_compressed(os.path.join(arrays, "examples.npz"), **examples(model, params, c, test, seed=seed))
    multi = next((v for k, v in rows.items() if k.startswith("multi-sequence (mask")), None)
    single = next((v for k, v in rows.items() if k.startswith("single-sequence")), None)
    res = {"sequences": list(seqs), "findings": list(findings), "data": data,
           "studies": {"train": int(len(train["present"])), "val": int(len(val["present"])),
                       "test_complete": int(len(test["present"]))},
           "rows": rows}
    if multi and single:
        res["criteria"] = graceful(multi, single, seqs)
        tmpl = rows.get("multi-sequence (template)")
        if tmpl:
            res["criteria_template"] = graceful(tmpl, single, seqs)
    return res


def summary(r: dict) -> list[str]:
    seqs = r["sequences"]
    lines = [f"multi-parametric findings ({', '.join(r['findings'])}; mean test AUROC over "
             f"{r['studies']['test_complete']} complete test studies) by sequences present:"]
    for name, row in r["rows"].items():
        cells = ", ".join(f"{k}: {v:.3f}" for k, v in row["by_size"].items())
        lines.append(f"  {name}: {cells}")
    c = r.get("criteria")
    if c:
        lines.append(f"  all {len(seqs)} sequences {c['all_sequences']:.3f} against the best single-sequence encoder "
                     f"({c['best_single_sequence']}) {c['best_single']:.3f}: "
                     f"{'beats it' if c['beats_best_single'] else 'does not beat it'}; graceful degradation "
                     f"{'holds' if c['graceful'] else 'does not hold'}")
    return lines
