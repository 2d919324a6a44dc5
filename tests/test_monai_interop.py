"""MONAI ViT weights: import gives MONAI's outputs, export loads strictly into MONAI."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from monai.networks.nets import ViT as MonaiViT

from decipher_jax.interop import monai_vit
from decipher_jax.models.vit3d import ViT3D
from flax import nnx

from helpers import randomise, randomise_torch

ARGS = dict(in_channels=2, img_size=(32, 32, 16), patch_size=(8, 8, 4), hidden_size=48, mlp_dim=96,
            num_layers=3, num_heads=4)


def _monai(classification, qkv_bias, seed=0):
    torch.manual_seed(seed)
    m = MonaiViT(**ARGS, classification=classification, qkv_bias=qkv_bias, dropout_rate=0.0).eval()
    return randomise_torch(m, seed)


def _run_monai(m, x):
    with torch.no_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))  # channels-first
        hidden = m.patch_embedding(xt)
        if hasattr(m, "cls_token"):
            hidden = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), hidden], dim=1)
        outs = []
        for blk in m.blocks:
            hidden = blk(hidden)
            outs.append(hidden.numpy())
        return m.norm(hidden).numpy(), outs


@pytest.mark.parametrize("classification,qkv_bias", [(False, False), (True, True)])
def test_import_matches_monai(classification, qkv_bias, rng):
    m = _monai(classification, qkv_bias)
    x = rng.standard_normal((2, 32, 32, 16, 2)).astype(np.float32)
    ref_final, ref_layers = _run_monai(m, x)
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    cfg = monai_vit.config_from_monai(**ARGS, classification=classification, qkv_bias=qkv_bias)
    ours = monai_vit.load_monai(sd, cfg)
    out = ours(jnp.asarray(x), collect=(0, 1, 2))
    n_pre = int(classification)
    np.testing.assert_allclose(np.asarray(out["patch"]), ref_final[:, n_pre:], atol=1e-4, rtol=0)
    assert np.abs(np.asarray(out["patch"]) - ref_final[:, n_pre:]).max() <= 1e-4
    for i in range(3):
        np.testing.assert_allclose(np.asarray(out["layers"][i]), ref_layers[i], atol=1e-4, rtol=0)
    if classification:
        np.testing.assert_allclose(np.asarray(out["cls"]), ref_final[:, 0], atol=1e-4, rtol=0)


def test_export_loads_strictly_into_monai(tmp_path, rng):
    cfg = monai_vit.config_from_monai(**ARGS, classification=True, qkv_bias=True)
    ours = randomise(ViT3D(cfg, rngs=nnx.Rngs(1)), seed=3)
    path = str(tmp_path / "vit.safetensors")
    monai_vit.export_monai(ours, path)
    from safetensors.torch import load_file

    m = MonaiViT(**ARGS, classification=True, qkv_bias=True, dropout_rate=0.0).eval()
    missing, unexpected = m.load_state_dict(load_file(path), strict=False)
    assert [k for k in missing if not k.startswith("classification_head")] == [] and unexpected == []
    x = rng.standard_normal((1, 32, 32, 16, 2)).astype(np.float32)
    ref_final, _ = _run_monai(m, x)
    out = ours(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out["cls"]), ref_final[:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out["patch"]), ref_final[:, 1:], atol=1e-4, rtol=0)
    # Round trip: re-importing the export reproduces our parameters exactly.
    from decipher_jax.interop.common import flat_arrays

    back = flat_arrays(nnx.state(monai_vit.load_monai(path, cfg)))
    orig = flat_arrays(nnx.state(ours))
    assert set(back) == set(orig)
    for k in orig:
        if k != "mask_token":  # MONAI has no mask token: it is re-initialised on import
            np.testing.assert_array_equal(back[k], orig[k], err_msg=k)


def test_torch_state_dict_file_is_read_weights_only(tmp_path, rng):
    m = _monai(False, False, seed=5)
    path = str(tmp_path / "vit.pt")
    torch.save(m.state_dict(), path)
    cfg = monai_vit.config_from_monai(**ARGS)
    ours = monai_vit.load_monai(path, cfg)
    x = rng.standard_normal((1, 32, 32, 16, 2)).astype(np.float32)
    ref_final, _ = _run_monai(m, x)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))["patch"]), ref_final, atol=1e-4, rtol=0)
    # A pickle carrying arbitrary objects is refused, with the file named.
    bad = str(tmp_path / "evil.pt")
    torch.save({"x": object()}, bad)
    with pytest.raises(ValueError, match="evil.pt"):
        monai_vit.load_monai(bad, cfg)


def test_mismatched_config_is_a_clear_error():
    m = _monai(False, False)
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    cfg = monai_vit.config_from_monai(**{**ARGS, "num_layers": 2})
    with pytest.raises(ValueError, match="blocks.2"):
        monai_vit.load_monai(sd, cfg)
    cfg = monai_vit.config_from_monai(**ARGS, qkv_bias=True)
    with pytest.raises(KeyError, match="attn.qkv.bias"):
        monai_vit.load_monai(sd, cfg)
