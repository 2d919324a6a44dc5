"""Light heads on frozen features as pure functions: logistic and ridge probes, kNN, metrics.

A probe is ``init(key, dim, classes) -> params`` and ``apply(params, x) -> logits``; fitting is a
pure full-batch function of (features, labels, sample weights, regularisation), so a sweep over
tasks x regularisation x seeds x label fractions x CV folds is one ``jax.vmap`` of it, with the
feature matrix shared (not copied) across probes:

    fit = jax.jit(jax.vmap(fit_logistic, in_axes=(None, 0, 0, 0, 0)))
    params = fit(x, labels, weights, inv_reg, class_masks)     # (P, ...) probes at once

Subsets (label fractions, seeds) and CV folds are sample-weight masks, so every probe has the
same shapes. Tasks with fewer classes than the widest one mask the unused logits.

Logistic regression minimises ``mean_w CE + ||W||^2 / (2 C n_w)`` (``n_w`` = total weight), i.e.
scikit-learn's ``C * sum CE + ||W||^2 / 2`` for multinomial problems, with L-BFGS (Armijo
backtracking) for a fixed number of iterations, all probes in lockstep. With two classes the softmax has two weight vectors whose
difference is scikit-learn's binary ``w``: that matches its binary fit with ``2 C``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e9


# -- the probe --------------------------------------------------------------------------------

def init(key, dim: int, classes: int) -> dict:
    del key  # zero init: the problems are convex
    return {"w": jnp.zeros((dim, classes), jnp.float32), "b": jnp.zeros((classes,), jnp.float32)}


def apply(params, x, class_mask=None):
    logits = x.astype(jnp.float32) @ params["w"] + params["b"]
    return logits if class_mask is None else jnp.where(class_mask, logits, NEG)


def logistic_objective(params, x, y, weight, inv_reg, class_mask):
    logp = jax.nn.log_softmax(apply(params, x, class_mask), axis=-1)
    ce = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
    n = jnp.maximum(weight.sum(), 1e-12)
    return (weight * ce).sum() / n + jnp.sum(jnp.square(params["w"])) / (2.0 * inv_reg * n)


def fit_logistic(x, y, weight, inv_reg, class_mask, *, iters: int = 100):
    """One multinomial logistic probe (pure).

    ``x`` (n, d) standardised features; ``y`` (n,) int labels; ``weight`` (n,) >= 0 (0 drops a
    row: subsets and CV folds); ``inv_reg`` scikit-learn's ``C``; ``class_mask`` (K,) bool.
    Many probes at once: :func:`fit_many` (the same optimiser over a leading probe axis).
    """
    one = fit_many(x, y[None], weight[None], jnp.asarray(inv_reg)[None], class_mask[None], iters=iters)
    return jax.tree.map(lambda a: a[0], one)


def _objectives(theta, x, ys, ws, inv_regs, masks):
    """Per-probe objectives of flat parameters ``theta`` (P, d*K + K)."""
    p, k = masks.shape
    d = x.shape[1]
    w, b = theta[:, : d * k].reshape(p, d, k), theta[:, d * k:]
    logits = jnp.einsum("nd,pdk->pnk", x, w) + b[:, None, :]  # one matmul of x with every probe
    logp = jax.nn.log_softmax(jnp.where(masks[:, None, :], logits, NEG), axis=-1)
    ce = -jnp.take_along_axis(logp, ys[..., None], axis=2)[..., 0]
    n = jnp.maximum(ws.sum(1), 1e-12)
    return (ws * ce).sum(1) / n + jnp.sum(jnp.square(w), axis=(1, 2)) / (2.0 * inv_regs * n)


def lbfgs(value_and_grads, theta, iters: int, memory: int = 10, max_backtracks: int = 12):
    """L-BFGS over a batch of independent problems in lockstep (``theta``: (P, N)).

    ``value_and_grads(theta) -> ((P,), (P, N))``. All problems share the iteration counter, so the
    history ring buffer is indexed by one scalar, not per lane as under a ``jax.vmap`` of
    ``optax.lbfgs``, whose line search also waits for the slowest lane (BENCHMARKS.md,
    "Linear-probe sweeps"). Armijo backtracking from the unit step, per problem.
    """
    v, g = value_and_grads(theta)
    hist_s = jnp.zeros((memory,) + theta.shape, theta.dtype)
    hist_y = jnp.zeros_like(hist_s)
    rho = jnp.zeros((memory, theta.shape[0]), theta.dtype)
    dot = lambda a, b: jnp.sum(a * b, axis=-1)  # noqa: E731

    def direction(g, hist_s, hist_y, rho, k):
        n_valid = jnp.minimum(k, memory)

        def back(j, carry):
            q, alphas = carry
            i = (k - 1 - j) % memory
            ok = j < n_valid
            a = jnp.where(ok, rho[i] * dot(hist_s[i], q), 0.0)
            return q - a[:, None] * hist_y[i], alphas.at[i].set(a)

        q, alphas = jax.lax.fori_loop(0, memory, back, (g, jnp.zeros_like(rho)))
        last = (k - 1) % memory
        sy, yy = dot(hist_s[last], hist_y[last]), dot(hist_y[last], hist_y[last])
        first = 1.0 / jnp.maximum(jnp.linalg.norm(g, axis=-1), 1.0)  # first step: a short gradient step
        gamma = jnp.where((k > 0) & (yy > 0), sy / jnp.maximum(yy, 1e-30), first)
        r = gamma[:, None] * q

        def fwd(j, r):
            i = (k - n_valid + j) % memory
            ok = j < n_valid
            beta = rho[i] * dot(hist_y[i], r)
            return r + jnp.where(ok, alphas[i] - beta, 0.0)[:, None] * hist_s[i]

        return -jax.lax.fori_loop(0, memory, fwd, r)

    def step(carry, _):
        theta, v, g, hist_s, hist_y, rho, k = carry
        d = direction(g, hist_s, hist_y, rho, k)
        slope = dot(g, d)
        d = jnp.where((slope < 0)[:, None], d, -g)  # not a descent direction: fall back to -g
        slope = dot(g, d)

        def cond(c):
            t, v_new, _, ok, trips = c
            return jnp.any(~ok) & (trips < max_backtracks)

        def body(c):
            t, v_new, g_new, ok, trips = c
            t = jnp.where(ok, t, t * 0.5)
            vt, gt = value_and_grads(theta + t[:, None] * d)
            # Armijo, with float32 slack: at the optimum no step decreases the value measurably,
            # and waiting for one would make every lane pay max_backtracks evaluations.
            good = ok | (vt <= v + 1e-4 * t * slope + 2e-7 * jnp.abs(v))
            return (t, jnp.where(ok, v_new, vt), jnp.where(ok[:, None], g_new, gt), good, trips + 1)

        t0 = jnp.full_like(v, 2.0)  # the first trip halves it to the unit step
        t, v_new, g_new, ok, _ = jax.lax.while_loop(
            cond, body, (t0, v, g, jnp.zeros(v.shape, bool), jnp.zeros([], jnp.int32)))
        t = jnp.where(ok, t, 0.0)  # no decrease found: stay
        v_new = jnp.where(ok, v_new, v)
        g_new = jnp.where(ok[:, None], g_new, g)
        s, yv = t[:, None] * d, g_new - g
        sy = dot(s, yv)
        i = k % memory
        keep = sy > 1e-10
        hist_s = hist_s.at[i].set(jnp.where(keep[:, None], s, 0.0))
        hist_y = hist_y.at[i].set(jnp.where(keep[:, None], yv, 0.0))
        rho = rho.at[i].set(jnp.where(keep, 1.0 / jnp.where(keep, sy, 1.0), 0.0))
        return (theta + s, v_new, g_new, hist_s, hist_y, rho, k + 1), v_new

    carry = (theta, v, g, hist_s, hist_y, rho, jnp.zeros([], jnp.int32))
    (theta, *_), values = jax.lax.scan(step, carry, None, length=iters)
    return theta, values


def fit_ridge(x, y_targets, weight, lam):
    """Weighted ridge regression with an unpenalised intercept (closed form; vmappable).

    ``y_targets`` (n, K): one-hot in {-1, +1} for classification (big_vision's few-shot
    evaluator) or real targets (age). Minimises ``sum_i w_i ||x_i W + b - y_i||^2 + lam ||W||^2``.
    """
    n_w = jnp.maximum(weight.sum(), 1e-12)
    mx = (weight[:, None] * x).sum(0) / n_w
    my = (weight[:, None] * y_targets).sum(0) / n_w
    xc, yc = x - mx, y_targets - my
    xw = xc * weight[:, None]
    a = xw.T @ xc + lam * jnp.eye(x.shape[1], dtype=x.dtype)
    w = jnp.linalg.solve(a, xw.T @ yc)
    return {"w": w, "b": my - mx @ w}


# -- kNN -----------------------------------------------------------------------------------------

def knn_scores(train_x, train_y, test_x, num_classes: int, k: int = 20, temperature: float = 0.07):
    """DINO's weighted kNN: cosine similarity, top-k neighbours, votes ``exp(s / T)``; (m, K) scores."""
    a = train_x / jnp.maximum(jnp.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    q = test_x / jnp.maximum(jnp.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
    sim, idx = jax.lax.top_k(q @ a.T, min(k, a.shape[0]))
    votes = jax.nn.one_hot(train_y[idx], num_classes) * jnp.exp(sim / temperature)[..., None]
    return votes.sum(1)


# -- metrics --------------------------------------------------------------------------------------

def auroc(scores, y) -> float:
    """Binary AUROC (Mann-Whitney U with average ranks for ties); nan if one class is absent."""
    scores, y = np.asarray(scores, np.float64), np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def macro_auroc(probs, y, num_classes: int) -> float:
    """One-vs-rest AUROC averaged over the classes present (binary: the positive class)."""
    probs, y = np.asarray(probs), np.asarray(y)
    if num_classes == 2:
        return auroc(probs[:, 1], y == 1)
    vals = [auroc(probs[:, c], y == c) for c in range(num_classes)]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def balanced_accuracy(pred, y) -> float:
    pred, y = np.asarray(pred), np.asarray(y)
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    return float(np.mean(recalls))


def mae(pred, y) -> float:
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - np.asarray(y, np.float64))))


# -- standardisation, subsets, folds -------------------------------------------------------------

def standardise(train_x, *others):
    """Scales by the training features' mean / std (same transform for the other sets)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    return tuple((np.asarray(v, np.float32) - mu) / sd for v in (train_x,) + others)


def subset_mask(y, fraction: float, seed: int, *, min_per_class: int = 1, groups=None) -> np.ndarray:
    """A stratified random subset of ``fraction`` of the rows (at least ``min_per_class`` each).

    With ``groups`` (one id per row, e.g. the patient), whole groups are drawn: ``fraction`` of
    the patients with all their rows, as labelling a patient labels all their series; a class
    the draw leaves under ``min_per_class`` rows gets further patients that have it."""
    y = np.asarray(y)
    r = np.random.default_rng(seed)
    if groups is None:
        keep = np.zeros(len(y), bool)
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            n = max(min_per_class, int(round(fraction * len(idx))))
            keep[r.choice(idx, size=min(n, len(idx)), replace=False)] = True
        return keep
    groups = np.asarray(groups)
    names = np.unique(groups)
    chosen = set(r.choice(names, size=max(1, int(round(fraction * len(names)))), replace=False).tolist())
    keep = np.isin(groups, list(chosen))
    for c in np.unique(y):
        while np.sum(keep & (y == c)) < min_per_class:
            have = [g for g in np.unique(groups[y == c]).tolist() if g not in chosen]
            if not have:
                break
            g = have[int(r.integers(len(have)))]
            chosen.add(g)
            keep |= groups == g
    return keep


def metadata_labels(train_values, test_values) -> tuple[np.ndarray, np.ndarray, int]:
    """String metadata -> class ids (classes seen in training, sorted; "" is no label) and the
    class count; rows without a known class get -1."""
    classes = sorted(set(train_values) - {""})
    index = {c: i for i, c in enumerate(classes)}
    ids = lambda vals: np.array([index.get(v, -1) for v in vals])  # noqa: E731
    return ids(train_values), ids(test_values), len(classes)


def fold_ids(n: int, folds: int, seed: int, groups=None) -> np.ndarray:
    """The CV fold of each of ``n`` rows. With ``groups`` (one id per row, e.g. the patient)
    all rows of a group share a fold, so no validation fold holds a patient seen in training:
    a study's series share their labels and much of their features, and folds that split them
    reward memorising the study and pick too weak a penalty."""
    rng = np.random.default_rng(seed + 10_000)
    if groups is None:
        return rng.permutation(n) % folds
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"cv groups: {len(groups)} ids for {n} rows")
    _, inv = np.unique(groups.astype(str), return_inverse=True)
    return (rng.permutation(int(inv.max()) + 1) % folds)[inv]


# -- sweeps ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    train_y: np.ndarray  # (n,) int class ids
    test_y: np.ndarray
    val_y: np.ndarray | None = None  # (n_val,) class ids of the sweep's ``val_x`` rows, -1 = not in the task

    @property
    def num_classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1


@functools.partial(jax.jit, static_argnames=("iters",))
def _fit_many(x, ys, ws, inv_regs, masks, iters: int):
    p, k = masks.shape
    d = x.shape[1]

    def vg(theta):
        v, pull = jax.vjp(lambda t: _objectives(t, x, ys, ws, inv_regs, masks), theta)
        return v, pull(jnp.ones_like(v))[0]

    theta, _ = lbfgs(vg, jnp.zeros((p, d * k + k), jnp.float32), iters)
    return {"w": theta[:, : d * k].reshape(p, d, k), "b": theta[:, d * k:]}


def fit_many(x, ys, weights, inv_regs, class_masks, *, iters: int = 100):
    """P logistic probes at once: ``ys``, ``weights`` (P, n), ``inv_regs`` (P,), ``class_masks`` (P, K).

    One jitted call; the feature matrix is shared, each L-BFGS iteration is one batched matmul
    of it with every probe's weights (the ``jax.vmap`` of :func:`apply` over probes)."""
    return _fit_many(jnp.asarray(x, jnp.float32), jnp.asarray(ys, jnp.int32), jnp.asarray(weights, jnp.float32),
                     jnp.asarray(inv_regs, jnp.float32), jnp.asarray(class_masks, bool), iters)


_APPLY = jax.jit(jax.vmap(apply, in_axes=(0, None, 0)))


def _selection_rows(xtr, xva, subs, seeds, folds: int, cv_groups, val_ok):
    """Where each group's probes are fitted and scored when its penalty is chosen:
    ``(x, folds, fit(g, f), scored(g, f))`` with boolean row masks over ``x``. Without ``xva``,
    ``folds`` CV folds inside group ``g``'s subset ``subs[g]`` (drawn by ``cv_groups``, seed
    ``seeds[g]``). With it, one "fold": the subset fits, and the held-out rows ``val_ok(g)``,
    appended after the training rows with weight 0 in the fit, are scored."""
    n = len(xtr)
    if xva is not None:
        pad, none = np.zeros(len(xva), bool), np.zeros(n, bool)
        return (np.concatenate([xtr, xva]), 1, lambda g, f: np.concatenate([subs[g], pad]),
                lambda g, f: np.concatenate([none, val_ok(g)]))
    fids = [fold_ids(n, folds, seed, cv_groups) for seed in seeds]
    return xtr, folds, lambda g, f: subs[g] & (fids[g] != f), lambda g, f: subs[g] & (fids[g] == f)


def _choose(scores, *, higher_better: bool, one_se: bool, strongest_first: bool):
    """``(mean score (G, P), chosen index (G,))`` from per-row validation scores ``scores[g][p]``
    (correctness or absolute error of every scored row, pooled over folds; grid ``p`` ordered
    from the strongest penalty when ``strongest_first``, else from the weakest). The best mean,
    or with ``one_se`` the strongest penalty whose mean is within one standard error of the
    best (glmnet's ``lambda.1se``): a small validation set's best is partly its noise, and a
    target the features do not carry should fall back to the strongest penalty, not to a
    lucky weak one."""
    g, p = len(scores), len(scores[0])
    mean = np.full((g, p), -np.inf if higher_better else np.inf)
    se = np.zeros((g, p))
    for i in range(g):
        for j in range(p):
            v = np.asarray(scores[i][j], np.float64)
            if v.size:
                mean[i, j], se[i, j] = v.mean(), v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0
    signed = mean if higher_better else -mean
    best = signed.argmax(1)
    if one_se:
        order = range(p) if strongest_first else range(p - 1, -1, -1)
        for i in range(g):
            floor = signed[i, best[i]] - se[i, best[i]]
            best[i] = next(j for j in order if signed[i, j] >= floor)
    return mean, best


def logistic_sweep(train_x, test_x, tasks: Sequence[Task], *, inv_regs=tuple(10.0 ** np.arange(-3, 3)),
                   fractions=(1.0,), seeds=(0,), folds: int = 3, iters: int = 100, return_scores: bool = False,
                   cv_groups=None, val_x=None, one_se: bool = True, train_rows=None):
    """Logistic probes for every task x label fraction x seed, C chosen by ``folds``-fold CV, or
    with ``val_x`` (and each task's ``val_y``) on those held-out rows. ``train_rows`` (a boolean
    mask): only these training rows are fitted (e.g. one sex, for a cross-group test); the
    others keep the arrays' shapes, so the compiled fits are shared with the full sweep.
    ``cv_groups`` (e.g. the patient of each training row): CV folds and label-fraction subsets
    are drawn by patient (:func:`fold_ids`, :func:`subset_mask`).

    The selection score is the held-out log-likelihood (multinomial deviance, as glmnet's
    ``cv.glmnet``), with ``one_se`` the smallest C within one standard error of the best (see
    ``_choose``), else the best. Held-out selection is the protocol for an encoder
    pretrained on the probes' training rows:
    its features of those rows can hold what their reports said (age, findings), which CV on
    them reads as signal and the test rows do not have (``eval.suite``).

    Two vmapped calls in all: one fits every (task, fraction, seed, C, fold) probe for the CV,
    one refits the chosen C per (task, fraction, seed) on its whole subset. Returns one row
    per (task, fraction, seed) with the chosen C, its held-out log-loss and accuracy and the
    number of held-out rows they average (``n_selection``), test AUROC and balanced accuracy (and, with
    ``return_scores``, also each row's test class probabilities: ``(rows, [(n_test, K), ...])``).
    """
    held = val_x is not None
    xtr, xte, *xva = standardise(np.asarray(train_x), np.asarray(test_x), *([np.asarray(val_x)] if held else []))
    k_max = max(t.num_classes for t in tasks)
    groups = list(itertools.product(range(len(tasks)), fractions, seeds))
    # Per (task, fraction, seed): its label subset, selection folds and class mask, computed once.
    subs = [subset_mask(tasks[ti].train_y, frac, seed, groups=cv_groups) for ti, frac, seed in groups]
    if train_rows is not None:
        subs = [sub & np.asarray(train_rows, bool) for sub in subs]
    cmask = [np.arange(k_max) < tasks[ti].num_classes for ti, _, _ in groups]
    x_sel, folds, fit_w, val_w = _selection_rows(xtr, xva[0] if held else None, subs, [sd for _, _, sd in groups],
                                                 folds, cv_groups, lambda gi: tasks[groups[gi][0]].val_y >= 0)
    # Labels of the selection rows (held-out rows outside a task are never scored: any id will do).
    y_sel = [np.concatenate([t.train_y, np.maximum(t.val_y, 0)]) if held else t.train_y for t in tasks]
    meta = [(gi, ci, f) for gi in range(len(groups)) for ci in range(len(inv_regs)) for f in range(folds)]
    params = fit_many(x_sel, np.stack([y_sel[groups[gi][0]] for gi, _, _ in meta]),
                      np.stack([fit_w(gi, f).astype(np.float32) for gi, _, f in meta]),
                      np.asarray([inv_regs[ci] for _, ci, _ in meta]), np.stack([cmask[gi] for gi, _, _ in meta]),
                      iters=iters)
    logits = np.asarray(_APPLY(params, jnp.asarray(x_sel), jnp.asarray(np.stack([cmask[gi] for gi, _, _ in meta]))))
    # Per (group, C), every scored row's log-likelihood of its class (the selection score:
    # glmnet's multinomial deviance) and its correctness (reported).
    loglik = [[[] for _ in inv_regs] for _ in groups]
    hits = [[[] for _ in inv_regs] for _ in groups]
    for p, (gi, ci, f) in enumerate(meta):
        y, val = y_sel[groups[gi][0]], val_w(gi, f)
        lg = logits[p][val]
        logp = lg - lg.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        loglik[gi][ci] += list(logp[np.arange(len(lg)), y[val]])
        hits[gi][ci] += list(lg.argmax(1) == y[val])
    cv_ll, best = _choose(loglik, higher_better=True, one_se=one_se, strongest_first=True)
    cv = _choose(hits, higher_better=True, one_se=False, strongest_first=True)[0]
    params = fit_many(xtr, np.stack([tasks[ti].train_y for ti, _, _ in groups]), np.stack(subs).astype(np.float32),
                      np.asarray([inv_regs[b] for b in best]), np.stack(cmask), iters=iters)
    logits = np.asarray(_APPLY(params, jnp.asarray(xte), jnp.asarray(np.stack(cmask))))
    rows, scores = [], []
    for gi, (ti, frac, seed) in enumerate(groups):
        t = tasks[ti]
        lg = logits[gi][:, : t.num_classes]
        probs = np.exp(lg - lg.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        scores.append(probs)
        rows.append({"task": t.name, "head": "logistic", "fraction": frac, "seed": seed,
                     "C": float(inv_regs[best[gi]]), "cv_accuracy": float(cv[gi, best[gi]]),
                     "cv_log_loss": float(-cv_ll[gi, best[gi]]), "n_selection": len(loglik[gi][best[gi]]),
                     "selection": "val" if held else f"{folds}-fold CV", "rule": "1-SE" if one_se else "best",
                     "n_train": int(subs[gi].sum()), "auroc": macro_auroc(probs, t.test_y, t.num_classes),
                     "balanced_accuracy": balanced_accuracy(lg.argmax(1), t.test_y),
                     "accuracy": float(np.mean(lg.argmax(1) == t.test_y))})
    return (rows, scores) if return_scores else rows


_FIT_RIDGE = jax.jit(jax.vmap(fit_ridge, in_axes=(None, 0, 0, 0)))
_PREDICT_RIDGE = jax.jit(jax.vmap(lambda p, x: x @ p["w"][:, 0] + p["b"][0], in_axes=(0, None)))  # (P, n)


def ridge_sweep(train_x, test_x, name: str, train_y, test_y, *, lams=tuple(10.0 ** np.arange(-1, 7)),
                fractions=(1.0,), seeds=(0,), folds: int = 3, return_scores: bool = False, cv_groups=None,
                val_x=None, val_y=None, one_se: bool = True, train_rows=None):
    """Ridge regression probes of a real target (age) for every label fraction x seed, the
    penalty chosen by ``folds``-fold CV (mean absolute error; folds and subsets by ``cv_groups``)
    or, with ``val_x`` / ``val_y`` (NaN = no target), on those held-out rows; with ``one_se`` the
    largest penalty within one standard error of the best MAE:
    two vmapped closed-form calls, as :func:`logistic_sweep`. Returns one row per (fraction,
    seed) with the chosen penalty, test MAE and R^2 (and the MAE of predicting the training
    mean, the floor to beat); with ``return_scores`` also each row's test predictions. The
    default grid ends at penalties that leave little but the intercept (the training mean), so
    CV can fall back to the floor when the features carry no signal of the target."""
    held = val_x is not None
    xtr, xte, *xva = standardise(np.asarray(train_x), np.asarray(test_x), *([np.asarray(val_x)] if held else []))
    ytr, yte = np.asarray(train_y, np.float32), np.asarray(test_y, np.float32)
    n = len(xtr)
    groups = list(itertools.product(fractions, seeds))
    # A regression target is one "class" to subset_mask: a plain random subset, at least 2 rows.
    subs = [subset_mask(np.zeros(n), frac, seed, min_per_class=2, groups=cv_groups) for frac, seed in groups]
    if train_rows is not None:  # as logistic_sweep: fit these rows only
        subs = [sub & np.asarray(train_rows, bool) for sub in subs]
    yva = np.asarray(val_y, np.float32) if held else None
    x_sel, folds, fit_w, val_w = _selection_rows(xtr, xva[0] if held else None, subs, [sd for _, sd in groups],
                                                 folds, cv_groups, lambda gi: np.isfinite(yva))
    y_sel = np.concatenate([ytr, np.nan_to_num(yva)]) if held else ytr  # NaN rows are never scored
    meta = [(gi, li, f) for gi in range(len(groups)) for li in range(len(lams)) for f in range(folds)]
    targets = jnp.asarray(np.broadcast_to(y_sel[None, :, None], (len(meta), len(y_sel), 1)))
    params = _FIT_RIDGE(jnp.asarray(x_sel), targets,
                        jnp.asarray(np.stack([fit_w(gi, f) for gi, _, f in meta]), jnp.float32),
                        jnp.asarray([lams[li] for _, li, _ in meta], jnp.float32))
    pred = np.asarray(_PREDICT_RIDGE(params, jnp.asarray(x_sel)))
    errs = [[[] for _ in lams] for _ in groups]  # per (group, penalty): absolute error of every scored row
    for p, (gi, li, f) in enumerate(meta):
        val = val_w(gi, f)
        errs[gi][li] += list(np.abs(pred[p][val] - y_sel[val]))
    cv, best = _choose(errs, higher_better=False, one_se=one_se, strongest_first=False)
    params = _FIT_RIDGE(jnp.asarray(xtr), jnp.asarray(np.broadcast_to(ytr[None, :, None], (len(groups), n, 1))),
                        jnp.asarray(np.stack(subs), jnp.float32), jnp.asarray([lams[b] for b in best], jnp.float32))
    pred = np.asarray(_PREDICT_RIDGE(params, jnp.asarray(xte)))
    rows = []
    for gi, (frac, seed) in enumerate(groups):
        resid = np.sum((pred[gi] - yte) ** 2)
        rows.append({"task": name, "head": "ridge", "fraction": frac, "seed": seed, "lambda": float(lams[best[gi]]),
                     "cv_mae": float(cv[gi, best[gi]]), "n_selection": len(errs[gi][best[gi]]),
                     "selection": "val" if held else f"{folds}-fold CV",
                     "rule": "1-SE" if one_se else "best",
                     "n_train": int(subs[gi].sum()), "mae": mae(pred[gi], yte),
                     "mae_of_mean": mae(np.full_like(yte, ytr[subs[gi]].mean()), yte),
                     "r2": float(1.0 - resid / max(np.sum((yte - yte.mean()) ** 2), 1e-12))})
    return (rows, list(pred)) if return_scores else rows
