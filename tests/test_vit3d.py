"""3D ViT behaviour: grids, position embeddings, masking, scan/loop/remat, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decipher_jax.models.vit3d import ViT3D, ViTConfig, resample_pos_embed, sincos_3d, vit_config

from helpers import randomise

SMALL = dict(dim=48, depth=3, heads=4, mlp_dim=96, patch_size=(8, 8, 4), img_size=(32, 32, 16))


def _model(**kw):
    return randomise(ViT3D(ViTConfig(**{**SMALL, **kw}), rngs=nnx.Rngs(0)), seed=1)


def test_variants_by_name():
    c = vit_config("B/16", img_size=96)
    assert (c.dim, c.depth, c.heads, c.mlp_dim, c.patch_size, c.grid) == (768, 12, 12, 3072, (16, 16, 16), (6, 6, 6))
    c = vit_config("S/16x16x8", img_size=(160, 160, 64))
    assert c.patch_size == (16, 16, 8) and c.grid == (10, 10, 8) and c.dim == 384
    with pytest.raises(ValueError, match="unknown ViT variant"):
        vit_config("XL/16")
    with pytest.raises(ValueError, match="not divisible"):
        vit_config("B/16", img_size=100)


def test_outputs_registers_and_intermediate_layers(rng):
    m = _model(num_registers=3)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 16, 1)), jnp.float32)
    out = m(x, collect=(0, 2, -1))
    assert out["cls"].shape == (2, 48) and out["patch"].shape == (2, 64, 48)
    assert out["registers"].shape == (2, 3, 48)
    assert sorted(out["layers"]) == [0, 2] and out["layers"][0].shape == (2, 1 + 3 + 64, 48)
    # The final layer's raw output, normed, is the returned token sequence.
    normed = m.norm(out["layers"][2])
    np.testing.assert_allclose(np.asarray(normed[:, 4:]), np.asarray(out["patch"]), atol=1e-6)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        m(jnp.ones((1, 30, 32, 16, 1)))
    with pytest.raises(ValueError, match="expected"):
        m(jnp.ones((1, 32, 32, 16, 2)))


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_runs_at_other_grids(pos, rng):
    m = _model(pos_embed=pos)
    for shape in [(48, 48, 24), (40, 40, 8), (32, 32, 16)]:
        out = m(jnp.asarray(rng.standard_normal((1,) + shape + (1,)), jnp.float32))
        n = np.prod([s // p for s, p in zip(shape, (8, 8, 4))])
        assert out["patch"].shape == (1, n, 48) and np.isfinite(np.asarray(out["patch"])).all()


def test_resampling_to_native_grid_is_identity(rng):
    m = _model()
    pos = m.pos_embed[...]
    np.testing.assert_allclose(np.asarray(resample_pos_embed(pos, pos.shape[:3])), np.asarray(pos), atol=1e-6)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 16, 1)), jnp.float32)
    ref = m(x)["patch"]
    # Force the resampling path at the native grid: outputs are unchanged.
    m.position_embedding = lambda grid: resample_pos_embed(m.pos_embed[...], grid)
    np.testing.assert_allclose(np.asarray(m(x)["patch"]), np.asarray(ref), atol=1e-5)
    # Resampling a smooth (linear) field to a finer grid reproduces it at matching world coordinates.
    ramp = jnp.broadcast_to(jnp.arange(4.0)[:, None, None, None], (4, 4, 4, 2))
    up = resample_pos_embed(ramp, (8, 4, 4))
    np.testing.assert_allclose(np.asarray(up[1:-1:2, 0, 0, 0]), np.arange(3.0) + 0.25, atol=1e-6)


def test_sincos_embedding():
    e = sincos_3d((4, 5, 6), 50)
    assert e.shape == (4, 5, 6, 50) and np.all(e[..., 48:] == 0)  # 50 // 6 * 6 = 48 used channels
    # Rescaled coordinates: a 2x finer grid samples the native embedding at its even positions.
    fine = sincos_3d((8, 10, 12), 48, native=(4, 5, 6))
    np.testing.assert_allclose(fine[::2, ::2, ::2], sincos_3d((4, 5, 6), 48), atol=1e-6)
    assert len({tuple(np.round(v, 5)) for v in e.reshape(-1, 50)}) == 4 * 5 * 6  # all positions distinct


def test_mask_token_replaces_patches_before_position_embedding(rng):
    m = _model()
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 16, 1)), jnp.float32)
    mask = np.zeros((2, 64), bool)
    mask[0, [3, 10, 63]] = True
    tok, grid = m.embed(x, jnp.asarray(mask))
    pos = m.pos_embed[...].reshape(64, 48)
    np.testing.assert_allclose(np.asarray(tok[0, 3]), np.asarray(m.mask_token[...] + pos[3]), atol=1e-6)
    plain, _ = m.embed(x)
    np.testing.assert_allclose(np.asarray(tok[1]), np.asarray(plain[1]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(tok[0, ~mask[0]]), np.asarray(plain[0, ~mask[0]]), atol=1e-6)


def test_scan_loop_and_remat_agree(rng):
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 16, 1)), jnp.float32)
    base = _model()
    state = nnx.state(base)
    outs, grads = [], []
    for kw in [dict(), dict(scan=True), dict(scan=True, remat="full"), dict(remat="dots")]:
        m = ViT3D(ViTConfig(**{**SMALL, **kw}), rngs=nnx.Rngs(0))
        nnx.update(m, state)  # one checkpoint layout whatever the execution mode
        graphdef, st = nnx.split(m)

        def loss(s):
            o = nnx.merge(graphdef, s)(x, collect=(1,))
            return jnp.mean(o["cls"] ** 2) + jnp.mean(o["layers"][1])

        l, g = jax.jit(jax.value_and_grad(loss))(st)
        outs.append(float(l))
        grads.append(g["blocks"]["qkv_kernel"][...])
    for o, g in zip(outs[1:], grads[1:]):
        assert abs(o - outs[0]) < 1e-6
        np.testing.assert_allclose(np.asarray(g), np.asarray(grads[0]), rtol=1e-4, atol=1e-7)


def test_bf16_compute_keeps_fp32_params(rng):
    m32 = _model()
    m16 = ViT3D(ViTConfig(**SMALL, dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(m16, nnx.state(m32))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(m16)))
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 16, 1)), jnp.float32)
    a, b = m32(x)["patch"], m16(x)["patch"]
    assert b.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(a - b.astype(jnp.float32)) / jnp.linalg.norm(a))
    assert rel < 0.05


def test_drop_path(rng):
    m = _model()
    x = jnp.asarray(rng.standard_normal((4, 32, 32, 16, 1)), jnp.float32)
    with pytest.raises(ValueError, match="PRNG key"):
        m(x, drop_path=0.5)
    ref = m(x)["cls"]
    a = m(x, drop_path=0.5, key=jax.random.key(0))["cls"]
    b = m(x, drop_path=0.5, key=jax.random.key(0))["cls"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # deterministic given the key
    assert not np.allclose(np.asarray(a), np.asarray(ref))
    np.testing.assert_allclose(np.asarray(m(x, drop_path=0.0, key=jax.random.key(0))["cls"]), np.asarray(ref), atol=1e-6)


@pytest.mark.parametrize("strides", [(2, 2, 2), (2, 2, 1), (1, 1, 1)])
def test_conv3d_im2col_and_xla_match_torch(strides, rng):
    """Both implementations of layers.conv3d against torch's Conv3d (padding k//2), values and
    input / kernel gradients."""
    import torch

    from decipher_jax.models.layers import conv3d

    x = rng.normal(size=(2, 8, 6, 4, 3)).astype(np.float32)
    k = rng.normal(size=(3, 3, 3, 3, 5)).astype(np.float32)
    xt = torch.tensor(x.transpose(0, 4, 1, 2, 3), requires_grad=True)
    kt = torch.tensor(k.transpose(4, 3, 0, 1, 2), requires_grad=True)
    ref = torch.nn.functional.conv3d(xt, kt, stride=strides, padding=1)
    (ref ** 2).sum().backward()
    want = ref.detach().numpy().transpose(0, 2, 3, 4, 1)
    for impl in ("im2col", "xla"):
        gx, gk = jax.grad(lambda a, b: jnp.sum(conv3d(a, b, strides, impl) ** 2), argnums=(0, 1))(x, k)
        got = conv3d(x, k, strides, impl)
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy().transpose(0, 2, 3, 4, 1), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(np.asarray(gk), kt.grad.numpy().transpose(2, 3, 4, 1, 0), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="odd kernel"):
        conv3d(x, np.zeros((2, 2, 2, 3, 5), np.float32), (1, 1, 1))


def test_conv_stem(rng):
    """stem="conv": one stride-2 conv per halving (an axis stops at its patch size), the token
    grid of the linear stem, the same output under either conv implementation, a per-sample
    InstanceNorm (another sample in the batch changes nothing), masks still act on tokens,
    and refusals for non-power-of-two patches and for MONAI export."""
    from decipher_jax.interop.monai_vit import export_monai

    c = ViTConfig(**SMALL, stem="conv")
    assert c.stem_plan() == [(16, (2, 2, 2)), (32, (2, 2, 2)), (48, (2, 2, 1))]
    m = _model(stem="conv")
    assert set(nnx.to_pure_dict(nnx.state(m))["stem_kernel"]) == {0, 1, 2}
    assert m.patch_kernel.shape == (1, 1, 1, 48, 48)
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 16, 1)), jnp.float32)
    out = m(x)
    assert out["patch"].shape == (2, 64, 48) and np.isfinite(np.asarray(out["patch"])).all()
    xla = randomise(ViT3D(ViTConfig(**SMALL, stem="conv", conv_impl="xla"), rngs=nnx.Rngs(0)), seed=1)
    np.testing.assert_allclose(np.asarray(xla(x)["patch"]), np.asarray(out["patch"]), atol=2e-4)
    other = x.at[1].multiply(5.0).at[1].add(3.0)
    np.testing.assert_allclose(np.asarray(m(other)["patch"][0]), np.asarray(out["patch"][0]), atol=1e-5)
    mask = jnp.zeros((2, 64), bool).at[:, :10].set(True)
    tok, _ = m.embed(x, mask)
    tok2, _ = m.embed(x * 0 + 7.0, mask)
    np.testing.assert_allclose(np.asarray(tok[:, :10]), np.asarray(tok2[:, :10]), atol=1e-6)
    g = nnx.grad(lambda mod: jnp.sum(mod(x)["cls"] ** 2))(m)
    assert float(jnp.abs(g.stem_kernel[0][...]).sum()) > 0
    assert ViTConfig(**SMALL, stem="conv", stem_channels=[8, 16, 24]).stem_plan()[2] == (24, (2, 2, 1))
    with pytest.raises(ValueError, match="one width per stride-2 conv"):
        ViTConfig(**SMALL, stem="conv", stem_channels=(8,))
    with pytest.raises(ValueError, match="power-of-two"):
        ViTConfig(dim=48, depth=1, heads=4, mlp_dim=96, patch_size=6, img_size=24, stem="conv")
    with pytest.raises(ValueError, match="no MONAI layout"):
        export_monai(m)
