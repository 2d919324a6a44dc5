"""Multi-parametric pretraining (BrainMVP, arXiv 2410.10604) on the multi-sequence 3D ViT.

    decipher train --config experiments/configs/multiparam.py:tiny --workdir W

Per study and step (``cfg.pretrain``):
- a *target* sequence ``t`` is drawn among the present ones, and a second one ``o`` (when the
  study has one) to fill from;
- ``mask_ratio`` of the volume's ``block``^3 blocks are masked (exactly that many per study);
- two views of ``t``: v1 fills the masked blocks from ``t``'s learnable template, v2 from the
  same blocks of ``o`` (from the template when ``t`` is the study's only sequence);
- the encoder sees each view (``context = "all"``: in place of ``t`` among the study's other
  present sequences, so masked blocks can be recovered across sequences; ``"target"``: the view
  alone, BrainMVP's single-channel encoder), and a decoder without skips rebuilds ``t``'s voxels
  from ``t``'s tokens: MSE over the masked voxels (``loss_on = "masked"``) or all of them. With
  ``residual`` the decoder's output is added to the view (it predicts what the fill got wrong):
  predicting the voxels outright, the tiny demo model stayed above the copy-the-template error
  on the masked voxels after 200 steps (0.040 against 0.034);
- modality-aware contrastive learning: symmetric InfoNCE between the two views' projected study
  representations over the *global* batch (BrainMVP: 3 cases per GPU), ``temperature``, from
  step ``contrastive_start``; with ``view_drop`` each view also drops the study's other
  sequences independently, so the two views show different subsets and the representation is
  asked to be the same whichever sequences are present.
Total: ``template_weight * MSE(v1) + cross_weight * MSE(v2) + contrastive_weight * InfoNCE``
(BrainMVP: 10, 1, 1). The templates (``templates``): ``"reconstruction"`` is BrainMVP's, learnt through the
losses of the view they fill (v1's input: its reconstruction, and its contrastive embedding; with
``residual`` also directly, as v1 is added to the decoder's output); through the encoder alone they did not
come to resemble their sequences in a short run (20 steps of the unit test's world: RMS 0.09,
their own error on the masked voxels rising 0.08 -> 0.10, and still 0.09 with a direct fit term
added beside). ``"fit"`` (the default) learns each template as the least-squares fill of its
sequence's masked voxels, ``MSE(template, t)`` added to the loss with the template held constant
inside v1: the mean image of the sequence, a missing sequence's stand-in, and the copy baseline
a reconstruction must beat. Sequences are also dropped at random by the loader (``data.drop``), so the encoder
learns on every subset it will meet.

Logged beside the losses: ``copy_template`` and ``copy_other``, the MSE of the two fills
themselves on the masked voxels: the baselines a reconstruction must beat. ``on_end`` scores the
same on the val split (``heldout.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decipher_jax import optim, runspec
from decipher_jax.data import pipelines as P
from decipher_jax.multiparam import (CONTEXTS, HELDOUT, TEMPLATES, load, model_factory, terms, total_loss,  # noqa: F401
                                     view_contexts, views)
from decipher_jax.trainers import common


def make_step(cfg, model: common.Model, tx):
    c = cfg.pretrain

    def forward(params, batch, key, step):
        t = terms(model(params), batch, key, c)
        return total_loss(t, c, step), t

    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        (loss, aux), grads = jax.value_and_grad(forward, has_aux=True)(state["params"], batch, key, state["step"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        new = {"step": state["step"] + 1, "rng": state["rng"], "params": params, "opt": opt}
        new, guard = common.guard_update(loss, new, state, params=state["params"], new_params=params,
                                         max_update_ratio=cfg.guard_update_ratio)
        tm = params["templates"]
        metrics = {"loss": loss, **aux, **guard, "grad_norm": common.tree_norm(grads),
                   "template_rms": jnp.sqrt(jnp.mean(jnp.square(tm))), **optim.current_hparams(opt)}
        return new, metrics

    return step


def batch_spec(cfg, per_process_batch: int | None = None) -> dict:
    d, b = cfg.data, per_process_batch or cfg.data.batch_size
    s = len(d.sequences)
    return {"image": ((b, *d.size, s), jnp.float32), "present": ((b, s), jnp.bool_)}


def setup(cfg, mesh) -> common.Setup:
    """The multi-parametric trainer on ``mesh``: encoder, templates, decoder, projection; AdamW."""
    if cfg.pretrain.context not in CONTEXTS:
        raise ValueError(f"pretrain.context must be one of {CONTEXTS}, got {cfg.pretrain.context!r}")
    if cfg.pretrain.templates not in TEMPLATES:
        raise ValueError(f"pretrain.templates must be one of {TEMPLATES}, got {cfg.pretrain.templates!r}")
    if cfg.pretrain.loss_on not in ("masked", "all"):
        raise ValueError(f"pretrain.loss_on must be 'masked' or 'all', got {cfg.pretrain.loss_on!r}")
    if tuple(cfg.data.size) != tuple(cfg.model.vit.img_size):
        raise ValueError(f"data.size {tuple(cfg.data.size)} must equal model.vit.img_size "
                         f"{tuple(cfg.model.vit.img_size)}: the templates live on the input grid")
    factory, mcfg = model_factory(cfg)
    model = common.Model(factory, mesh)
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    tx = optim.build(cfg.optim, params_shape, depth=mcfg.vit.depth)
    rep = common.replicated(mesh)
    shardings = {"step": rep, "rng": rep, "params": model.shardings,
                 "opt": common.opt_shardings(tx, params_shape, model.shardings, mesh)}

    def fresh(key):
        params = nnx.to_pure_dict(nnx.split(factory(nnx.Rngs(key)))[1])
        return {"step": jnp.zeros([], jnp.int32), "rng": jax.random.key_data(jax.random.key(cfg.seed + 1)),
                "params": params, "opt": tx.init(params)}

    def data():
        d = cfg.data
        loader = P.LoaderConfig(batch_size=d.batch_size, seed=cfg.seed, num_workers=d.num_workers)
        return iter(P.studies(P.data_source(d.dir, "train"), loader, tuple(d.size), tuple(d.sequences), train=True,
                              drop=d.drop, min_present=1, scale=tuple(d.crop_scale), flip_axes=tuple(d.flip_axes)))

    def spec():
        return runspec.RunSpec("multiparam", cfg, vit=dataclasses.asdict(mcfg.vit),
                               preprocessing=runspec.preprocessing(cfg.data.dir))

    def on_end(state, metrics, workdir):
        res = heldout(cfg, model, state["params"], mesh, split=cfg.eval.split)
        if jax.process_index() == 0 and res:
            with open(os.path.join(workdir, HELDOUT), "w") as f:
                json.dump(res, f, indent=1)
        return {**metrics, **{f"heldout/{k}": v for k, v in res.items() if isinstance(v, (int, float))}}

    return common.Setup("multiparam", cfg, mesh, model, tx, shardings, jax.eval_shape(fresh, jax.random.key(0)),
                        make_step(cfg, model, tx), batch_spec(cfg),
                        lambda: jax.jit(fresh, out_shardings=shardings)(jax.random.key(cfg.seed)), data, spec,
                        log_keys=("loss", "mse_template", "mse_cross", "contrastive", "copy_template"),
                        on_end=on_end, vit=mcfg.vit)


def pad_rows(batch: dict, multiple: int) -> dict:
    """Pads a host batch to a multiple of ``multiple`` rows with ``valid`` False (and no
    sequence present), so a last partial batch shards like the others."""
    n = len(next(iter(batch.values())))
    pad = (-n) % multiple
    out = {k: np.concatenate([np.asarray(v), np.zeros((pad,) + np.shape(v)[1:], np.asarray(v).dtype)]) if pad
           else np.asarray(v) for k, v in batch.items()}
    out["valid"] = np.arange(n + pad) < n
    return out


def heldout(cfg, model: common.Model, params, mesh, *, split: str = "val", seed: int = 0) -> dict:
    """The reconstruction on a held-out split, with the same masks and targets for the model
    and the copy baselines (fixed key per batch): means over the masked voxels of every study.
    ``{}`` when the split is absent or empty."""
    c, d = cfg.pretrain, cfg.data
    try:
        source = P.data_source(d.dir, split)
    except (KeyError, ValueError, FileNotFoundError):  # no such split
        return {}
    loader = P.LoaderConfig(batch_size=d.batch_size, seed=0, shuffle=False, repeat=False, drop_remainder=False)
    names = ("masked_mse_template", "masked_mse_cross", "copy_template", "copy_other")

    @jax.jit
    def sums(params, batch, key):
        m = model(params)
        t = terms(m, batch, key, c, valid=batch["valid"])
        n = jnp.sum(batch["valid"])
        return {k: t[k] * n for k in names} | {"n": n}

    total = {k: 0.0 for k in names} | {"n": 0.0}
    multiple = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
    with jax.set_mesh(mesh):
        for i, b in enumerate(P.studies(source, loader, tuple(d.size), tuple(d.sequences), train=False)):
            b = pad_rows({k: b[k] for k in ("image", "present")}, multiple)
            out = sums(params, P.to_global(b, mesh), jax.random.key(seed * 100_003 + i))
            for k, v in out.items():
                total[k] += float(v)
    if not total["n"]:
        return {}
    # Per-batch means weighted by the studies in each: exactly voxel-weighted, since every study
    # has the same number of masked voxels (block_mask masks exactly k blocks).
    res = {k: total[k] / total["n"] for k in names}
    res |= {"studies": int(total["n"]), "split": split,
            "template_vs_copy": res["masked_mse_template"] / max(res["copy_template"], 1e-12),
            "cross_vs_copy": res["masked_mse_cross"] / max(res["copy_other"], 1e-12)}
    return res


@common.locked
def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) multi-parametric pretraining; returns the last metrics."""
    return common.train(setup(cfg, common.make_mesh(cfg, "multiparam")), workdir)


def summary(cfg, m: dict, seconds: float) -> str:
    line = (f"multi-parametric pretraining ({cfg.steps} steps, context {cfg.pretrain.context}) in {seconds:.0f} s: "
            f"loss {m['loss']:.4f} (MSE template-filled {m['mse_template']:.4f}, cross-filled {m['mse_cross']:.4f}, "
            f"InfoNCE {m['contrastive']:.3f})")
    if "heldout/masked_mse_template" in m:
        line += (f"; held out, masked voxels: template view {m['heldout/masked_mse_template']:.4f} against copying the "
                 f"template {m['heldout/copy_template']:.4f}, cross view {m['heldout/masked_mse_cross']:.4f} against "
                 f"copying the other sequence {m['heldout/copy_other']:.4f}")
    return line
