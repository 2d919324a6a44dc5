"""Projection heads: the DINO / iBOT head (dinov2/layers/dino_head.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax.models.layers import param, trunc_normal, zeros


class DINOHead(nnx.Module):
    """MLP d -> hidden -> hidden -> bottleneck (GELU), L2-normalise, then a weight-normalised
    linear bottleneck -> K prototypes without bias.

    The prototype matrix is ``g * v / ||v||`` per prototype (column); ``g`` starts at 1.
    The last layer is called ``last_layer_*`` so the optimiser can freeze it early on.

    ``batch_norm``: DINO's ``use_bn_in_head`` (dino/vision_transformer.py): batch normalisation
    after each hidden linear layer. The statistics are those of the call's whole input (under
    jit, the global batch: a synchronised BN), in float32, for student and teacher alike; no
    running averages are kept, since only the backbone is used after pretraining. DINOv2 uses no
    BN; it matters for small models whose features at init differ little between images.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256,
                 n_layers: int = 3, *, rngs: nnx.Rngs, dtype: str = "float32", batch_norm: bool = False):
        self.dtype = dtype
        self.batch_norm = batch_norm
        dims = [in_dim] + [hidden] * (n_layers - 1) + [bottleneck]
        self.kernels = nnx.List([param(rngs.params(), trunc_normal, (a, b), ("embed" if i == 0 else None, None))
                                 for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
        self.biases = nnx.List([param(rngs.params(), zeros, (b,), (None,)) for b in dims[1:]])
        self.last_layer_v = param(rngs.params(), trunc_normal, (bottleneck, out_dim), (None, "mlp"))
        self.last_layer_g = param(rngs.params(), jax.nn.initializers.ones, (out_dim,), ("mlp",))
        if batch_norm:
            self.bn_scale = nnx.List([param(rngs.params(), jax.nn.initializers.ones, (b,), (None,))
                                      for b in dims[1:-1]])
            self.bn_bias = nnx.List([param(rngs.params(), zeros, (b,), (None,)) for b in dims[1:-1]])

    def __call__(self, x):
        dt = jnp.dtype(self.dtype)
        h = x.astype(dt)
        n = len(self.kernels)
        for i in range(n):
            h = h @ self.kernels[i][...].astype(dt) + self.biases[i][...].astype(dt)
            if i < n - 1:
                if self.batch_norm:
                    h = _batch_norm(h, self.bn_scale[i][...], self.bn_bias[i][...])
                h = jax.nn.gelu(h, approximate=False)
        h = h.astype(jnp.float32)
        h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-6)
        v = self.last_layer_v[...]
        w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12) * self.last_layer_g[...]
        return h.astype(dt) @ w.astype(dt)


def _batch_norm(h, scale, bias, eps: float = 1e-5):
    """Normalise each feature over every leading axis (biased variance, as torch's BN)."""
    f = h.astype(jnp.float32)
    axes = tuple(range(f.ndim - 1))
    mean = f.mean(axes, keepdims=True)
    var = jnp.square(f - mean).mean(axes, keepdims=True)
    return ((f - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(h.dtype)
