"""Localisation scores by hand, and the heatmap upsampling."""

import numpy as np
import pytest

from decipher_jax.eval import localisation as L


def test_pointing_game_and_voxel_auroc_by_hand():
    mask = np.zeros((2, 4, 4, 4), np.uint8)
    mask[:, 1, 1, 1] = 1
    heat = np.zeros((2, 4, 4, 4))
    heat[0, 1, 1, 1] = 5.0  # sample 0 points at the lesion
    heat[1, 3, 3, 3] = 5.0  # sample 1 points elsewhere...
    heat[1, 1, 1, 1] = 1.0  # ...but ranks the lesion above every other voxel but one
    np.testing.assert_array_equal(L.pointing_game(heat, mask), [True, False])
    auc = L.voxel_auroc(heat, mask)
    assert auc[0] == pytest.approx(1.0)
    assert auc[1] == pytest.approx(62 / 63)  # one negative of 63 scores above the lesion


def test_upsample_is_trilinear_and_keeps_the_peak_region():
    grid = np.zeros((1, 4, 4, 4), np.float32)
    grid[0, 3, 0, 0] = 1.0
    up = np.asarray(L.upsample(grid, (32, 32, 32)))
    assert up.shape == (1, 32, 32, 32)
    peak = np.unravel_index(up[0].argmax(), up.shape[1:])
    assert peak[0] >= 24 and peak[1] < 8 and peak[2] < 8  # in the corner patch's voxels
    const = np.asarray(L.upsample(np.full((1, 4, 4, 4), 0.3, np.float32), (8, 8, 8)))
    np.testing.assert_allclose(const, 0.3, rtol=1e-6)


@pytest.mark.parametrize("pool", ["max", "mean", "mean+max"])
def test_patch_contributions_sum_to_the_image_embedding(pool):
    """Each patch's share of a pooled image embedding: the shares sum to the projected pooled
    features, and under a max only the channels' arg-max patches hold any."""
    import jax
    from flax import nnx

    from decipher_jax.models.bert import BertConfig
    from decipher_jax.models.towers import TowersConfig, TwoTowers
    from decipher_jax.models.vit3d import ViTConfig

    vit = ViTConfig(dim=16, depth=1, heads=2, mlp_dim=32, patch_size=(4, 4, 4), img_size=(8, 8, 8))
    bert = BertConfig.from_hf(dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=16), mlm_head=False)
    m = TwoTowers(vit, bert, TowersConfig(image_pool=pool, embed_dim=8), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 8, 1))
    c = np.asarray(m.patch_contributions(x))
    pooled, patch = m.image_features(x)
    assert c.shape == (3, patch.shape[1], 8)
    np.testing.assert_allclose(c.sum(1), np.asarray(m.project_image(pooled)), rtol=1e-4, atol=1e-5)
    if pool == "max":  # a patch that is the arg-max of no channel contributes nothing
        owners = np.asarray(patch).argmax(1)  # (B, D)
        for b in range(3):
            idle = sorted(set(range(patch.shape[1])) - set(owners[b].tolist()))
            assert np.all(c[b, idle] == 0)
    cls = TwoTowers(vit, bert, TowersConfig(image_pool="cls", embed_dim=8), rngs=nnx.Rngs(0))
    assert cls.patch_contributions(x) is None


def test_visual_map_is_the_nearest_normal_patch_within_reach(rng):
    """Against a brute-force loop: the cosine distance to the nearest bank token of the same
    group at most one grid step away; an anomalous patch stands out; a group the bank lacks
    is compared with the whole bank."""
    grid, d = (3, 3, 2), 16
    n = int(np.prod(grid))
    bank = rng.normal(size=(4, n, d)).astype(np.float32)
    bank_groups = ["brain/T1", "brain/T1", "knee/T2", "knee/T2"]
    test = bank[[0, 2, 3]].copy() + 0.01 * rng.normal(size=(3, n, d)).astype(np.float32)
    test[0, 7] = -bank[0, 7] * 3  # an anomaly: opposite to every normal token near it
    groups = ["brain/T1", "knee/T2", "spine/T2"]
    got = L.visual_map(test, groups, bank, bank_groups, grid)
    assert got.shape == (3, *grid)
    pos = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    for i, g in enumerate(groups):
        rows = [k for k, bg in enumerate(bank_groups) if bg == g] or list(range(4))
        for p in range(n):
            best = max(float(unit(test[i, p]) @ unit(bank[k, q])) for k in rows for q in range(n)
                       if np.abs(pos[p] - pos[q]).max() <= 1)
            assert got[i].reshape(-1)[p] == pytest.approx(1 - best, abs=1e-5)
    assert got[0].reshape(-1).argmax() == 7 and got[0].reshape(-1)[7] > 0.3
    assert np.delete(got[0].reshape(-1), 7).max() < 0.01  # the normal patches find themselves


def test_score_maps_in_the_body():
    """Voxels outside the body neither count for the AUROC nor win the pointing game."""
    mask = np.zeros((1, 4, 4, 4), bool)
    mask[0, 1, 1, 1] = True
    body = np.zeros((1, 4, 4, 4), bool)
    body[0, :2] = True
    heat = np.zeros((1, 4, 4, 4))
    heat[0, 3] = 9.0  # air lights up
    heat[0, 1, 1, 1] = 5.0
    s = L.score_maps(heat, mask, body)
    assert not s["pointing_game"][0] and s["pointing_game_body"][0]
    assert s["voxel_auroc"][0] < 0.8 and s["voxel_auroc_body"][0] == pytest.approx(1.0)


def test_detection_scores_each_series_by_its_maps_maximum():
    """Series-level detection: a series' score is its map's maximum (one anomalous patch is
    enough, whatever the rest), scored by AUROC over all series and per body region."""
    maps = np.zeros((6, 2, 2, 2), np.float32)
    maps[:, 0, 0, 0] = [0.9, 0.2, 0.7, 0.1, 0.3, 0.5]  # series' maxima
    maps[1] += 0.15  # a uniformly higher normal map stays below the abnormal series' peaks: 0.35
    abnormal = np.array([1, 0, 1, 0, 0, 1], bool)
    lesion = np.array([1, 0, 0, 0, 0, 1], bool)
    regions = np.array(["brain", "brain", "knee", "knee", "spine", "spine"])
    d = L.detect(maps, abnormal, lesion, regions)
    assert d["abnormal_auroc"] == pytest.approx(1.0)  # 0.9, 0.7, 0.5 above 0.35, 0.1, 0.3
    # a lesion: 0.9 and 0.5 against 0.35, 0.7, 0.1, 0.3: 7 of 8 pairs ordered
    assert d["lesion_auroc"] == pytest.approx(7 / 8)
    assert (d["n_series"], d["n_abnormal"], d["n_lesion"]) == (6, 3, 2)
    assert d["per_region"]["brain"]["abnormal_auroc"] == pytest.approx(1.0)
    assert np.isnan(d["per_region"]["knee"]["lesion_auroc"])  # no lesion in the knee: undefined
    flat = L.detect(maps.mean(axis=(1, 2, 3), keepdims=True), abnormal, lesion, regions)  # a mean ranks otherwise
    assert flat["abnormal_auroc"] < 1.0
