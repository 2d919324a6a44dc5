"""Image <-> report retrieval metrics on similarity matrices (R@k, MRR), series and study level.

A query may have several positives (every series of a study matches the study's report). The
rank of a query is the number of *negatives* scoring at least as high as its best positive:
ties count against the model, so a collapsed encoder (all scores equal) gets chance-level
numbers rather than perfect ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def ranks(sim, pos) -> np.ndarray:
    """0-based rank of the best positive of each query row of ``sim`` (Q, G); ``pos`` (Q, G) bool."""
    sim, pos = np.asarray(sim, np.float64), np.asarray(pos, bool)
    if sim.shape != pos.shape:
        raise ValueError(f"similarity {sim.shape} and positives {pos.shape} differ in shape")
    if not pos.any(1).all():
        raise ValueError(f"{int((~pos.any(1)).sum())} queries have no positive in the gallery")
    best = np.where(pos, sim, -np.inf).max(1)
    return ((sim >= best[:, None]) & ~pos).sum(1)


def scores(sim, pos, ks=(1, 5, 10), prefix: str = "") -> dict:
    r = ranks(sim, pos)
    out = {f"{prefix}R@{k}": float(np.mean(r < k)) for k in ks}
    out[f"{prefix}MRR"] = float(np.mean(1.0 / (r + 1)))
    return out


def normalise(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def group_mean(emb, groups):
    """Mean of L2-normalised rows per group (first-appearance order), renormalised; and the groups."""
    groups = np.asarray(groups)
    uniq, first, inv = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first)  # first-appearance order
    emb = normalise(emb)
    sums = np.zeros((len(uniq), emb.shape[1]))
    np.add.at(sums, inv, emb)
    return normalise(sums[order]), uniq[order]


def studies(study_ids) -> tuple[np.ndarray, np.ndarray]:
    """The report gallery: each study once, in first-appearance order, and its first row."""
    uniq, first = np.unique(np.asarray(study_ids), return_index=True)
    order = np.argsort(first)
    return uniq[order], first[order]


def evaluate_pairs(image, text, study_ids, ks=(1, 5, 10)) -> dict:
    """Retrieval between series embeddings ``image`` (N, d) and their reports ``text`` (N, d).

    Rows of one study carry the same report; the report gallery holds each study once.
    ``i2t_series``: every series queries the reports; ``t2i_series``: every report queries the
    series (all series of its study are positives); ``*_study``: series embeddings averaged per
    study, one positive each. Chance for R@k at study level is k / n_studies.
    """
    study_ids = np.asarray(study_ids)
    uniq, first = studies(study_ids)
    img, txt = normalise(image), normalise(np.asarray(text)[first])
    pos = study_ids[:, None] == uniq[None, :]
    sim = img @ txt.T
    out = {"n_series": int(len(study_ids)), "n_studies": int(len(uniq))}
    out |= scores(sim, pos, ks, "i2t_series/") | scores(sim.T, pos.T, ks, "t2i_series/")
    img_s, groups = group_mean(img, study_ids)
    assert (groups == uniq).all()
    eye = np.eye(len(uniq), dtype=bool)
    out |= scores(img_s @ txt.T, eye, ks, "i2t_study/") | scores(txt @ img_s.T, eye, ks, "t2i_study/")
    out |= {f"chance_study_R@{k}": min(1.0, k / len(uniq)) for k in ks}
    return out


# -- second stage: token-level re-ranking of the top k ------------------------------------------------

def late_interaction(patches, tokens, token_mask):
    """Patch-to-word similarity (ColBERT's MaxSim, image side): for every valid report token its
    best-matching patch, averaged over tokens. ``patches`` (..., N, d), ``tokens`` (..., T, d),
    ``token_mask`` (..., T); all embeddings L2-normalised."""
    best = jnp.einsum("...nd,...td->...tn", patches, tokens).max(-1)
    m = token_mask.astype(best.dtype)
    return (best * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)


@functools.partial(jax.jit, static_argnames=("k",))
def rerank(sim, patches, tokens, token_mask, *, k: int, weight: float = 1.0):
    """Re-scores each query's top ``k`` gallery items by ``sim + weight * late_interaction``.

    ``sim`` (Q, G) first-stage scores; ``patches`` (Q, N, d) per-query patch embeddings;
    ``tokens`` (G, T, d) and ``token_mask`` (G, T) per gallery report. Returns (Q, G) scores in
    which the re-scored top ``k`` stay above every other item (whose order is kept), so R@j for
    j <= k measures the re-ranker and the rest of the list is the first stage's.
    """
    sim = jnp.asarray(sim, jnp.float32)
    k = min(k, sim.shape[1])
    top_s, top_i = jax.lax.top_k(sim, k)  # (Q, k)
    fine = jax.vmap(late_interaction)(patches[:, None], tokens[top_i], token_mask[top_i])  # (Q, k)
    new = top_s + weight * fine
    floor = jnp.minimum(new.min(1, keepdims=True), sim.min(1, keepdims=True)) - 1.0
    below = sim - sim.max(1, keepdims=True) + floor  # everything else, in its first-stage order
    return jax.vmap(lambda row, idx, val: row.at[idx].set(val))(below, top_i, new)


def evaluate_rerank(pairs: dict, k: int = 5, weight: float = 1.0, ks=(1, 5)) -> dict:
    """Series-level image->report retrieval before and after token-level re-ranking of the top
    ``k``; ``pairs`` from :func:`decipher_jax.eval.embed.embed_pairs` with ``tokens=True``."""
    study_ids = np.asarray(pairs["study_id"])
    uniq, first = studies(study_ids)
    pos = study_ids[:, None] == uniq[None, :]
    sim = normalise(pairs["image"]) @ normalise(np.asarray(pairs["text"])[first]).T
    new = np.asarray(rerank(jnp.asarray(sim, jnp.float32), jnp.asarray(pairs["patch"], jnp.float32),
                            jnp.asarray(pairs["tokens"][first], jnp.float32), jnp.asarray(pairs["token_mask"][first]),
                            k=k, weight=weight))
    ks = tuple(j for j in ks if j <= k)
    return {"k": k, "weight": weight, "n_series": int(len(study_ids)), "n_studies": int(len(uniq)),
            "first_stage": scores(sim, pos, ks, "i2t_series/"), "reranked": scores(new, pos, ks, "i2t_series/")}


def tune_rerank(val_pairs: dict, test_pairs: dict, k: int = 5, weights=(0.25, 1.0, 4.0)) -> dict:
    """Chooses the re-ranker's weight by series-level R@1 on ``val_pairs`` (ties: the smaller
    weight), then evaluates it on ``test_pairs``; both results are returned."""
    val = {w: evaluate_rerank(val_pairs, k=k, weight=w) for w in weights}
    best = max(weights, key=lambda w: (val[w]["reranked"]["i2t_series/R@1"], -w))
    return {"weight": best, "val": {str(w): v["reranked"] for w, v in val.items()},
            "val_first_stage": val[best]["first_stage"], "test": evaluate_rerank(test_pairs, k=k, weight=best)}


def summary(m: dict) -> str:
    return (f"{m['n_studies']} studies / {m['n_series']} series; image->report R@1/5/10 "
            f"{m['i2t_series/R@1']:.2f}/{m['i2t_series/R@5']:.2f}/{m['i2t_series/R@10']:.2f} (series), "
            f"{m['i2t_study/R@1']:.2f}/{m['i2t_study/R@5']:.2f}/{m['i2t_study/R@10']:.2f} (study), "
            f"report->image R@5 {m['t2i_series/R@5']:.2f}; chance R@5 {m['chance_study_R@5']:.2f}")


def examples(image, text, study_ids, reports, n: int = 6, k: int = 3, **meta) -> list[dict]:
    """The top-``k`` reports retrieved for ``n`` series spread over the split (for reports)."""
    study_ids = np.asarray(study_ids)
    uniq, first = studies(study_ids)
    sim = normalise(image) @ normalise(np.asarray(text)[first]).T
    out = []
    for i in np.unique(np.linspace(0, len(study_ids) - 1, n).astype(int)):
        top = np.argsort(-sim[i])[:k]
        out.append({"study_id": str(study_ids[i]), "top_studies": [str(s) for s in uniq[top]],
                    "top_reports": [" ".join(str(reports[first[t]]).split()) for t in top],
                    **{key: str(v[i]) for key, v in meta.items()}})
    return out
