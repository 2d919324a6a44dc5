"""The fine-tuned classifier: a 3D ViT with a linear head on its pooled features."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax.models.layers import param, trunc_normal, zeros
from decipher_jax.models.vit3d import ViT3D, ViTConfig

POOLS = ("cls", "mean", "max")
DEFAULT_POOL = ("cls", "mean", "max")


def pool_features(out: dict, pool: Sequence[str]) -> jax.Array:
    """The ViT's output pooled by each name of ``pool`` and concatenated, in float32: ``cls`` (the
    CLS token, or the mean patch token without one), ``mean`` / ``max`` (the patch tokens' mean /
    channel-wise max). The max is the multiple-instance readout: a finding in a few of the
    patches moves it by as much as in all of them, where the mean divides it by the token count
    (BENCHMARKS.md, "The ViT's readout")."""
    feats = {"cls": lambda: out["cls"], "mean": lambda: out["patch"].mean(axis=1),
             "max": lambda: token_max(out["patch"])}
    return jnp.concatenate([feats[p]().astype(jnp.float32) for p in pool], axis=-1)


def token_max(patch: jax.Array) -> jax.Array:
    """``(B, N, E) -> (B, E)``: each channel's max over the tokens, as a gather at its argmax.
    ``jnp.max``'s gradient divides by the count of tokens equal to the max; inside a fused
    training step XLA may recompute the tokens with other roundings, find none equal and return
    0 / 0 (a NaN update at step 3 of a fine-tuning test on 8 simulated devices). The gather sends
    the gradient to the argmax token whatever the roundings."""
    idx = jnp.argmax(patch, axis=1)
    return jnp.take_along_axis(patch, idx[:, None, :], axis=1)[:, 0]


def check_pool(pool: Sequence[str]) -> tuple[str, ...]:
    pool = tuple(str(p) for p in pool)
    if not pool or set(pool) - set(POOLS) or len(set(pool)) != len(pool):
        raise ValueError(f"pool {pool!r}: one or more distinct names of {POOLS}")
    return pool


class Classifier(nnx.Module):
    """ViT3D backbone; a linear head on the standardised pooled features (``pool``: by default
    the CLS token, the mean and the max of the patch tokens).

    ``feat_mean`` / ``feat_scale`` standardise the features with the training split's statistics
    at the start (:func:`set_feature_stats`), then stay fixed, as the probes standardise theirs:
    a small ViT's pooled features differ little between images at init (a mean cosine near 0.95),
    so an unstandardised head needs weights far from its init before any class separates.
    """

    def __init__(self, vit: ViTConfig, n_out: int, *, rngs: nnx.Rngs, pool: Sequence[str] = DEFAULT_POOL):
        self.pool = check_pool(pool)
        self.backbone = ViT3D(vit, rngs=rngs)
        n = len(self.pool) * vit.dim
        self.feat_mean = param(rngs.params(), zeros, (n,), ("embed",))
        self.feat_scale = param(rngs.params(), jax.nn.initializers.ones, (n,), ("embed",))
        self.head_kernel = param(rngs.params(), trunc_normal, (n, n_out), ("embed", None))
        self.head_bias = param(rngs.params(), zeros, (n_out,), (None,))

    def features(self, x, *, drop_path: float = 0.0, key=None):
        return pool_features(self.backbone(x, drop_path=drop_path, key=key), self.pool)

    def __call__(self, x, *, drop_path: float = 0.0, key=None):
        f = (self.features(x, drop_path=drop_path, key=key) - self.feat_mean[...]) * self.feat_scale[...]
        return f @ self.head_kernel[...] + self.head_bias[...]
