"""The fine-tuned classifier: a 3D ViT with a linear head on its pooled features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax.models.layers import param, trunc_normal, zeros
from decipher_jax.models.vit3d import ViT3D, ViTConfig


class Classifier(nnx.Module):
    """ViT3D backbone; a linear head on the standardised [CLS, mean patch token] (the probes'
    features, learnt).

    ``feat_mean`` / ``feat_scale`` standardise the features with the training split's statistics
    at the start (:func:`set_feature_stats`), then stay fixed, as the probes standardise theirs:
    a small ViT's pooled features differ little between images at init (a mean cosine near 0.95),
    so an unstandardised head needs weights far from its init before any class separates.
    """

    def __init__(self, vit: ViTConfig, n_out: int, *, rngs: nnx.Rngs):
        self.backbone = ViT3D(vit, rngs=rngs)
        self.feat_mean = param(rngs.params(), zeros, (2 * vit.dim,), ("embed",))
        self.feat_scale = param(rngs.params(), jax.nn.initializers.ones, (2 * vit.dim,), ("embed",))
        self.head_kernel = param(rngs.params(), trunc_normal, (2 * vit.dim, n_out), ("embed", None))
        self.head_bias = param(rngs.params(), zeros, (n_out,), (None,))

    def features(self, x, *, drop_path: float = 0.0, key=None):
        out = self.backbone(x, drop_path=drop_path, key=key)
        return jnp.concatenate([out["cls"], out["patch"].mean(axis=1)], axis=-1).astype(jnp.float32)

    def __call__(self, x, *, drop_path: float = 0.0, key=None):
        f = (self.features(x, drop_path=drop_path, key=key) - self.feat_mean[...]) * self.feat_scale[...]
        return f @ self.head_kernel[...] + self.head_bias[...]
