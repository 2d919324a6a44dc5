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


def _patch_tokens(params, vols):
    one = sh.make_mesh(None, jax.devices()[:1])
    model = Model(lambda r: ViT3D(CFG, rngs=r), one)
    p1 = jax.device_put(jax.device_get(params), jax.NamedSharding(one, jax.P()))
    with jax.set_mesh(one):
        return np.asarray(model(p1)(jax.device_put(np.asarray(vols, np.float32), jax.NamedSharding(one, jax.P())))["patch"])


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


def _brute_distances(tok, groups, ids, pids, bank_tok, bank_groups, bank_ids, bank_pids, grid):
    """Each patch's cosine distance to the nearest bank patch of its group within one grid step,
    never a bank series of its own patient (unless the bank holds only those) nor itself; a group with fewer than two bank series,
    or none left, uses the whole bank: loops, no shared code."""
    unit = lambda t: t / np.linalg.norm(t, axis=-1, keepdims=True)  # noqa: E731
    pos = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, len(grid))
    out = np.zeros(tok.shape[:2])
    for i in range(len(tok)):
        ok = [k for k in range(len(bank_tok)) if bank_ids[k] != ids[i] and bank_pids[k] != pids[i]]
        ok = ok or [k for k in range(len(bank_tok)) if bank_ids[k] != ids[i]]  # a bank of this patient alone
        same = [k for k in range(len(bank_tok)) if bank_groups[k] == groups[i]]
        rows = [k for k in ok if k in same] if len(same) >= 2 else ok
        rows = rows or ok
        for p in range(tok.shape[1]):
            best = max(float(unit(tok[i, p]) @ unit(bank_tok[k, q])) for k in rows for q in range(tok.shape[1])
                       if np.abs(pos[p] - pos[q]).max() <= 1)
            out[i, p] = 1 - best
    return out


def test_anomaly_pool_equals_a_brute_force_reference(prepared):
    """The bank holds the split's series without findings; every series' ``anomaly`` feature is
    its patch tokens weighted by softmax(distance / tau), tau the bank's mean spread of its own
    leave-patient-out distances; no series is compared with its own patient's bank series."""
    mesh = sh.make_mesh({"data": -1})
    model, params = _model(mesh)
    src = P.data_source(prepared, "train")
    bank = features.normal_bank(model, params, src, mesh, size=CFG.img_size, patch_size=CFG.patch_size, batch_size=8)
    feats = features.extract(model, params, src, mesh, size=CFG.img_size, bank=bank, batch_size=8)
    ex = [T.Decode().map(src[i]) for i in range(len(src))]
    normal = [i for i, e in enumerate(ex) if not str(e["findings"]).strip()]
    assert 2 <= len(bank.series_id) == len(normal) < len(ex)  # the fixture has both kinds
    assert list(bank.series_id) == [str(ex[i]["series_id"]) for i in normal]
    vols = np.stack([T.Resize(CFG.img_size).map(e)["image"] for e in ex])
    tok = _patch_tokens(params, vols)
    np.testing.assert_allclose(bank.tokens, tok[normal], rtol=2e-4, atol=2e-5)
    grid = tuple(s // p for s, p in zip(CFG.img_size, CFG.patch_size))
    groups = np.array([f"{e['body_region']}/{e['sequence']}" for e in ex])
    ids = np.array([str(e["series_id"]) for e in ex])
    pids = np.array([str(e["patient_id"]) for e in ex])
    assert len(set(pids[normal])) < len(normal)  # a patient with two normal series: excluded together
    d = _brute_distances(tok, groups, ids, pids, tok[normal], groups[normal], ids[normal], pids[normal], grid)
    assert (d[normal] > 1e-4).all()  # a bank series compared with the other patients' only
    tau = d[normal].std(1).mean()
    assert bank.tau == pytest.approx(tau, rel=1e-3)
    w = np.exp((d - d.max(1, keepdims=True)) / tau)
    want = np.einsum("mn,mnd->md", w / w.sum(1, keepdims=True), tok)
    np.testing.assert_allclose(feats["anomaly"], want, rtol=2e-3, atol=2e-4)
    assert "patch" not in feats and feats["mean"].shape == feats["anomaly"].shape
    with pytest.raises(ValueError, match="sliding windows"):
        features.extract(model, params, src, mesh, size=CFG.img_size, bank=bank, window=CFG.img_size)


def test_anomaly_pool_finds_the_patch_that_differs():
    """A series made of a normal series' tokens with one patch replaced: its ``anomaly`` feature
    is that patch's token, where the mean pool barely moves; the same tokens under the normal
    series' own id are compared with the other normals only."""
    rng = np.random.default_rng(0)
    grid, dim = (2, 2, 2), 6
    base = np.eye(dim)[0] + 0.05 * rng.normal(size=(3, 8, dim))  # three normal series, one group
    bank = features.NormalBank(base, np.array(["brain/T1"] * 3), np.array(["n0", "n1", "n2"]), grid, tau=0.02)
    odd = base[0].copy()
    odd[5] = np.eye(dim)[3]
    chunk = {"patch": np.stack([odd, base[0]]), "series_id": np.array(["x", "n0"]),
             "body_region": np.array(["brain", "brain"]), "sequence": np.array(["T1", "T1"])}
    out = features.with_anomaly(chunk, bank)
    assert "patch" not in out
    np.testing.assert_allclose(out["anomaly"][0], odd[5], atol=1e-3)
    m = odd.mean(0)
    assert m @ odd[5] / np.linalg.norm(m) < 0.2  # the mean pool stays the normal anatomy
    d = bank.distances(chunk["patch"], ["brain/T1"] * 2, ["x", "n0"])
    assert d[0, 5] > 0.5 and np.delete(d[0], 5).max() < 1e-6  # its other patches are n0's own
    assert d[1].min() > 1e-4  # n0 itself: only n1 and n2, never itself
    assert bank.distances(chunk["patch"][1:], ["brain/T1"], ["other"]).max() < 1e-6
    # Another study of n0's patient: excluded with n0, by patient.
    bank_p = features.NormalBank(base, bank.groups, bank.series_id, grid, 0.02, patient_id=np.array(["p0", "p0", "p1"]))
    assert bank_p.distances(base[:1], ["brain/T1"], ["new"], ["p0"]).min() > 1e-4  # neither n0 nor n1
    assert bank_p.distances(base[:1], ["brain/T1"], ["new"], ["p9"]).max() < 1e-6
    np.testing.assert_allclose(bank_p.distances(base[:1], ["brain/T1"], ["new"], ["p0"]),
                               _brute_distances(base[:1], ["brain/T1"], ["new"], ["p0"], base, ["brain/T1"] * 3,
                                                ["n0", "n1", "n2"], ["p0", "p0", "p1"], grid), rtol=1e-5, atol=1e-6)
    # A group with one bank series is compared with the whole bank, its own series or not.
    mixed = features.NormalBank(base, np.array(["brain/T1", "knee/T2", "knee/T2"]), bank.series_id, grid, 0.02)
    want = _brute_distances(base, ["brain/T1"] * 3, ["q0", "q1", "q2"], ["", "", ""], base,
                            ["brain/T1", "knee/T2", "knee/T2"], ["n0", "n1", "n2"], ["a", "b", "c"], grid)
    np.testing.assert_allclose(mixed.distances(base, ["brain/T1"] * 3, ["q0", "q1", "q2"]), want, rtol=1e-5, atol=1e-6)
    assert mixed.distances(base[:1], ["brain/T1"], ["q"]).max() < 1e-6  # n0 itself is in the whole bank
