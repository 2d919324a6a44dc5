"""DINO head: the optional batch norm is torch's BatchNorm1d in training mode (synchronised)."""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from decipher_jax.models.heads import DINOHead, _batch_norm


def test_batch_norm_matches_torch_training_mode(rng):
    h = rng.standard_normal((6, 5, 12)).astype(np.float32) * 3 + 1
    scale, bias = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    bn = torch.nn.BatchNorm1d(12).train()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(scale))
        bn.bias.copy_(torch.from_numpy(bias))
        ref = bn(torch.from_numpy(h.reshape(-1, 12))).numpy().reshape(h.shape)  # stats over every row
    out = np.asarray(_batch_norm(jnp.asarray(h), jnp.asarray(scale), jnp.asarray(bias)))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_bn_head_outputs_depend_on_the_image_when_inputs_barely_do(rng):
    """Inputs with cosine ~0.99 to each other: the plain head maps them to almost the same
    prototype logits; the BN head standardises the differences first."""
    common = rng.standard_normal(32)
    x = jnp.asarray(common + 0.1 * rng.standard_normal((16, 32)), jnp.float32)
    spread = {}
    for bn in (False, True):
        head = DINOHead(32, out_dim=64, hidden=48, bottleneck=16, rngs=nnx.Rngs(0), batch_norm=bn)
        logits = np.asarray(head(x))
        spread[bn] = float((logits - logits.mean(0)).std())
        assert ("bn_scale" in nnx.state(head)) == bn
    assert spread[True] > 5 * spread[False], spread
