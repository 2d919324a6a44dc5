"""Multi-parametric MRI (issue 22): the multi-sequence ViT, BrainMVP's losses and the pretraining step.

Missing sequences must leave no trace: outputs do not move when an absent sequence's pixels do
(NaNs included); the losses match NumPy references; the global-batch contrastive loss on a
2x2x2 mesh equals one device; the templates move and stay finite."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

from decipher_jax import losses
from decipher_jax import sharding as sh
from decipher_jax.models.multiseq import (MultiParamModel, MultiSeqConfig, MultiSeqViT, fill_missing, patchify,
                                          unpatchify)
from decipher_jax.models.vit3d import ViT3D, ViTConfig
from decipher_jax.trainers import common
from decipher_jax.trainers import multiparam as mp

VIT = ViTConfig(dim=32, depth=2, heads=4, mlp_dim=64, patch_size=(8, 8, 8), img_size=(16, 16, 16), num_registers=1)
CFG = MultiSeqConfig(VIT)


def _np_info_nce(a, b, t, valid=None):
    v = np.ones(len(a), bool) if valid is None else np.asarray(valid, bool)
    a, b = np.asarray(a, np.float64)[v], np.asarray(b, np.float64)[v]
    lg = a @ b.T / t

    def ce(m):
        m = m - m.max(1, keepdims=True)
        return -(np.diag(m) - np.log(np.exp(m).sum(1)))

    return float((ce(lg).mean() + ce(lg.T).mean()) / 2)


def test_info_nce_matches_numpy():
    r = np.random.default_rng(0)
    a, b = r.normal(size=(6, 5)), r.normal(size=(6, 5))
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    for t in (0.1, 1.0):
        assert float(losses.info_nce(jnp.asarray(a), jnp.asarray(b), t)) == pytest.approx(_np_info_nce(a, b, t), rel=1e-5)
    valid = np.array([1, 1, 0, 1, 0, 1], bool)  # padding rows leave anchors and negatives alike
    got = float(losses.info_nce(jnp.asarray(a), jnp.asarray(b), 0.1, valid=jnp.asarray(valid)))
    assert got == pytest.approx(_np_info_nce(a, b, 0.1, valid), rel=1e-5)
    # identical views, low temperature: the loss goes to 0; swapped rows: large
    assert float(losses.info_nce(jnp.asarray(a), jnp.asarray(a), 0.01)) < 1e-3
    assert float(losses.info_nce(jnp.asarray(a), jnp.asarray(a[::-1]), 0.01)) > 10


def test_masked_mse_matches_numpy():
    r = np.random.default_rng(1)
    p, t = r.normal(size=(3, 4, 4, 4)), r.normal(size=(3, 4, 4, 4))
    w = r.random((3, 4, 4, 4)) < 0.3
    ref = ((p - t) ** 2)[w].mean()
    assert float(losses.masked_mse(jnp.asarray(p), jnp.asarray(t), jnp.asarray(w))) == pytest.approx(ref, rel=1e-5)
    assert float(losses.masked_mse(jnp.asarray(p), jnp.asarray(t), jnp.zeros_like(w))) == 0.0


def test_patchify_matches_the_vit_token_order():
    r = np.random.default_rng(2)
    x = r.normal(size=(2, 16, 16, 16)).astype(np.float32)
    tok = patchify(jnp.asarray(x), (8, 8, 8))
    np.testing.assert_array_equal(np.asarray(unpatchify(tok, (2, 2, 2), (8, 8, 8))), x)
    # token n of patchify is the patch the ViT's stem embeds as token n: a one-hot kernel on
    # voxel (i, j, k) of the patch reads tok[:, n, (i*8 + j)*8 + k]
    vit = ViT3D(ViTConfig(dim=8, depth=1, heads=1, mlp_dim=8, patch_size=(8, 8, 8), img_size=(16, 16, 16),
                          pos_embed="sincos"), rngs=nnx.Rngs(0))
    kern = np.zeros((8, 8, 8, 1, 8), np.float32)
    kern[1, 2, 3, 0, 0] = 1.0
    vit.patch_kernel[...] = jnp.asarray(kern)
    vit.patch_bias[...] = jnp.zeros(8)
    emb, _ = vit.embed(jnp.asarray(x)[..., None])
    pos = vit.position_embedding((2, 2, 2)).reshape(1, -1, 8)
    np.testing.assert_allclose(np.asarray(emb - pos)[..., 0], np.asarray(tok)[..., (1 * 8 + 2) * 8 + 3], atol=1e-6)


def _study(r, b=3, s=4):
    x = r.random((b, 16, 16, 16, s)).astype(np.float32)
    present = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1]], bool)[:b]
    return x, present


def test_outputs_ignore_absent_sequences_pixels():
    r = np.random.default_rng(3)
    model = MultiSeqViT(CFG, rngs=nnx.Rngs(0))
    x, present = _study(r)
    out = model(jnp.asarray(x), jnp.asarray(present))
    noise = r.normal(size=x.shape).astype(np.float32) * 5
    x2 = np.where(present[:, None, None, None, :], x, noise)
    x2[1, 0, 0, 0, 1] = np.nan  # NaNs too
    out2 = model(jnp.asarray(x2), jnp.asarray(present))
    # the pooled outputs are over the present sequences' tokens only
    patch = np.asarray(out["patch"])
    for i in range(len(present)):
        toks = patch[i][present[i]].reshape(-1, patch.shape[-1])
        np.testing.assert_allclose(np.asarray(out["mean"][i]), toks.mean(0), atol=1e-5)
        np.testing.assert_allclose(np.asarray(out["max"][i]), toks.max(0), atol=1e-5)
    for k in ("cls", "mean", "max"):
        assert np.all(np.isfinite(np.asarray(out2[k])))
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(out2[k]), atol=1e-5)
    for i in range(len(present)):
        for s in np.flatnonzero(present[i]):
            np.testing.assert_allclose(np.asarray(out["patch"][i, s]), np.asarray(out2["patch"][i, s]), atol=1e-5)
    # ... while a present sequence's pixels do move them, and so does which sequences are present
    x3 = x.copy()
    x3[0, ..., 0] += 1.0
    assert not np.allclose(np.asarray(model(jnp.asarray(x3), jnp.asarray(present))["cls"][0]), np.asarray(out["cls"][0]))
    p2 = present.copy()
    p2[0, 3] = False
    assert not np.allclose(np.asarray(model(jnp.asarray(x), jnp.asarray(p2))["cls"][0]), np.asarray(out["cls"][0]))


def test_one_sequence_alone_equals_that_sequence_in_an_otherwise_empty_study():
    """A study of one sequence gives the same output whatever else is in the other channels."""
    r = np.random.default_rng(4)
    model = MultiSeqViT(CFG, rngs=nnx.Rngs(1))
    x = r.random((2, 16, 16, 16, 4)).astype(np.float32)
    only = np.zeros((2, 4), bool)
    only[:, 2] = True
    a = model(jnp.asarray(x), jnp.asarray(only))
    b = model(jnp.asarray(np.where(only[:, None, None, None, :], x, 0.0)), jnp.asarray(only))
    np.testing.assert_allclose(np.asarray(a["cls"]), np.asarray(b["cls"]), atol=1e-6)
    assert np.all(np.isfinite(np.asarray(a["cls"])))


def test_fill_missing_puts_templates_where_sequences_are_absent():
    r = np.random.default_rng(5)
    x, present = _study(r)
    tm = r.random((4, 16, 16, 16)).astype(np.float32)
    filled, p = fill_missing(jnp.asarray(x), jnp.asarray(present), jnp.asarray(tm))
    assert np.all(np.asarray(p))
    np.testing.assert_array_equal(np.asarray(filled)[1, ..., 1], tm[1])
    np.testing.assert_array_equal(np.asarray(filled)[1, ..., 0], x[1, ..., 0])


def _cfg(context="all"):
    c = mlc.ConfigDict()
    c.seed, c.steps, c.guard_update_ratio = 0, 20, 1.0
    c.data = {"sequences": ("T1", "T2", "FLAIR", "DWI"), "size": (16, 16, 16), "batch_size": 8}
    c.model = {"vit": dict(dim=32, depth=2, heads=4, mlp_dim=64, patch_size=(8, 8, 8), img_size=(16, 16, 16)),
               "proj_dim": 16, "decoder_hidden": 0}
    c.pretrain = {"context": context, "block": 8, "mask_ratio": 0.5, "loss_on": "masked", "residual": False, "template_weight": 10.0,
                  "cross_weight": 1.0, "contrastive_weight": 1.0, "temperature": 0.1, "contrastive_start": 0,
                  "templates": "fit"}
    c.optim = {"lr": 3e-3, "warmup_steps": 1, "total_steps": 20, "weight_decay": 0.0, "clip_norm": 1.0,
               "no_decay": ".*",
               "lr_rules": [("templates", 30.0)]}
    return c


def _batch(r, b=8):
    # Four sequences of one anatomy: a sphere whose contrast differs per sequence.
    g = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"), -1)
    x = np.zeros((b, 16, 16, 16, 4), np.float32)
    for i in range(b):
        c = r.uniform(5, 11, 3)
        inside = np.linalg.norm(g - c, axis=-1) < r.uniform(3, 6)
        for s, v in enumerate((0.8, 0.3, 0.5, 0.9)):
            x[i, ..., s] = np.where(inside, v, 0.2) + r.normal(0, 0.02, (16, 16, 16))
    present = r.random((b, 4)) < 0.7
    present[np.arange(b), r.integers(0, 4, b)] = True
    present[0] = [True, False, False, False]  # one study of one sequence (v2 falls back to the template)
    return {"image": np.where(present[:, None, None, None, :], x, 0.0).astype(np.float32), "present": present}


def _setup(cfg, mesh):
    factory, _ = mp.model_factory(cfg)
    model = common.Model(factory, mesh)
    from decipher_jax import optim

    tx = optim.build(cfg.optim, jax.eval_shape(lambda: model.init(jax.random.key(0))), depth=2)
    params = model.init(jax.random.key(0))
    state = {"step": jnp.zeros([], jnp.int32), "rng": jax.random.key_data(jax.random.key(1)), "params": params,
             "opt": tx.init(params)}
    return model, tx, state


@pytest.mark.parametrize("context", ["all", "target"])
def test_step_trains_templates_and_beats_copying_them(context):
    cfg = _cfg(context)
    mesh = sh.make_mesh(None, jax.devices()[:1])
    model, tx, state = _setup(cfg, mesh)
    step = jax.jit(mp.make_step(cfg, model, tx))
    r = np.random.default_rng(6)
    first = None
    for i in range(20):
        state, m = step(state, _batch(r))
        assert bool(m["step_ok"]) and all(np.isfinite(float(v)) for v in m.values())
        first = first or {k: float(m[k]) for k in ("mse_template", "template_rms")}
    tm = np.asarray(state["params"]["templates"])
    assert np.all(np.isfinite(tm)) and float(m["template_rms"]) > 0.05 > first["template_rms"]  # zeros at init
    # the templates learnt the sequences' mean appearance: background 0.2 everywhere
    assert abs(float(np.median(tm)) - 0.2) < 0.1
    assert float(m["mse_template"]) < 0.5 * first["mse_template"]


def test_contrastive_over_the_global_batch_on_a_mesh_equals_one_device():
    cfg = _cfg()
    r = np.random.default_rng(7)
    batch = _batch(r)
    one = sh.make_mesh(None, jax.devices()[:1])
    model1, _, state = _setup(cfg, one)
    key = jax.random.key(3)
    ref = jax.jit(lambda p, b: mp.terms(model1(p), b, key, cfg.pretrain))(state["params"], batch)
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model8 = common.Model(mp.model_factory(cfg)[0], mesh)
    params8 = jax.device_put(jax.device_get(state["params"]), model8.shardings)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda p, b: mp.terms(model8(p), b, key, cfg.pretrain))(params8, sh.shard_batch(batch, mesh))
    for k in ("contrastive", "mse_template", "mse_cross", "copy_template"):
        assert float(got[k]) == pytest.approx(float(ref[k]), rel=1e-4, abs=1e-6), k
    # every row's negatives are the other 7 studies: the loss is not the per-device one
    z = jnp.eye(8)
    assert float(losses.info_nce(z, z, 0.1)) < float(losses.info_nce(z, jnp.roll(z, 1, 0), 0.1))


def test_views_fill_from_templates_and_other_sequences():
    r = np.random.default_rng(8)
    b = _batch(r)
    x, present = jnp.asarray(b["image"]), jnp.asarray(b["present"])
    tm = jnp.asarray(r.random((4, 16, 16, 16)).astype(np.float32))
    v = mp.views(x, present, tm, jax.random.key(0), block=8, ratio=0.5)
    m = np.asarray(v["mask"])
    assert np.all(m.reshape(8, -1).mean(1) == 0.5)  # exactly half of the 8 blocks of each study
    t, o, has_o = (np.asarray(v[k]) for k in ("t", "o", "has_o"))
    assert np.all(np.asarray(present)[np.arange(8), t])
    assert not has_o[0] and np.all(has_o == (np.asarray(present).sum(1) > 1))
    assert np.all(o[has_o] != t[has_o]) and np.all(np.asarray(present)[np.flatnonzero(has_o), o[has_o]])
    xt = np.asarray(x)[np.arange(8), ..., t]
    np.testing.assert_array_equal(np.asarray(v["v1"])[~m], xt[~m])
    np.testing.assert_array_equal(np.asarray(v["v1"])[m], np.asarray(tm)[t][m])
    i = int(np.flatnonzero(has_o)[0])
    np.testing.assert_array_equal(np.asarray(v["v2"])[i][m[i]], np.asarray(x)[i, ..., o[i]][m[i]])
    np.testing.assert_array_equal(np.asarray(v["v2"])[0][m[0]], np.asarray(tm)[t[0]][m[0]])


def test_model_params_have_templates_on_the_input_grid():
    m = MultiParamModel(CFG, proj_dim=8, rngs=nnx.Rngs(0))
    assert m.templates[...].shape == (4, 16, 16, 16) and float(jnp.abs(m.templates[...]).max()) == 0.0
    with pytest.raises(ValueError, match="in_channels must be 1"):
        MultiSeqConfig(ViTConfig(dim=32, depth=1, heads=4, mlp_dim=32, patch_size=8, img_size=16, in_channels=4))


def test_view_contexts_keep_the_target_and_drop_others_per_view():
    present = jnp.asarray(np.array([[1, 1, 1, 1]] * 64 + [[0, 1, 0, 0]] * 64, bool))
    t = jnp.asarray(np.array([2] * 64 + [1] * 64))
    p1, p2 = (np.asarray(a) for a in mp.view_contexts(jax.random.key(0), present, t, 0.5))
    assert np.all(p1[np.arange(128), np.asarray(t)]) and np.all(p2[np.arange(128), np.asarray(t)])
    assert not np.any(p1 & ~np.asarray(present)) and not np.any(p2 & ~np.asarray(present))
    others = np.asarray(present) & (np.arange(4)[None] != np.asarray(t)[:, None])
    assert 0.35 < p1[others].mean() < 0.65 and (p1 != p2).any()  # about half kept, differently per view
    q1, q2 = mp.view_contexts(jax.random.key(0), present, t, 0.0)
    assert np.array_equal(np.asarray(q1), np.asarray(present)) and np.array_equal(np.asarray(q2), np.asarray(present))


def test_voxel_skip_starts_as_the_plain_decoder_and_then_follows_the_views_voxels():
    """``model.voxel_skip``: the input view's voxels reach the decoder through a per-voxel MLP
    the token conditions; its output starts at zero, so the decoder starts as the plain one."""
    plain = MultiParamModel(CFG, proj_dim=8, rngs=nnx.Rngs(0))
    skip = MultiParamModel(CFG, proj_dim=8, voxel_skip=4, rngs=nnx.Rngs(0))
    r = np.random.default_rng(9)
    tok = jnp.asarray(r.normal(size=(2, 8, 32)).astype(np.float32))
    view = jnp.asarray(r.random((2, 8, 512)).astype(np.float32))
    # the same seed: the encoder and the plain decoder are drawn before the skip's parameters
    np.testing.assert_array_equal(np.asarray(skip.dec_out[...]), np.asarray(plain.dec_out[...]))
    np.testing.assert_allclose(np.asarray(skip.decode(tok, view)), np.asarray(plain.decode(tok)), atol=1e-6)
    with pytest.raises(ValueError, match="voxel_skip needs the view"):
        skip.decode(tok)
    skip.skip_out[...] = jnp.ones((4,))
    a, b = np.asarray(skip.decode(tok, view)), np.asarray(skip.decode(tok, view.at[0, 3, 7].add(0.5)))
    changed = np.argwhere(np.abs(a - b) > 1e-6)
    assert [tuple(c) for c in changed] == [(0, 3, 7)]  # that voxel of that patch alone
    # the token conditions it: another token, another mapping of the same voxel
    assert not np.allclose(np.asarray(skip.decode(tok[:, ::-1], view))[:, :, 0], a[:, :, 0])
    # through the step: the skip's parameters train and the losses stay finite
    cfg = _cfg()
    cfg.model.voxel_skip = 4
    model, tx, state = _setup(cfg, sh.make_mesh(None, jax.devices()[:1]))
    step, rb = jax.jit(mp.make_step(cfg, model, tx)), np.random.default_rng(1)
    state2 = state
    for _ in range(3):  # the warm-up's first step has lr 0
        state2, m = step(state2, _batch(rb))
        assert bool(m["step_ok"]) and np.isfinite(float(m["loss"]))
    assert float(jnp.abs(state2["params"]["skip_out"] - state["params"]["skip_out"]).max()) > 0
