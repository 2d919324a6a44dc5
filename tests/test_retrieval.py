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
