"""Frozen-feature extraction: whole-volume resizes and sliding windows over volumes larger than
the crop, each equal to a direct single-device forward, written in chunks and read back."""

import jax
import numpy as np
import pytest

from decipher_jax import sharding as sh
from decipher_jax.data import pipelines as P
from decipher_jax.data import transforms as T
from decipher_jax.eval import features, seghead
from decipher_jax.models.vit3d import ViT3D, ViTConfig
from decipher_jax.state import Model

CFG = ViTConfig(dim=16, depth=2, heads=2, mlp_dim=32, patch_size=(4, 4, 4), img_size=(8, 8, 8))


def _model(mesh):
    model = Model(lambda r: ViT3D(CFG, rngs=r), mesh)
    return model, model.init(jax.random.key(0))


def _direct(params, vols):
    """Single-device reference: the ViT applied to (B, X, Y, Z, 1) volumes, mean patch token."""
    one = sh.make_mesh(None, jax.devices()[:1])
    model = Model(lambda r: ViT3D(CFG, rngs=r), one)
    rep = jax.NamedSharding(one, jax.P())
    p1 = jax.device_put(jax.device_get(params), rep)
    with jax.set_mesh(one):
        out = model(p1)(jax.device_put(np.asarray(vols, np.float32), rep))
    return np.asarray(out["cls"]), np.asarray(out["patch"]).mean(1), np.asarray(out["patch"]).max(1)


def test_whole_volume_features_equal_a_direct_forward(prepared, tmp_path):
    mesh = sh.make_mesh({"data": -1})
    model, params = _model(mesh)
    src = P.data_source(prepared, "train")
    feats = features.extract(model, params, src, mesh, size=CFG.img_size, out_dir=str(tmp_path / "f"),
                             layers=(0,), chunk_batches=1, batch_size=8)
    assert len(feats["mean"]) == len(src) and feats["layer0_mean"].shape == (len(src), CFG.dim)
    assert len(list((tmp_path / "f").glob("part-*.npz"))) > 1  # streamed in chunks
    loaded = features.load(str(tmp_path / "f"))
    np.testing.assert_array_equal(loaded["mean"], feats["mean"])
    ids = [T.Decode().map(src[i])["series_id"] for i in range(len(src))]
    assert list(feats["series_id"]) == ids
    vols = np.stack([T.Resize(CFG.img_size).map(T.Decode().map(src[i]))["image"] for i in range(len(src))])
    cls, mean, mx = _direct(params, vols)
    np.testing.assert_allclose(feats["cls"], cls, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(feats["mean"], mean, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(feats["max"], mx, rtol=2e-4, atol=2e-5)
    both = features.combined(feats, "mean+max")
    np.testing.assert_array_equal(both, np.concatenate([feats["mean"], feats["max"]], 1))
    with pytest.raises(KeyError, match="'pooled'"):
        features.combined(feats, "mean+pooled")


def test_sliding_window_features_equal_a_loop_over_windows(prepared, tmp_path):
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model, params = _model(mesh)
    src = P.data_source(prepared, "train")
    n = 3
    sub = [src[i] for i in range(n)]
    window = CFG.img_size
    feats = features.extract(model, params, sub, mesh, size=CFG.img_size, window=window, overlap=0.5,
                             out_dir=str(tmp_path / "w"), batch_size=8)
    assert feats["mean"].shape == (n, CFG.dim) and len(feats["series_id"]) == n
    for i in range(n):
        vol = np.asarray(T.Decode().map(sub[i])["image"], np.float32)
        assert any(s > w for s, w in zip(vol.shape, window))  # larger than the crop: really tiled
        padded = seghead.pad_to_window(vol[None], window)[0]
        corners = seghead.window_corners(padded.shape[:3], window, 0.5)
        wins = np.stack([padded[x:x + 8, y:y + 8, z:z + 8] for x, y, z in corners])
        cls, mean, _ = _direct(params, wins)
        np.testing.assert_allclose(feats["cls"][i], cls.mean(0), rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(feats["mean"][i], mean.mean(0), rtol=2e-4, atol=2e-5)
    np.testing.assert_array_equal(features.load(str(tmp_path / "w"))["mean"], feats["mean"])
