"""Dice and HD95 against MONAI's metrics on the same masks (real anatomy and random blobs)."""

import numpy as np
import pytest
import torch

from decipher_jax.eval import segmentation as S


def _blobs(rng, shape=(2, 24, 20, 16), classes=3):
    from scipy import ndimage

    lab = np.zeros(shape, int)
    for c in range(1, classes):
        noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(float), sigma=(0, 3, 3, 3))
        lab[noise > np.quantile(noise, 0.75)] = c
    return lab


def test_dice_and_hd95_match_monai(rng):
    from monai.metrics import DiceMetric, compute_hausdorff_distance

    gt = _blobs(rng)
    pred = gt.copy()
    pred[:, ::3] = _blobs(np.random.default_rng(9))[:, ::3]  # corrupt a third of the slices
    pred[1][pred[1] == 2] = 0  # sample 1: class 2 missing from the prediction
    gt[0][gt[0] == 1] = 0  # sample 0: class 1 absent from the ground truth
    p1, g1 = S.one_hot(pred, 3), S.one_hot(gt, 3)
    ours = np.asarray(S.dice(p1, g1))
    ref = DiceMetric(include_background=True, reduction="none")(torch.as_tensor(np.asarray(p1)),
                                                                  torch.as_tensor(np.asarray(g1))).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, equal_nan=True)
    assert np.isnan(ours[0, 1])
    hd = S.hd95(p1, g1)
    ref_hd = compute_hausdorff_distance(torch.as_tensor(np.asarray(p1)), torch.as_tensor(np.asarray(g1)),
                                        include_background=True, percentile=95).numpy()
    np.testing.assert_allclose(hd, ref_hd, rtol=1e-5, equal_nan=True)
    assert np.isnan(hd[1, 2]) and np.isfinite(hd[1, 0])


def test_dice_by_hand():
    g = np.zeros((1, 2, 4, 4, 4))
    g[0, 1, :2] = 1
    g[0, 0] = 1 - g[0, 1]
    p = np.zeros_like(g)
    p[0, 1, :1] = 1
    p[0, 0] = 1 - p[0, 1]
    d = np.asarray(S.dice(p, g, include_background=False))
    assert d.shape == (1, 1) and d[0, 0] == pytest.approx(2 * 16 / (16 + 32))
