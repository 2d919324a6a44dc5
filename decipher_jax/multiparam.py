"""Multi-parametric MRI (BrainMVP's objectives) as pure functions, shared by the trainer
(:mod:`decipher_jax.trainers.multiparam`), the evaluation (:mod:`decipher_jax.eval.multiparam`) and
the report: the model from a config, the two views of a study's target sequence, the encoder's
input, the reconstruction, every loss term, and a trained run read back (:func:`load`).
See the trainer's docstring for the objectives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from decipher_jax import layout, losses
from decipher_jax.models.multiseq import MultiParamModel, MultiSeqConfig, patchify, unpatchify
from decipher_jax.models.vit3d import ViTConfig

CONTEXTS = ("all", "target")
TEMPLATES = ("fit", "reconstruction")


HELDOUT = "heldout.json"  # a run's held-out reconstruction against the copy baselines


def model_config(cfg) -> MultiSeqConfig:
    return MultiSeqConfig(ViTConfig(**{**cfg.model.vit.to_dict(), "in_channels": 1}), tuple(cfg.data.sequences))


def model_factory(cfg):
    mcfg = model_config(cfg)
    m = cfg.model
    return (lambda rngs: MultiParamModel(mcfg, proj_dim=m.proj_dim, decoder_hidden=m.decoder_hidden,
                                         voxel_skip=m.get("voxel_skip", 0), rngs=rngs)), mcfg


def block_mask(key, batch: int, size, block: int, ratio: float):
    """``(B, X, Y, Z)`` bool: exactly ``round(ratio * blocks)`` of the ``block``^3 blocks of each
    volume masked (at least one), uniformly at random."""
    if any(s % block for s in size):
        raise ValueError(f"pretrain.block {block} must divide the input size {tuple(size)}")
    grid = tuple(s // block for s in size)
    nb = int(np.prod(grid))
    k = min(nb, max(1, int(round(ratio * nb))))
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, nb)), axis=1), axis=1)
    m = (rank < k).reshape((batch,) + grid)
    for ax in range(3):
        m = jnp.repeat(m, block, axis=ax + 1)
    return m


def choose(key, allowed):
    """One index per row drawn uniformly among ``allowed`` (B, S); 0 for a row with none."""
    logits = jnp.where(allowed, 0.0, -jnp.inf)
    idx = jax.random.categorical(key, jnp.where(allowed.any(1, keepdims=True), logits, 0.0), axis=1)
    return jnp.where(allowed.any(1), idx, 0)


def channel(x, idx):
    """``(B, X, Y, Z, S)``, ``(B,)`` -> ``(B, X, Y, Z)``: each row's channel ``idx``."""
    return jnp.take_along_axis(x, idx[:, None, None, None, None], axis=-1)[..., 0]


def views(x, present, templates, key, *, block: int, ratio: float, fit_templates: bool = False):
    """The two views of each study's target sequence: ``dict(t, o, has_o, mask, target, v1, v2,
    fill1, fill2)``; see the module docstring."""
    b, s = present.shape
    kt, ko, km = jax.random.split(key, 3)
    t = choose(kt, present)
    others = present & (jnp.arange(s)[None] != t[:, None])
    o = choose(ko, others)
    has_o = others.any(1)
    mask = block_mask(km, b, x.shape[1:4], block, ratio)
    target = channel(x, t)
    fill1 = templates[t].astype(x.dtype)
    if fit_templates:  # the templates learn from their own fit only
        fill1 = jax.lax.stop_gradient(fill1)
    fill2 = jnp.where(has_o[:, None, None, None], channel(x, o), jax.lax.stop_gradient(fill1))
    return {"t": t, "o": o, "has_o": has_o, "mask": mask, "target": target, "fill1": fill1, "fill2": fill2,
            "v1": jnp.where(mask, fill1, target), "v2": jnp.where(mask, fill2, target)}


def encoder_input(x, present, view, t, context: str):
    """The encoder's input for one view of sequence ``t``: among the study's other sequences
    (``"all"``) or alone (``"target"``)."""
    onehot = jnp.arange(present.shape[1])[None] == t[:, None]
    if context == "all":
        return jnp.where(onehot[:, None, None, None, :], view[..., None], x), present.astype(bool)
    if context == "target":
        return jnp.where(onehot[:, None, None, None, :], view[..., None], 0.0), onehot
    raise ValueError(f"pretrain.context must be one of {CONTEXTS}, got {context!r}")


def reconstruct(model, x, present, view, t, context: str, residual: bool = False):
    """The decoder's rebuild of ``t`` from a view: ``(prediction (B, X, Y, Z), encoder output)``;
    with ``residual`` the decoder predicts the correction to the view (the prediction is the view
    plus the decoder's output), so it starts from copying the fill and learns what differs."""
    xin, pin = encoder_input(x, present, view, t, context)
    out = model.encoder(xin, pin)
    tok = jnp.take_along_axis(out["patch"], t[:, None, None, None], axis=1)[:, 0]
    vcfg = model.config.vit
    grid = tuple(s // p for s, p in zip(x.shape[1:4], vcfg.patch_size))
    pred = unpatchify(model.decode(tok, patchify(view, vcfg.patch_size) if model.voxel_skip else None), grid,
                      vcfg.patch_size)
    return (pred + view.astype(pred.dtype) if residual else pred), out


def view_contexts(key, present, t, drop: float):
    """The sequences each of the two views shows beside its target ``t`` (``context = "all"``):
    each other present sequence dropped with probability ``drop``, independently per view. With
    ``drop`` > 0 the two views of a study show different subsets, so the contrastive term asks
    the study representation to be the same whichever sequences are present (the robustness a
    missing-sequence encoder needs); at 0 both views show the whole study and differ only in
    the target's masked fill (BrainMVP's)."""
    if not drop:
        return present, present
    onehot = jnp.arange(present.shape[1])[None] == t[:, None]
    k1, k2 = jax.random.split(key)
    keep = lambda k: present & ((jax.random.uniform(k, present.shape) >= drop) | onehot)  # noqa: E731
    return keep(k1), keep(k2)


def terms(model, batch, key, c, valid=None):
    """Everything a step or an evaluation reads: the losses and the fills' baselines, each a
    mean over the masked voxels (``loss_on``: or all voxels) of the rows ``valid``."""
    x, present = batch["image"], batch["present"].astype(bool)
    v = views(x, present, model.templates[...], key, block=c.block, ratio=c.mask_ratio,
              fit_templates=c.templates == "fit")
    p1, p2 = view_contexts(jax.random.fold_in(key, 7), present, v["t"], c.get("view_drop", 0.0))
    pred1, out1 = reconstruct(model, x, p1, v["v1"], v["t"], c.context, c.residual)
    pred2, out2 = reconstruct(model, x, p2, v["v2"], v["t"], c.context, c.residual)
    rows = jnp.ones(x.shape[:1], bool) if valid is None else valid.astype(bool)
    w = v["mask"] if c.loss_on == "masked" else jnp.ones_like(v["mask"])
    w = w & rows[:, None, None, None]
    wm = v["mask"] & rows[:, None, None, None]
    z1, z2 = model.project(out1["cls"]), model.project(out2["cls"])
    sim = z1 @ z2.T
    hit = (jnp.argmax(sim, axis=1) == jnp.arange(sim.shape[0])).astype(jnp.float32)
    return {
        "mse_template": losses.masked_mse(pred1, v["target"], w),
        "mse_cross": losses.masked_mse(pred2, v["target"], w),
        "contrastive": losses.info_nce(z1, z2, c.temperature, valid=rows),
        # the baselines, on the masked voxels (what the fills put there)
        "masked_mse_template": losses.masked_mse(pred1, v["target"], wm),
        "masked_mse_cross": losses.masked_mse(pred2, v["target"], wm),
        # also the templates' own fit (templates = "fit"): its gradient reaches the templates alone
        "copy_template": losses.masked_mse(model.templates[...][v["t"]], jax.lax.stop_gradient(v["target"]), wm),
        "copy_other": losses.masked_mse(v["fill2"], v["target"], wm),
        "view_top1": jnp.sum(hit * rows) / jnp.maximum(jnp.sum(rows), 1),
        "sequences_present": jnp.sum(present * rows[:, None]) / jnp.maximum(jnp.sum(rows), 1),
    }


def total_loss(t, c, step):
    on = (step >= c.contrastive_start).astype(jnp.float32)
    return (c.template_weight * t["mse_template"] + c.cross_weight * t["mse_cross"]
            + on * c.contrastive_weight * t["contrastive"] + (c.templates == "fit") * t["copy_template"])


def load(workdir: str, mesh=None, step: int | None = None):
    """``(Model, params, config)`` of a multiparam run's latest (or ``step``) checkpoint."""
    from decipher_jax import checkpoint as ckpt
    from decipher_jax import runs
    from decipher_jax import sharding as sh
    from decipher_jax.state import Model, abstract

    spec = runs.read_spec(workdir)
    if spec.get("kind") != "multiparam":
        raise ValueError(f"{workdir}: a {spec.get('kind')!r} run, not a multiparam run")
    import ml_collections as mlc

    cfg = mlc.ConfigDict(runs.from_json(spec["config"]))
    mesh = mesh or sh.make_mesh(None, jax.devices()[:1])
    factory, _ = model_factory(cfg)
    model = Model(factory, mesh)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    _, part = ckpt.restore_subtree(layout.RunDir(workdir).checkpoints,
                                   {"params": abstract(shapes, model.shardings)}, step)
    return model, part["params"], cfg
