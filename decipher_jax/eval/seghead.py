"""Segmentation on a frozen encoder: light heads over patch tokens, trained with Dice + CE, many
at once with ``jax.vmap``, and sliding-window inference for volumes larger than the crop.

Heads are pure functions of (params, tokens):
- ``linear``: one linear map per token to C class logits on the token grid, upsampled
  trilinearly to voxels (DINOv2's linear segmentation head, in 3D);
- ``decoder``: the tokens of several layers concatenated, projected to ``hidden``, then two
  x2 transposed-convolution stages with GELU and a linear classifier, upsampled to voxels
  (a light UNETR-style decoder without skips from the image).

    heads = train_heads(tokens, labels, kind="decoder", lrs=[1e-3, 3e-3], seeds=[0, 1], steps=200)
    logits = apply_head(kind, jax.tree.map(lambda a: a[i], heads), tokens, out_size)

``tokens``: (B, gd, gh, gw, D) (layers concatenated on D); ``labels``: (B, X, Y, Z) ints.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

KINDS = ("linear", "decoder")


# -- heads ------------------------------------------------------------------------------------------

def init_head(kind: str, key, dim: int, classes: int, hidden: int = 64):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    norm = lambda k, shape, fan: jax.random.normal(k, shape) * (1.0 / math.sqrt(fan))  # noqa: E731
    if kind == "linear":
        return {"w": norm(k1, (dim, classes), dim), "b": jnp.zeros((classes,))}
    if kind == "decoder":
        h2 = max(hidden // 2, 8)
        return {"proj_w": norm(k1, (dim, hidden), dim), "proj_b": jnp.zeros((hidden,)),
                "up1": norm(k2, (2, 2, 2, hidden, h2), hidden), "up1_b": jnp.zeros((h2,)),
                "up2": norm(k3, (2, 2, 2, h2, h2), h2), "up2_b": jnp.zeros((h2,)),
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


def apply_head(kind: str, params, tokens, out_size):
    """Class logits (B, X, Y, Z, C) at ``out_size`` from tokens (B, gd, gh, gw, D)."""
    t = tokens.astype(jnp.float32)
    if kind == "linear":
        return _upsample(t @ params["w"] + params["b"], out_size)
    h = jax.nn.gelu(t @ params["proj_w"] + params["proj_b"])
    h = jax.nn.gelu(_up2(h, params["up1"], params["up1_b"]))
    h = jax.nn.gelu(_up2(h, params["up2"], params["up2_b"]))
    return _upsample(h @ params["cls_w"] + params["cls_b"], out_size)


# -- loss -------------------------------------------------------------------------------------------

def dice_ce_loss(logits, labels, classes: int, smooth: float = 1e-5):
    """MONAI ``DiceCELoss(softmax=True, to_onehot_y=True)``: mean soft Dice loss over classes and
    samples, plus mean cross-entropy."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, classes)
    ce = -(onehot * logp).sum(-1).mean()
    p = jnp.exp(logp)
    axes = tuple(range(1, logits.ndim - 1))
    inter = (p * onehot).sum(axes)
    denom = p.sum(axes) + onehot.sum(axes)
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return dice.mean() + ce


# -- training many heads at once ----------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("kind", "classes", "steps", "hidden", "batch"))
def _train(tokens, labels, keys, lrs, *, kind, classes, steps, hidden, batch):
    out_size = labels.shape[1:]
    n = tokens.shape[0]

    def one(key, lr):
        params = init_head(kind, key, tokens.shape[-1], classes, hidden)
        tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)

        def step(carry, i):
            p, s = carry
            idx = jax.random.choice(jax.random.fold_in(key, i), n, (batch,), replace=n < batch)
            loss, g = jax.value_and_grad(
                lambda q: dice_ce_loss(apply_head(kind, q, tokens[idx], out_size), labels[idx], classes))(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
        return params, losses

    return jax.vmap(one)(keys, lrs)


def train_heads(tokens, labels, *, kind: str, classes: int, lrs=(1e-3,), seeds=(0,), steps: int = 200,
                hidden: int = 64, batch: int = 8):
    """Trains ``len(lrs) * len(seeds)`` heads in one vmapped, jitted call; returns (params, losses)
    stacked on a leading head axis, in (lr, seed) order."""
    grid = [(lr, s) for lr in lrs for s in seeds]
    keys = jnp.stack([jax.random.key(s) for _, s in grid])
    return _train(jnp.asarray(tokens, jnp.float32), jnp.asarray(labels, jnp.int32), keys,
                  jnp.asarray([lr for lr, _ in grid], jnp.float32), kind=kind, classes=classes, steps=steps,
                  hidden=hidden, batch=min(batch, len(tokens)))


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


def sliding_window(fn, volume, window, overlap: float = 0.25):
    """Applies ``fn`` ((B, *window, C) -> (B, *window, K)) over overlapping windows of ``volume``
    (B, X, Y, Z, C) and averages the overlaps (constant weights, as MONAI's default mode)."""
    volume = np.asarray(volume)
    b, *spatial, _ = volume.shape
    pad = [max(w - s, 0) for s, w in zip(spatial, window)]
    if any(pad):
        volume = np.pad(volume, [(0, 0)] + [(0, p) for p in pad] + [(0, 0)])
    size = volume.shape[1:4]
    out, count = None, np.zeros((1, *size, 1), np.float32)
    for x in window_starts(size[0], window[0], overlap):
        for y in window_starts(size[1], window[1], overlap):
            for z in window_starts(size[2], window[2], overlap):
                sl = (slice(None), slice(x, x + window[0]), slice(y, y + window[1]), slice(z, z + window[2]))
                pred = np.asarray(fn(volume[sl]))
                if out is None:
                    out = np.zeros((b, *size, pred.shape[-1]), np.float32)
                out[sl] += pred
                count[sl] += 1.0
    out = out / count
    return out[:, : spatial[0], : spatial[1], : spatial[2]]
