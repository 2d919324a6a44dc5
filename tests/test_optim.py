"""Optax builder: schedules, weight-decay masks, regex lr rules, layer decay, freezing, clipping."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from decipher_jax import optim


def _params():
    return {
        "backbone": {"patch_kernel": jnp.ones((2, 3)), "pos_embed": jnp.ones((4,)),
                     "blocks": {"qkv_kernel": jnp.ones((3, 2, 2)), "ln1_scale": jnp.ones((3, 2)),
                                "out_bias": jnp.ones((3, 2))},
                     "norm": {"scale": jnp.ones((2,))}},
        "head": {"kernels": [jnp.ones((2, 2))], "last_layer_v": jnp.ones((2, 5))},
    }


def _cfg(**kw):
    c = mlc.ConfigDict(dict(lr=1.0, min_lr=0.0, warmup_steps=2, total_steps=10, weight_decay=0.0,
                            weight_decay_end=0.0, b1=0.0, b2=0.0))
    c.update(kw)
    return c


def _one_update(tx, params, grads, steps=1):
    state = tx.init(params)
    for _ in range(steps):
        upd, state = tx.update(grads, state, params)
    return upd, state


def test_schedules():
    lr = optim.warmup_cosine(1.0, 10, 110, 0.1)
    assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 1.0) < 1e-6 and abs(float(lr(110)) - 0.1) < 1e-6
    wd = optim.cosine_between(0.04, 0.4, 100)
    assert abs(float(wd(0)) - 0.04) < 1e-7 and abs(float(wd(50)) - 0.22) < 1e-6 and abs(float(wd(200)) - 0.4) < 1e-7


def test_weight_decay_mask_spares_norms_biases_embeddings():
    p = _params()
    tx = optim.build(_cfg(weight_decay=0.5, weight_decay_end=0.5, warmup_steps=0, lr=1.0), p)
    zeros = jax.tree.map(jnp.zeros_like, p)
    upd, _ = _one_update(tx, p, zeros, steps=2)  # step 0 has lr 0 (warm-up)
    flat = {}
    optim.map_paths(lambda path, u: flat.__setitem__(path, bool(jnp.any(u != 0))), upd)
    assert flat["backbone/patch_kernel"] and flat["backbone/blocks/qkv_kernel"] and flat["head/kernels/0"]
    for spared in ("backbone/pos_embed", "backbone/blocks/ln1_scale", "backbone/blocks/out_bias", "backbone/norm/scale"):
        assert not flat[spared], spared


def test_lr_rules_layer_decay_and_freezing():
    p = _params()
    g = jax.tree.map(jnp.ones_like, p)
    c = _cfg(warmup_steps=0, lr_rules=[("backbone/patch_.*", 0.2), ("head/.*", None)], layer_decay=0.5)
    tx = optim.build(c, p, depth=3)
    upd, state = _one_update(tx, p, g, steps=2)  # step 1: lr at its peak
    base = -1.0  # adam with b1 = b2 = 0: unit step, lr 1 at step 0 after 0 warm-up
    L = 3
    np.testing.assert_allclose(upd["backbone"]["patch_kernel"], base * 0.2 * 0.5 ** (L + 1), rtol=1e-5)
    per_layer = np.asarray(upd["backbone"]["blocks"]["qkv_kernel"])[:, 0, 0]
    np.testing.assert_allclose(per_layer, base * 0.5 ** np.array([3, 2, 1]), rtol=1e-5)  # block i -> L+1-(i+1)
    np.testing.assert_allclose(upd["backbone"]["norm"]["scale"], base, rtol=1e-5)
    # Frozen head: zero updates and no Adam moments allocated for it.
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(upd["head"]))
    n_state = sum(np.size(x) for x in jax.tree.leaves(state))
    n_backbone = sum(x.size for x in jax.tree.leaves(p["backbone"]))
    assert n_state < 3 * n_backbone + 10


def test_last_layer_frozen_for_the_first_steps_and_group_clipping():
    p = _params()
    g = jax.tree.map(jnp.ones_like, p)
    tx = optim.build(_cfg(warmup_steps=0, freeze_last_layer_steps=2), p)
    state = tx.init(p)
    moved = []
    for _ in range(3):
        upd, state = tx.update(g, state, p)
        moved.append(float(jnp.abs(upd["head"]["last_layer_v"]).max()) > 0)
    assert moved == [False, False, True]
    clip = optim.clip_by_group_norm(1.0, ("backbone", "head"))
    big = jax.tree.map(lambda x: 10 * jnp.ones_like(x), p)
    out, _ = clip.update(big, clip.init(big))
    assert abs(float(optax.global_norm(out["backbone"])) - 1.0) < 1e-4
    assert abs(float(optax.global_norm(out["head"])) - 1.0) < 1e-4


def test_current_hparams_are_reported():
    p = _params()
    tx = optim.build(_cfg(weight_decay=0.04, weight_decay_end=0.4), p)
    _, state = _one_update(tx, p, jax.tree.map(jnp.ones_like, p), steps=2)
    h = optim.current_hparams(state)
    # The lr of the latest (second) update: step 1 of a 2-step warm-up to 1.0.
    assert abs(float(h["lr"]) - 0.5) < 1e-6 and 0.04 < float(h["weight_decay"]) < 0.4


def test_optimizer_state_shardings_follow_params_even_with_frozen_towers():
    """Regression: a frozen tower (multi_transform) broke optax.tree_map_params-based shardings."""
    from decipher_jax import sharding as sh
    from decipher_jax.state import opt_shardings

    mesh = sh.make_mesh({"fsdp": 2, "data": -1})
    p = {"backbone": {"w": jnp.ones((4, 6)), "b": jnp.ones((6,))}, "head": {"w": jnp.ones((4, 2))}}
    row = jax.NamedSharding(mesh, jax.P("fsdp"))
    rep = jax.NamedSharding(mesh, jax.P())
    shard = {"backbone": {"w": row, "b": rep}, "head": {"w": row}}
    for rules in ([], [("backbone/.*", None)]):
        tx = optim.build(_cfg(lr_rules=rules), p)
        out = opt_shardings(tx, p, shard, mesh)
        state = jax.eval_shape(tx.init, p)
        leaves = jax.tree.leaves(out)
        assert len(leaves) == len(jax.tree.leaves(state))
        # Every 2-D (4, k) state leaf is an Adam moment of a kernel and must be fsdp-sharded.
        for s, x in zip(leaves, jax.tree.leaves(state)):
            assert s == (row if x.ndim == 2 else rep), (x.shape, s)
        n_moments = sum(x.ndim == 2 for x in jax.tree.leaves(state))
        assert n_moments == (2 if rules else 4)  # frozen backbone: no moments for its kernel



def test_schedule_length_follows_a_steps_override():
    """Overriding a trainer's step count (``--config.steps=3000``) stretches its lr schedule too:
    a schedule left at the default length sits at lr 0 for the rest of the run (as it did for
    2000 of the 3000 steps of an earlier benchmark). Setting ``optim.total_steps`` decouples."""
    import os

    from decipher_jax.trainers import common

    configs = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")
    for spec in ("clip_align.py:tiny,locktext", "clip_align.py", "text_mlm.py:tiny", "vision_ssl.py:tiny"):
        c = common.load_config(os.path.join(configs, spec), {"steps": 3000})
        assert c.optim.total_steps == 3000, spec
        lr = optim.warmup_cosine(c.optim.lr, c.optim.warmup_steps, c.optim.total_steps)
        assert float(lr(2000)) > 0.1 * c.optim.lr, spec  # mid-run, not already decayed to 0
        c = common.load_config(os.path.join(configs, spec), {"steps": 3000, "optim.total_steps": 500})
        assert c.optim.total_steps == 500 and c.steps == 3000, spec
