"""Retrieval metrics on hand-made similarity matrices."""

import numpy as np
import pytest

from decipher_jax.eval import retrieval


def test_ranks_recall_mrr_by_hand():
    sim = np.array([[0.9, 0.1, 0.5],    # positive (col 0) first: rank 0
                    [0.8, 0.2, 0.6],    # positive col 1 behind two: rank 2
                    [0.3, 0.7, 0.4]])   # positive col 2 behind col 1: rank 1
    pos = np.eye(3, dtype=bool)
    np.testing.assert_array_equal(retrieval.ranks(sim, pos), [0, 2, 1])
    m = retrieval.scores(sim, pos, ks=(1, 2))
    assert m["R@1"] == pytest.approx(1 / 3) and m["R@2"] == pytest.approx(2 / 3)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_multiple_positives_and_ties():
    # Row 0 has two positives; the better one (0.6) is behind one negative.
    sim = np.array([[0.2, 0.6, 0.9, 0.1]])
    pos = np.array([[True, True, False, False]])
    assert retrieval.ranks(sim, pos)[0] == 1
    # Ties count against the query: a collapsed encoder is at the bottom, not the top.
    flat = np.zeros((2, 4))
    np.testing.assert_array_equal(retrieval.ranks(flat, np.eye(2, 4, dtype=bool)), [3, 3])
    with pytest.raises(ValueError, match="no positive"):
        retrieval.ranks(sim, np.zeros_like(pos))


def test_evaluate_pairs_series_and_study_level():
    # Three studies: A has two series, B one, C one. Reports (text) equal within a study.
    e = np.eye(3)
    text = np.stack([e[0], e[0], e[1], e[2]])
    image = np.stack([e[0], e[1] * 0.9 + e[0] * 0.1, e[1], e[2]])  # series A2 looks like B
    m = retrieval.evaluate_pairs(image, text, ["A", "A", "B", "C"], ks=(1, 2))
    assert m["n_series"] == 4 and m["n_studies"] == 3
    assert m["i2t_series/R@1"] == pytest.approx(3 / 4)  # A2 retrieves B's report first
    assert m["i2t_series/R@2"] == pytest.approx(1.0)
    # Report -> image: A's report finds A1 (one of its positives) first.
    assert m["t2i_series/R@1"] == pytest.approx(1.0)
    # Study level: mean of A's series is still closest to A's report.
    assert m["i2t_study/R@1"] == pytest.approx(1.0)
    assert m["chance_study_R@1"] == pytest.approx(1 / 3)


# -- token-level re-ranking ---------------------------------------------------------------------------

def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_late_interaction_matches_loop(rng):
    from decipher_jax.eval.retrieval import late_interaction

    patches, tokens = _unit(rng.normal(size=(5, 7, 4))), _unit(rng.normal(size=(5, 6, 4)))
    mask = rng.random((5, 6)) < 0.7
    mask[:, 0] = True
    ours = np.asarray(late_interaction(patches, tokens, mask))
    ref = [np.mean([max(patches[b, n] @ tokens[b, t] for n in range(7)) for t in range(6) if mask[b, t]])
           for b in range(5)]
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_rerank_reorders_only_the_top_k(rng):
    from decipher_jax.eval.retrieval import late_interaction, rerank

    q, g, k = 6, 9, 4
    sim = rng.normal(size=(q, g)).astype(np.float32)
    patches, tokens = _unit(rng.normal(size=(q, 5, 3))), _unit(rng.normal(size=(g, 4, 3)))
    mask = np.ones((g, 4), bool)
    new = np.asarray(rerank(sim, patches, tokens, mask, k=k, weight=2.0))
    for i in range(q):
        top = np.argsort(-sim[i])[:k]
        fine = np.asarray(late_interaction(patches[i][None], tokens[top], mask[top]))
        expect_top = top[np.argsort(-(sim[i, top] + 2.0 * fine), kind="stable")]
        rest = np.argsort(-sim[i])[k:]
        np.testing.assert_array_equal(np.argsort(-new[i], kind="stable"), np.concatenate([expect_top, rest]))


def test_rerank_fixes_a_first_stage_confusion():
    """Two reports with the same global embedding; only the words tell them apart."""
    from decipher_jax.eval import retrieval

    d = 4
    e = np.eye(d)
    # Global: both images look equally like both reports (tie: the positive loses under ranks()).
    img = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    txt = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    # Patches: image 0 has a patch like word "infarct" (e1), image 1 like word "mass" (e2).
    patches = np.stack([np.stack([e[0], e[1]]), np.stack([e[0], e[2]])])
    tokens = np.stack([np.stack([e[1], e[3]]), np.stack([e[2], e[3]])])
    pairs = {"image": img, "text": txt, "study_id": np.array(["A", "B"]), "patch": patches, "tokens": tokens,
             "token_mask": np.array([[True, False], [True, False]])}
    res = retrieval.evaluate_rerank(pairs, k=2, weight=1.0, ks=(1,))
    assert res["first_stage"]["i2t_series/R@1"] == 0.0  # ties count against the model
    assert res["reranked"]["i2t_series/R@1"] == 1.0
