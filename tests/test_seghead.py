"""Segmentation heads: loss and sliding windows against MONAI, vmapped training equals single
runs, and both head kinds learn a token-encoded segmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from decipher_jax.eval import seghead as S
from decipher_jax.eval import segmentation


def test_dice_ce_loss_matches_monai(rng):
    from monai.losses import DiceCELoss

    logits = rng.normal(size=(2, 6, 5, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 6, 5, 4))
    ours = float(S.dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels), 3))
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(torch.as_tensor(np.moveaxis(logits, -1, 1)),
                                                      torch.as_tensor(labels[:, None]))
    assert ours == pytest.approx(float(ref), rel=1e-5)


def test_sliding_window_matches_monai(rng):
    from monai.inferers import sliding_window_inference

    vol = rng.normal(size=(1, 41, 30, 20, 1)).astype(np.float32)

    def fn(x):  # depends on the window's content as a whole: placement errors would show
        return np.concatenate([x * 2.0, x - x.mean(axis=(1, 2, 3), keepdims=True)], axis=-1)

    ours = S.sliding_window(fn, vol, (16, 16, 16), overlap=0.25)
    ref = sliding_window_inference(torch.as_tensor(np.moveaxis(vol, -1, 1)), (16, 16, 16), 1,
                                   lambda t: torch.as_tensor(np.moveaxis(fn(np.moveaxis(t.numpy(), 1, -1)), -1, 1)),
                                   overlap=0.25, mode="constant")
    np.testing.assert_allclose(ours, np.moveaxis(ref.numpy(), 1, -1), rtol=1e-5, atol=1e-5)


def _task(rng, n=12, grid=(4, 4, 4), patch=4, dim=16):
    """Labels made of patch-sized blocks; each token's features encode its block's class."""
    block = rng.integers(0, 3, size=(n, *grid))
    labels = block.repeat(patch, 1).repeat(patch, 2).repeat(patch, 3)
    proto = rng.normal(size=(3, dim))
    tokens = proto[block] + 0.3 * rng.normal(size=(n, *grid, dim))
    return tokens.astype(np.float32), labels


@pytest.mark.parametrize("kind", ["linear", "decoder"])
def test_heads_learn_and_vmap_equals_single_runs(kind, rng):
    tokens, labels = _task(rng)
    params, losses = S.train_heads(tokens[:8], labels[:8], kind=kind, classes=3, lrs=(1e-2, 3e-3), seeds=(0, 1),
                                   steps=60, hidden=16)
    assert losses.shape == (4, 60) and np.all(np.asarray(losses[:, -5:]).mean(1) < np.asarray(losses[:, :5]).mean(1))
    one, one_losses = S.train_heads(tokens[:8], labels[:8], kind=kind, classes=3, lrs=(3e-3,), seeds=(1,), steps=60,
                                    hidden=16)
    np.testing.assert_allclose(np.asarray(losses[3]), np.asarray(one_losses[0]), rtol=1e-4, atol=1e-5)
    best = jax.tree.map(lambda a: a[0], params)
    logits = S.apply_head(kind, best, jnp.asarray(tokens[8:]), labels.shape[1:])
    pred = np.asarray(logits).argmax(-1)
    d = np.asarray(segmentation.dice(segmentation.one_hot(pred, 3), segmentation.one_hot(labels[8:], 3)))
    assert np.nanmean(d) > 0.8
