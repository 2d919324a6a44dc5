"""Segmentation metrics: per-class Dice (JAX, batched) and HD95 (NumPy / SciPy), with MONAI's
conventions: one-hot ``(B, C, X, Y, Z)`` inputs; a class absent from the ground truth gives
NaN Dice (MONAI ``ignore_empty=True``); HD95 is the larger of the two directed 95th-percentile
surface distances between mask edges (MONAI ``compute_hausdorff_distance(percentile=95)``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def one_hot(labels, num_classes: int):
    """(B, X, Y, Z) int -> (B, C, X, Y, Z) float."""
    labels = jnp.asarray(labels)
    return jnp.moveaxis(jnp.eye(num_classes, dtype=jnp.float32)[labels], -1, 1)


def dice(pred_onehot, gt_onehot, include_background: bool = True):
    """(B, C) Dice per sample and class; NaN where the ground truth class is empty."""
    p, g = jnp.asarray(pred_onehot, jnp.float32), jnp.asarray(gt_onehot, jnp.float32)
    if not include_background:
        p, g = p[:, 1:], g[:, 1:]
    axes = tuple(range(2, p.ndim))
    inter = (p * g).sum(axes)
    denom = p.sum(axes) + g.sum(axes)
    d = 2.0 * inter / jnp.where(denom > 0, denom, 1.0)
    return jnp.where(g.sum(axes) > 0, d, jnp.nan)


def _edges(mask):
    from scipy import ndimage

    if not mask.any():
        return mask
    return mask ^ ndimage.binary_erosion(mask)


def hd95(pred_onehot, gt_onehot, include_background: bool = True, spacing=None) -> np.ndarray:
    """(B, C) symmetric 95th-percentile Hausdorff distance (voxels, or mm with ``spacing``).

    NaN when the ground truth or the prediction is empty (as MONAI 1.6: undefined)."""
    from scipy import ndimage

    p, g = np.asarray(pred_onehot) > 0.5, np.asarray(gt_onehot) > 0.5
    if not include_background:
        p, g = p[:, 1:], g[:, 1:]
    out = np.full(p.shape[:2], np.nan)
    for b in range(p.shape[0]):
        for c in range(p.shape[1]):
            pe, ge = _edges(p[b, c]), _edges(g[b, c])
            if not ge.any() or not pe.any():
                continue
            d_to_g = ndimage.distance_transform_edt(~ge, sampling=spacing)
            d_to_p = ndimage.distance_transform_edt(~pe, sampling=spacing)
            out[b, c] = max(np.percentile(d_to_g[pe], 95), np.percentile(d_to_p[ge], 95))
    return out
