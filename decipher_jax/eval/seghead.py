"""Segmentation on a frozen encoder: light heads over patch tokens, trained with Dice + CE, many
at once with ``jax.vmap``, and sliding-window inference for volumes larger than the crop.

Heads are pure functions of (params, tokens):
- ``linear``: one linear map per token to C class logits on the token grid, upsampled
  trilinearly to voxels (DINOv2's linear segmentation head, in 3D);
- ``decoder``: the tokens of several layers concatenated, projected to ``hidden``, then two
  x2 transposed-convolution stages with GELU and a linear classifier, upsampled to voxels
  (a light UNETR-style decoder without skips from the image);
- ``unetr``: the ``decoder`` path, upsampled to voxels and fused with a skip from the image
  itself (one 3x3x3 convolution of the input volume, as UNETR's first encoder block), then a
  per-voxel classifier. Structures smaller than a patch (lesions, a cortical ribbon) need
  this skip: the frozen tokens say *what* is in a patch, the image skip says *where*. With
  ``skip_convs=2`` the skip is UNETR's first block, two 3^3 convolutions with a residual (lesion
  Dice 0.31 -> 0.40 at 400 patients, at twice the evaluator's time on a CPU; BENCHMARKS.md, "The
  lesion head").

    heads = train_heads(tokens, labels, kind="decoder", lrs=[1e-3, 3e-3], seeds=[0, 1], steps=200)
    logits = apply_head(kind, jax.tree.map(lambda a: a[i], heads), tokens, out_size)
    heads = train_heads(tokens, labels, kind="unetr", images=windows, weights=loss_mask, ...)

``tokens``: (B, gd, gh, gw, D) (layers concatenated on D); ``labels``: (B, X, Y, Z) ints;
``images``: (B, X, Y, Z, C) for ``unetr``; ``weights``: optional (B, X, Y, Z) voxel weights of
the loss (0 drops a voxel: a held-out region of the same volume).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

KINDS = ("linear", "decoder", "unetr")


# -- heads ------------------------------------------------------------------------------------------

def init_head(kind: str, key, dim: int, classes: int, hidden: int = 64, in_channels: int = 1, skip_convs: int = 1):
    k1, k2, k3, k4, k5, k6, k7 = jax.random.split(key, 7)
    norm = lambda k, shape, fan: jax.random.normal(k, shape) * (1.0 / math.sqrt(fan))  # noqa: E731
    if kind == "linear":
        return {"w": norm(k1, (dim, classes), dim), "b": jnp.zeros((classes,))}
    if kind == "decoder":
        h2 = max(hidden // 2, 8)
        return {"proj_w": norm(k1, (dim, hidden), dim), "proj_b": jnp.zeros((hidden,)),
                "up1": norm(k2, (2, 2, 2, hidden, h2), hidden), "up1_b": jnp.zeros((h2,)),
                "up2": norm(k3, (2, 2, 2, h2, h2), h2), "up2_b": jnp.zeros((h2,)),
                "cls_w": norm(k4, (h2, classes), h2), "cls_b": jnp.zeros((classes,))}
    if kind == "unetr":
        h2, hs = max(hidden // 2, 8), max(hidden // 4, 8)
        dec = init_head("decoder", k1, dim, classes, hidden)
        del dec["cls_w"], dec["cls_b"]
        skip = {"skip_w": norm(k5, (3, 3, 3, in_channels, hs), 27 * in_channels), "skip_b": jnp.zeros((hs,))}
        if skip_convs == 2:  # UNETR's first block: two 3^3 convolutions with a residual
            skip |= {"skip2_w": norm(k7, (3, 3, 3, hs, hs), 27 * hs) * 0.5, "skip2_b": jnp.zeros((hs,))}
        elif skip_convs != 1:
            raise ValueError(f"skip_convs is 1 or 2, got {skip_convs}")
        return dec | skip | {"fuse_w": norm(k6, (h2 + hs, h2), h2 + hs), "fuse_b": jnp.zeros((h2,)),
                      "cls_w": norm(k4, (h2, classes), h2), "cls_b": jnp.zeros((classes,))}
    raise ValueError(f"unknown head kind {kind!r} ({KINDS})")


def _upsample(x, size):
    b, c = x.shape[0], x.shape[-1]
    return jax.image.resize(x, (b, *size, c), method="trilinear")


def _up2(x, w, b):
    """x2 transposed convolution with kernel = stride = 2 (no overlap): a per-voxel linear map."""
    bsz, d, h, ww, _ = x.shape
    y = jnp.einsum("bdhwc,xyzco->bdxhywzo", x, w)
    return y.reshape(bsz, 2 * d, 2 * h, 2 * ww, w.shape[-1]) + b


def _conv3(x, w, b):
    """'SAME' (zero-padded) 3x3x3 convolution, channels last, as 27 shifted copies and one matmul:
    the input is the image (no gradient flows into it), and XLA:CPU computes the weight gradient
    of this form far faster than that of a 1-channel 3D convolution (BENCHMARKS.md, "Figures
    moved out of code comments")."""
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    X, Y, Z = x.shape[1:4]
    cols = jnp.concatenate([xp[:, i:i + X, j:j + Y, k:k + Z] for i in range(3) for j in range(3) for k in range(3)], -1)
    return cols @ w.reshape(-1, w.shape[-1]) + b


def apply_head(kind: str, params, tokens, out_size, images=None):
    """Class logits (B, X, Y, Z, C) at ``out_size`` from tokens (B, gd, gh, gw, D) (and, for
    ``unetr``, the input volumes (B, X, Y, Z, C_in) at ``out_size``)."""
    t = tokens.astype(jnp.float32)
    if kind == "linear":
        return _upsample(t @ params["w"] + params["b"], out_size)
    h = jax.nn.gelu(t @ params["proj_w"] + params["proj_b"])
    h = jax.nn.gelu(_up2(h, params["up1"], params["up1_b"]))
    h = jax.nn.gelu(_up2(h, params["up2"], params["up2_b"]))
    if kind == "decoder":
        return _upsample(h @ params["cls_w"] + params["cls_b"], out_size)
    if images is None or tuple(images.shape[1:4]) != tuple(out_size):
        raise ValueError(f"the unetr head needs the input volumes at {tuple(out_size)}, got "
                         f"{None if images is None else images.shape}")
    skip = jax.nn.gelu(_conv3(images.astype(jnp.float32), params["skip_w"], params["skip_b"]))
    if "skip2_w" in params:
        skip = skip + jax.nn.gelu(_conv3(skip, params["skip2_w"], params["skip2_b"]))
    z = jnp.concatenate([_upsample(h, out_size), skip], axis=-1)
    z = jax.nn.gelu(z @ params["fuse_w"] + params["fuse_b"])
    return z @ params["cls_w"] + params["cls_b"]


# -- loss -------------------------------------------------------------------------------------------

def dice_ce_loss(logits, labels, classes: int, smooth: float = 1e-5, weights=None):
    """MONAI ``DiceCELoss(softmax=True, to_onehot_y=True)``: mean soft Dice loss over classes and
    samples, plus mean cross-entropy. ``weights`` (B, X, Y, Z) restricts both terms to the
    voxels it keeps (CE averaged over them; Dice sums only over them)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, classes)
    if weights is None:
        ce = -(onehot * logp).sum(-1).mean()
        p = jnp.exp(logp)
    else:
        w = weights.astype(jnp.float32)
        ce = -((onehot * logp).sum(-1) * w).sum() / jnp.maximum(w.sum(), 1.0)
        p, onehot = jnp.exp(logp) * w[..., None], onehot * w[..., None]
    axes = tuple(range(1, logits.ndim - 1))
    inter = (p * onehot).sum(axes)
    denom = p.sum(axes) + onehot.sum(axes)
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return dice.mean() + ce


# -- training many heads at once ----------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("kind", "classes", "steps", "hidden", "batch", "skip_convs"))
def _train(tokens, labels, keys, lrs, images, weights, *, kind, classes, steps, hidden, batch, skip_convs):
    out_size = labels.shape[1:]
    n = tokens.shape[0]
    channels = 1 if images is None else images.shape[-1]
    take = lambda a, idx: None if a is None else a[idx]  # noqa: E731

    def one(key, lr):
        params = init_head(kind, key, tokens.shape[-1], classes, hidden, channels, skip_convs)
        tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)

        def step(carry, i):
            p, s = carry
            idx = jax.random.choice(jax.random.fold_in(key, i), n, (batch,), replace=n < batch)
            loss, g = jax.value_and_grad(
                lambda q: dice_ce_loss(apply_head(kind, q, tokens[idx], out_size, take(images, idx)), labels[idx],
                                       classes, weights=take(weights, idx)))(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
        return params, losses

    return jax.vmap(one)(keys, lrs)


def train_heads(tokens, labels, *, kind: str, classes: int, lrs=(1e-3,), seeds=(0,), steps: int = 200,
                hidden: int = 64, batch: int = 8, images=None, weights=None, skip_convs: int = 1):
    """Trains ``len(lrs) * len(seeds)`` heads in one vmapped, jitted call; returns (params, losses)
    stacked on a leading head axis, in (lr, seed) order."""
    if kind == "unetr" and images is None:
        raise ValueError("kind='unetr' trains on (tokens, images): pass images=(B, X, Y, Z, C)")
    grid = [(lr, s) for lr in lrs for s in seeds]
    keys = jnp.stack([jax.random.key(s) for _, s in grid])
    arr = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    return _train(jnp.asarray(tokens, jnp.float32), jnp.asarray(labels, jnp.int32), keys,
                  jnp.asarray([lr for lr, _ in grid], jnp.float32), arr(images if kind == "unetr" else None),
                  arr(weights), kind=kind, classes=classes, steps=steps, hidden=hidden, batch=min(batch, len(tokens)),
                  skip_convs=skip_convs)


# -- sliding windows ----------------------------------------------------------------------------------

def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window starts covering ``size`` with stride ``window * (1 - overlap)`` (MONAI's scan)."""
    if window >= size:
        return [0]
    stride = max(int(window * (1 - overlap)), 1)
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def window_corners(size, window, overlap: float) -> list[tuple[int, int, int]]:
    """Every window corner of MONAI's scan order over a (padded) volume of spatial ``size``."""
    return [(x, y, z) for x in window_starts(size[0], window[0], overlap)
            for y in window_starts(size[1], window[1], overlap) for z in window_starts(size[2], window[2], overlap)]


def pad_to_window(volume, window):
    """Zero-pads (B, X, Y, Z, ...) at the far end so every spatial side is at least the window."""
    pad = [(0, 0)] + [(0, max(w - s, 0)) for s, w in zip(volume.shape[1:4], window)] + [(0, 0)] * (volume.ndim - 4)
    return np.pad(volume, pad) if any(p for _, p in pad) else volume


def stitch(preds, corners, size, window):
    """Averages window predictions (N, B, *window, K) placed at ``corners`` into (B, *size, K)
    (constant weights, as MONAI's default mode)."""
    out = np.zeros((preds[0].shape[0], *size, preds[0].shape[-1]), np.float32)
    count = np.zeros((1, *size, 1), np.float32)
    for pred, (x, y, z) in zip(preds, corners):
        sl = (slice(None), slice(x, x + window[0]), slice(y, y + window[1]), slice(z, z + window[2]))
        out[sl] += np.asarray(pred)
        count[sl] += 1.0
    return out / count


def sliding_window(fn, volume, window, overlap: float = 0.25):
    """Applies ``fn`` ((B, *window, C) -> (B, *window, K)) over overlapping windows of ``volume``
    (B, X, Y, Z, C) and averages the overlaps (constant weights, as MONAI's default mode)."""
    volume = np.asarray(volume)
    spatial = volume.shape[1:4]
    volume = pad_to_window(volume, window)
    size = volume.shape[1:4]
    corners = window_corners(size, window, overlap)
    preds = [fn(volume[(slice(None),) + tuple(slice(c, c + w) for c, w in zip(cr, window))]) for cr in corners]
    out = stitch(preds, corners, size, window)
    return out[:, : spatial[0], : spatial[1], : spatial[2]]
