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


def test_weighted_loss_is_monai_loss_on_the_kept_box(rng):
    """A 0/1 voxel weight over a box = MONAI's DiceCELoss on that box alone (the held-out
    hemisphere of a volume contributes nothing); all-ones weights = the plain loss."""
    from monai.losses import DiceCELoss

    logits = rng.normal(size=(2, 8, 6, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 8, 6, 5))
    w = np.zeros((2, 8, 6, 5), np.float32)
    w[:, :4] = 1.0
    ours = float(S.dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels), 3, weights=jnp.asarray(w)))
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(torch.as_tensor(np.moveaxis(logits[:, :4], -1, 1)),
                                                      torch.as_tensor(labels[:, None, :4]))
    assert ours == pytest.approx(float(ref), rel=1e-5)
    plain = float(S.dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels), 3))
    ones = float(S.dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels), 3, weights=jnp.ones_like(jnp.asarray(w))))
    assert ones == pytest.approx(plain, rel=1e-6)


def _spheres(rng, n=16, size=16):
    """Bright spheres (radius 2-3 voxels) smaller than one 8^3 patch; tokens carry no location."""
    g = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1)
    labels = np.zeros((n, size, size, size), np.int32)
    for i in range(n):
        c, r = rng.uniform(3, size - 3, 3), rng.uniform(2, 3)
        labels[i] = (np.linalg.norm(g - c, axis=-1) <= r)
    images = (labels + 0.2 * rng.normal(size=labels.shape))[..., None].astype(np.float32)
    tokens = rng.normal(size=(n, 2, 2, 2, 8)).astype(np.float32)
    return tokens, labels, images


def test_unetr_image_skip_segments_structures_smaller_than_a_patch(rng):
    tokens, labels, images = _spheres(rng)
    dice = {}
    for kind in ("decoder", "unetr"):
        params, _ = S.train_heads(tokens[:12], labels[:12], kind=kind, classes=2, lrs=(1e-2,), seeds=(0,), steps=150,
                                  hidden=16, images=images[:12])
        p = jax.tree.map(lambda a: a[0], params)
        pred = np.asarray(S.apply_head(kind, p, jnp.asarray(tokens[12:]), labels.shape[1:], jnp.asarray(images[12:])))
        d = segmentation.dice(segmentation.one_hot(pred.argmax(-1), 2), segmentation.one_hot(labels[12:], 2))
        dice[kind] = float(np.nanmean(np.asarray(d)[:, 1]))
    assert dice["unetr"] > 0.8 and dice["decoder"] < 0.5, dice
    with pytest.raises(ValueError, match="images"):
        S.train_heads(tokens, labels, kind="unetr", classes=2)


def test_batched_window_prediction_equals_sliding_window(rng):
    """segtasks' precomputed-token sliding window = seghead.sliding_window with the same head."""
    from decipher_jax.eval import segtasks

    vol = rng.normal(size=(21, 13, 10, 1)).astype(np.float32)
    window = (8, 8, 8)
    tok = lambda w: w.reshape(len(w), 2, 4, 2, 4, 2, 4).mean((2, 4, 6))[..., None].repeat(3, -1)  # noqa: E731
    params = jax.tree.map(lambda a: a[0], S.train_heads(tok(vol[None, :8, :8, :8]), np.zeros((1, 8, 8, 8)),
                                                        kind="unetr", classes=3, steps=1, hidden=8,
                                                        images=vol[None, :8, :8, :8])[0])
    v = segtasks._Volume(vol, window)
    ours = v.predict("unetr", params, tok(v.windows[..., 0]), 3)

    def fn(x):
        lab = np.asarray(S.apply_head("unetr", params, jnp.asarray(tok(x[..., 0])), window, jnp.asarray(x))).argmax(-1)
        return np.eye(3, dtype=np.float32)[lab]

    ref = S.sliding_window(fn, vol[None], window, overlap=0.5)[0].argmax(-1)
    np.testing.assert_array_equal(ours, ref)


def test_unetr_second_image_convolution_is_a_residual(rng):
    """UNETR's first block: the image skip's second 3^3 convolution adds to the first's output,
    so with its weights at zero the head is the one-convolution head exactly."""
    tokens = jnp.asarray(rng.normal(size=(2, 2, 2, 2, 6)), jnp.float32)
    images = jnp.asarray(rng.normal(size=(2, 8, 8, 8, 1)), jnp.float32)
    two = S.init_head("unetr", jax.random.key(0), 6, 3, hidden=16, skip_convs=2)
    one = S.init_head("unetr", jax.random.key(0), 6, 3, hidden=16)  # the default: one convolution
    assert set(two) - set(one) == {"skip2_w", "skip2_b"}
    for k in one:  # the shared weights are drawn alike
        np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(two[k]))
    two_zero = {**one, "skip2_w": jnp.zeros_like(two["skip2_w"]), "skip2_b": jnp.zeros_like(two["skip2_b"])}
    np.testing.assert_allclose(np.asarray(S.apply_head("unetr", two_zero, tokens, (8, 8, 8), images)),
                               np.asarray(S.apply_head("unetr", one, tokens, (8, 8, 8), images)), atol=1e-6)
    assert not np.allclose(np.asarray(S.apply_head("unetr", {**one, "skip2_w": two["skip2_w"], "skip2_b": two["skip2_b"]},
                                                   tokens, (8, 8, 8), images)),
                           np.asarray(S.apply_head("unetr", one, tokens, (8, 8, 8), images)))
    with pytest.raises(ValueError, match="skip_convs"):
        S.init_head("unetr", jax.random.key(0), 6, 3, skip_convs=3)
