"""Grain pipelines: exact resume, determinism by seed, host sharding, crops/masks, MLM, global arrays."""

import jax
import numpy as np
import pytest

from data_prep import prep, volume
from decipher_jax import sharding as sh
from decipher_jax.data import pipelines as P
from decipher_jax.data import synthetic
from decipher_jax.data import transforms as T

CROPS = T.MultiCrop(global_size=(16, 16, 16), local_size=(8, 8, 8), n_local=2, patch_size=(4, 4, 4))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_resume_is_exact(prepared, workers):
    src = P.data_source(prepared, "train")
    cfg = P.LoaderConfig(batch_size=4, seed=3, num_workers=workers)
    ref = _take(iter(P.vision_ssl(src, cfg, CROPS)), 5)
    it = iter(P.vision_ssl(src, cfg, CROPS))
    _take(it, 2)
    state = it.get_state()
    fresh = iter(P.vision_ssl(src, cfg, CROPS))  # a new process would build a new iterator
    fresh.set_state(state)
    for a, b in zip(_take(fresh, 3), ref[2:]):
        assert _same(a, b)


def test_deterministic_by_seed(prepared):
    src = P.data_source(prepared, "train")
    a = _take(iter(P.vision_ssl(src, P.LoaderConfig(batch_size=2, seed=7), CROPS)), 3)
    b = _take(iter(P.vision_ssl(src, P.LoaderConfig(batch_size=2, seed=7), CROPS)), 3)
    c = _take(iter(P.vision_ssl(src, P.LoaderConfig(batch_size=2, seed=8), CROPS)), 3)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x["global"], y["global"]) for x, y in zip(a, c))


def test_multicrop_shapes_and_masks(prepared):
    src = P.data_source(prepared, "train")
    b = next(iter(P.vision_ssl(src, P.LoaderConfig(batch_size=4, seed=0), CROPS)))
    assert b["global"].shape == (4, 2, 16, 16, 16, 1) and b["local"].shape == (4, 2, 8, 8, 8, 1)
    assert b["masks"].shape == (4, 2, 64) and b["masks"].dtype == bool
    ratios = b["masks"].mean(-1)
    assert np.all((ratios == 0) | ((ratios >= 0.05) & (ratios <= 0.55)))


def test_block_mask_hits_its_budget_in_blocks():
    rng = np.random.default_rng(0)
    for n in (10, 40, 100):
        m = T.block_mask(rng, (8, 8, 8), n).reshape(8, 8, 8)
        assert n - 4 <= m.sum() <= n  # DINOv2 semantics: may fall short by less than a block
        # Blocks, not scattered tokens: most masked tokens have a masked neighbour.
        nb = sum(np.roll(m, s, a) for a in range(3) for s in (-1, 1))
        assert (nb[m] > 0).mean() > 0.9


def test_mlm_masking_statistics():
    mlm = P.MlmMask(vocab_size=1000, mask_id=103, special_ids=(0, 101, 102), max_predictions=20)
    ids = np.r_[101, np.arange(1000, 1100) % 900 + 200, 102, np.zeros(26, int)].astype(np.int32)
    ex = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int32)}
    rng = np.random.default_rng(0)
    kinds = np.zeros(3)
    for _ in range(300):
        out = mlm.random_map(ex, rng)
        sel = out["mlm_labels"] >= 0
        assert sel.sum() == 15  # 15% of 100 maskable tokens, under the cap of 20
        assert not sel[[0, 101]].any() and not sel[102:].any()  # specials and padding never predicted
        np.testing.assert_array_equal(out["mlm_labels"][sel], ids[sel])
        c = out["mlm_ids"][sel]
        kinds += [(c == 103).sum(), ((c != 103) & (c != ids[sel])).sum(), (c == ids[sel]).sum()]
    frac = kinds / kinds.sum()
    assert abs(frac[0] - 0.8) < 0.03 and abs(frac[1] - 0.1) < 0.03 and abs(frac[2] - 0.1) < 0.03


def test_host_shards_are_disjoint_and_cover(prepared):
    src = P.data_source(prepared, "train")
    cfg = P.LoaderConfig(batch_size=2, shuffle=False, repeat=False, drop_remainder=False)
    seen = []
    for pi in range(2):
        ds = P.images(src, cfg, (8, 8, 8), process_index=pi, process_count=2)
        seen.append({int(h) for b in ds for h in b["series_id_hash"]})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(src)


def test_text_and_pair_pipelines(prepared, minilm_path):
    from decipher_jax.models.bert import load_tokenizer

    src = P.data_source(prepared, "train")
    studies = {src[i]["study_id"] for i in range(len(src))}
    rep = P.reports(src, P.LoaderConfig(batch_size=1, shuffle=False, repeat=False), minilm_path, max_length=64)
    assert len(list(rep)) == len(studies)  # one report per study, not per series
    b = next(iter(P.pairs(src, P.LoaderConfig(batch_size=2, shuffle=False), (16, 16, 16), minilm_path, max_length=64,
                          train=False)))
    tok = load_tokenizer(minilm_path)
    expect = tok(src[0]["report"].decode(), max_length=64, truncation=True, padding="max_length")["input_ids"]
    np.testing.assert_array_equal(b["input_ids"][0], expect)
    assert b["image"].shape == (2, 16, 16, 16, 1) and b["study_id_hash"].shape == (2,)
    np.testing.assert_array_equal(b["pair_id_hash"], b["study_id_hash"])  # the report: one text per study


def test_pairs_with_series_descriptions(prepared, minilm_path):
    """Stage 2's "description+report" text: each series is paired with its own description and
    its study's report; the series of one study get different text ids, one study the same."""
    from decipher_jax.models.bert import load_tokenizer

    src = P.data_source(prepared, "train")
    n = len(src)
    loader = P.LoaderConfig(batch_size=n, shuffle=False, repeat=False, drop_remainder=False)
    b = next(iter(P.pairs(src, loader, (16, 16, 16), minilm_path, max_length=64, train=False,
                          text="description+report")))
    tok = load_tokenizer(minilm_path)
    descs = [src[i]["series_description"].decode() for i in range(n)]
    assert all(descs) and len(set(descs)) > 4  # the generator writes scanner-style descriptions
    text = f"SERIES: {descs[0]}.\n{src[0]['report'].decode()}"
    expect = tok(text, max_length=64, truncation=True, padding="max_length")["input_ids"]
    np.testing.assert_array_equal(b["input_ids"][0], expect)
    line = tok(f"SERIES: {descs[0]}.", max_length=P.DESCRIPTION_LENGTH, truncation=True, padding="max_length")
    np.testing.assert_array_equal(b["desc_ids"][0], line["input_ids"])
    np.testing.assert_array_equal(b["desc_mask"][0], line["attention_mask"])
    np.testing.assert_array_equal(b["has_desc"], 1.0)
    pairs = {(int(s), int(p)) for s, p in zip(b["study_id_hash"], b["pair_id_hash"])}
    per_study = {s: {p for s2, p in pairs if s2 == s} for s, _ in pairs}
    assert max(len(v) for v in per_study.values()) >= 2  # a study's series: different texts
    assert len({p for _, p in pairs}) == sum(len(v) for v in per_study.values())  # a text: one study
    with pytest.raises(ValueError, match="data.text"):
        P.PairText("description")


def test_global_arrays_on_the_mesh(prepared):
    mesh = sh.make_mesh({"data": 4, "fsdp": 2})
    src = P.data_source(prepared, "train")
    b = next(iter(P.vision_ssl(src, P.LoaderConfig(batch_size=8, seed=0), CROPS)))
    g = P.to_global(b, mesh)
    assert isinstance(g["global"], jax.Array) and g["global"].shape == (8, 2, 16, 16, 16, 1)
    assert g["global"].sharding.spec == sh.logical_to_spec(("batch",) + (None,) * 5)
    assert g["global"].addressable_shards[0].data.shape == (1, 2, 16, 16, 16, 1)
    np.testing.assert_array_equal(np.asarray(g["masks"]), b["masks"])


def test_resize_matches_torch_trilinear_and_crops_keep_labels_aligned():
    import torch

    r = np.random.default_rng(0)
    v = r.random((30, 41, 25, 1)).astype(np.float16)  # stored dtype; output is float32
    ours = T._resize(v, (16, 20, 33))
    ref = torch.nn.functional.interpolate(torch.from_numpy(v[..., 0].astype(np.float32))[None, None], size=(16, 20, 33),
                                          mode="trilinear", align_corners=False)[0, 0].numpy()
    assert ours.dtype == np.float32 and np.abs(ours[..., 0] - ref).max() < 1e-5
    # A crop of an image that *is* its label map keeps the two aligned (nearest for labels).
    lab = np.zeros((40, 40, 40), np.uint8)
    lab[10:25, 5:30, 12:20] = 1
    img = lab[..., None].astype(np.float32)
    for seed in range(5):
        crop, lcrop = T.RandomResizedCrop3D((16, 16, 16), (0.3, 1.0))(img, np.random.default_rng(seed), label=lab)
        agree = ((crop[..., 0] > 0.5) == (lcrop == 1)).mean()
        assert lcrop.dtype == np.uint8 and agree > 0.95


def test_zlib_records_decode_identically(tmp_path):
    m = synthetic.generate_corpus(str(tmp_path / "raw"), n_patients=2, seed=5, matrix=16)
    srcs = []
    for comp in ("none", "zlib"):
        res = prep.run(m, str(tmp_path / comp), prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(6.0,) * 3),
                                                                split_fractions=(1.0, 0.0, 0.0), workers=1,
                                                                compression=comp), progress=False)
        srcs.append(P.data_source(res.tfds_dir, "train"))
    assert len(srcs[0]) == len(srcs[1]) > 0
    for i in range(len(srcs[0])):
        np.testing.assert_array_equal(srcs[0][i]["volume"], srcs[1][i]["volume"])


def test_orbax_checkpoint_of_state_and_iterator_resumes_exactly(prepared, tmp_path):
    """Model state + Grain iterator through Orbax; restored onto a different mesh."""
    import jax.numpy as jnp

    from decipher_jax import checkpoint as ckpt

    src = P.data_source(prepared, "train")
    cfg = P.LoaderConfig(batch_size=4, seed=4)
    ref = _take(iter(P.vision_ssl(src, cfg, CROPS)), 4)
    mesh8 = sh.make_mesh({"data": 4, "fsdp": 2})
    state = {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2), jax.NamedSharding(mesh8, jax.P("fsdp")))}
    it = iter(P.vision_ssl(src, cfg, CROPS))
    _take(it, 2)
    mngr = ckpt.manager(str(tmp_path / "ckpt"))
    ckpt.save(mngr, 2, state, it)
    mngr.wait_until_finished()
    # "Another process": a fresh iterator, and a 1-device mesh for the state.
    mesh1 = sh.make_mesh(None, jax.devices()[:1])
    target = {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=jax.NamedSharding(mesh1, jax.P()))}
    fresh = iter(P.vision_ssl(src, cfg, CROPS))
    step, restored = ckpt.restore(ckpt.manager(str(tmp_path / "ckpt")), target, fresh)
    assert step == 2 and restored["w"].sharding.mesh.size == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(16.0).reshape(8, 2))
    for a, b in zip(_take(fresh, 2), ref[2:]):
        assert _same(a, b)


def test_checkpoint_manager_accepts_relative_paths(tmp_path, monkeypatch):
    """Regression: `make demo` passes a relative workdir; Orbax itself requires absolute paths."""
    import jax.numpy as jnp

    from decipher_jax import checkpoint as ckpt

    monkeypatch.chdir(tmp_path)
    mngr = ckpt.manager("relative/ckpt", async_save=False)
    ckpt.save(mngr, 1, {"w": jnp.ones(3)}, force=True)
    mngr.wait_until_finished()
    assert (tmp_path / "relative" / "ckpt" / "1").is_dir()
    step, restored = ckpt.restore(ckpt.manager("relative/ckpt"), {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert step == 1 and float(restored["w"].sum()) == 3.0


def test_gaussian_noise_is_standard_normal_and_augment_in_place():
    """Box-Muller noise: moments and a KS test against N(0, 1); odd sizes; deterministic by rng.
    Augment's in-place chain equals the plain expression of its steps."""
    from scipy import stats

    z = T.gaussian(np.random.default_rng(0), (201, 1001))
    assert z.dtype == np.float32 and z.shape == (201, 1001) and np.isfinite(z).all()
    x = z.ravel().astype(np.float64)
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01 and abs(stats.skew(x)) < 0.02
    assert abs(stats.kurtosis(x)) < 0.03 and stats.kstest(x[:100_000], "norm").pvalue > 1e-3
    np.testing.assert_array_equal(T.gaussian(np.random.default_rng(3), (7,)), T.gaussian(np.random.default_rng(3), (7,)))

    vol = np.random.default_rng(1).normal(0.3, 0.3, (9, 8, 7, 1)).astype(np.float16)
    aug = T.Augment(flip_p=0.5, noise=0.02)
    for seed in range(4):
        out = aug(vol, np.random.default_rng(seed))
        r = np.random.default_rng(seed)
        flips = [ax for ax in range(3) if r.random() < 0.5]
        ref = np.clip(np.flip(vol, flips).astype(np.float32), 0, None) ** np.float32(np.exp(r.uniform(-0.2, 0.2)))
        ref = ref * np.float32(1 + r.uniform(-0.1, 0.1)) + np.float32(r.uniform(-0.1, 0.1))
        ref = ref + np.float32(0.02) * T.gaussian(r, vol.shape)
        assert out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
