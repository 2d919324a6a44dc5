"""Localisation scores by hand, and the heatmap upsampling."""

import numpy as np
import pytest

from decipher_jax.eval import localisation as L


def test_pointing_game_and_voxel_auroc_by_hand():
    mask = np.zeros((2, 4, 4, 4), np.uint8)
    mask[:, 1, 1, 1] = 1
    heat = np.zeros((2, 4, 4, 4))
    heat[0, 1, 1, 1] = 5.0  # sample 0 points at the lesion
    heat[1, 3, 3, 3] = 5.0  # sample 1 points elsewhere...
    heat[1, 1, 1, 1] = 1.0  # ...but ranks the lesion above every other voxel but one
    np.testing.assert_array_equal(L.pointing_game(heat, mask), [True, False])
    auc = L.voxel_auroc(heat, mask)
    assert auc[0] == pytest.approx(1.0)
    assert auc[1] == pytest.approx(62 / 63)  # one negative of 63 scores above the lesion


def test_upsample_is_trilinear_and_keeps_the_peak_region():
    grid = np.zeros((1, 4, 4, 4), np.float32)
    grid[0, 3, 0, 0] = 1.0
    up = np.asarray(L.upsample(grid, (32, 32, 32)))
    assert up.shape == (1, 32, 32, 32)
    peak = np.unravel_index(up[0].argmax(), up.shape[1:])
    assert peak[0] >= 24 and peak[1] < 8 and peak[2] < 8  # in the corner patch's voxels
    const = np.asarray(L.upsample(np.full((1, 4, 4, 4), 0.3, np.float32), (8, 8, 8)))
    np.testing.assert_allclose(const, 0.3, rtol=1e-6)
