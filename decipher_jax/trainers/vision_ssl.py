"""Stage 1 vision: DINOv2-style self-distillation of a 3D ViT (DINO + iBOT + KoLeo).

    decipher train --config experiments/configs/vision_ssl.py:tiny --workdir W [--config.steps=20]
    # or, from a notebook:
    from decipher_jax.trainers import vision_ssl; vision_ssl.train(config, "W")

Student and EMA teacher share one architecture (ViT3D backbone + DINO head; iBOT shares the
head). The teacher sees the 2 unmasked global crops; the student sees the masked global crops
and the local crops. Step order as in dinov2/train/train.py: schedules -> forward/backward ->
per-submodule clip -> AdamW -> EMA teacher update -> centre update.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decipher_jax import losses, optim, runspec
from decipher_jax.data import pipelines as P
from decipher_jax.data import transforms as T
from decipher_jax.models.heads import DINOHead
from decipher_jax.models.vit3d import ViT3D, ViTConfig
from decipher_jax.trainers import common


class SSLModel(nnx.Module):
    def __init__(self, vit: ViTConfig, head: dict, *, rngs: nnx.Rngs):
        self.backbone = ViT3D(vit, rngs=rngs)
        self.head = DINOHead(vit.dim, rngs=rngs, **head)


def model_factory(cfg):
    vit = ViTConfig(**cfg.model.vit.to_dict())
    head = cfg.model.head.to_dict()
    return lambda rngs: SSLModel(vit, head, rngs=rngs), vit


def schedules(c, step, steps: int):
    """Teacher temperature (linear warm-up then flat) and EMA momentum (cosine to 1 at ``steps``)."""
    s = step.astype(jnp.float32)
    w = max(c.teacher_temp_warmup_steps, 1)
    temp = jnp.where(s < w, c.teacher_temp_start + (c.teacher_temp - c.teacher_temp_start) * s / w, c.teacher_temp)
    mom = 1.0 - (1.0 - c.momentum_start) * (jnp.cos(math.pi * s / max(steps, 1)) + 1.0) / 2.0
    return temp, mom


def select_masked(masks, n_max: int):
    """Indices of (up to ``n_max``) masked tokens per image, and their validity (fixed shapes)."""
    order = jnp.argsort(~masks, axis=1, stable=True)[:, :n_max]
    return order, jnp.take_along_axis(masks, order, axis=1)


def make_step(cfg, model: common.Model, tx, n_tokens: int):
    c = cfg.ssl
    n_max = max(1, int(math.ceil(cfg.data.mask_ratio[1] * n_tokens)))

    def forward(student_p, teacher_p, center, batch, temp, key):
        student, teacher = model(student_p), model(teacher_p)
        g, loc = batch["global"], batch["local"]
        b = g.shape[0]
        # Image-major order [img0 crop0, img0 crop1, img1 crop0, ...]: both crops of an image stay on
        # the device holding that image, so pairing crop i with teacher crop 1 - i is local. (Crop-
        # major order made XLA move half the batch: 12 GiB per chip instead of 2.4 on v5e-256.)
        gl = g.reshape((2 * b,) + g.shape[2:])
        masks = batch["masks"].reshape(2 * b, -1)
        idx, valid = select_masked(masks, n_max)

        # -- teacher: unmasked global crops, no gradient
        t_out = teacher.backbone(gl)
        t_cls = teacher.head(t_out["cls"])
        t_patch = teacher.head(jnp.take_along_axis(t_out["patch"], idx[..., None], axis=1))
        t_cls, t_patch = jax.lax.stop_gradient((t_cls, t_patch))
        if c.centering == "sinkhorn":
            t_probs = losses.sinkhorn_knopp(t_cls, temp)
            flat = t_patch.reshape(-1, t_patch.shape[-1])
            t_patch_probs = losses.sinkhorn_knopp(flat, temp, valid=valid.reshape(-1)).reshape(t_patch.shape)
        else:
            t_probs = losses.centered_teacher_probs(t_cls, center["cls"], temp)
            t_patch_probs = losses.centered_teacher_probs(t_patch, center["patch"], temp)

        # -- student: masked global crops + local crops
        kg, kl = jax.random.split(key)
        s_out = student.backbone(gl, mask=masks, drop_path=cfg.model.drop_path, key=kg)
        s_cls = student.head(s_out["cls"])
        s_patch = student.head(jnp.take_along_axis(s_out["patch"], idx[..., None], axis=1))
        n_loc = loc.shape[1]
        if n_loc:
            ll = loc.reshape((b * n_loc,) + loc.shape[2:])
            s_loc = student.head(student.backbone(ll, drop_path=cfg.model.drop_path, key=kl)["cls"])
            s_loc = jnp.swapaxes(s_loc.reshape(b, n_loc, -1), 0, 1)
        else:
            s_loc = jnp.zeros((0, b, s_cls.shape[-1]), s_cls.dtype)
        crops = lambda x: jnp.swapaxes(x.reshape(b, 2, -1), 0, 1)  # noqa: E731  (2B, K) -> (2, B, K)
        dino = losses.dino_loss(crops(s_cls), s_loc, crops(t_probs), c.student_temp)
        ibot = losses.ibot_loss(s_patch, t_patch_probs, valid, c.student_temp)
        scls = crops(s_out["cls"])
        koleo = (losses.koleo_loss(scls[0]) + losses.koleo_loss(scls[1])) / 2
        total = c.dino_weight * dino + c.ibot_weight * ibot + c.koleo_weight * koleo
        feats = s_out["cls"].astype(jnp.float32)
        feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-6)
        aux = {
            "dino": dino, "ibot": ibot, "koleo": koleo,
            "teacher_entropy": losses.entropy(t_probs),
            "teacher_entropy_of_mean": losses.entropy(t_probs.mean(0, keepdims=True)),
            "feature_std": feats.std(axis=0).mean(),
            "masked_fraction": masks.mean(),
        }
        return total, (aux, t_cls, t_patch, valid)

    def step(state, batch):
        temp, mom = schedules(c, state["step"], cfg.steps)
        key = jax.random.fold_in(state["rng"], state["step"])
        grad_fn = jax.value_and_grad(forward, has_aux=True)
        (loss, (aux, t_cls, t_patch, valid)), grads = grad_fn(
            state["student"], state["teacher"], state["center"], batch, temp, key)
        updates, opt = tx.update(grads, state["opt"], state["student"])
        student = jax.tree.map(lambda p, u: p + u, state["student"], updates)
        teacher = jax.tree.map(lambda t, s: t * mom + s * (1.0 - mom), state["teacher"], student)
        center = {
            "cls": losses.update_center(state["center"]["cls"], t_cls, c.center_momentum),
            "patch": losses.update_center(state["center"]["patch"], t_patch, c.center_momentum, weights=valid),
        }
        new = {"step": state["step"] + 1, "student": student, "teacher": teacher, "opt": opt,
               "center": center, "rng": state["rng"]}
        new, guard = common.guard_update(loss, new, state, params=state["student"], new_params=student,
                                         max_update_ratio=cfg.guard_update_ratio)
        metrics = {"loss": loss, **aux, **guard, "teacher_temp": temp, "momentum": mom,
                   "grad_norm": common.tree_norm(grads), **optim.current_hparams(opt)}
        return new, metrics

    return step


def setup(cfg, mesh) -> common.Setup:
    """The stage-1 trainer on ``mesh``: student, EMA teacher, centres and AdamW, born sharded."""
    factory, vit_cfg = model_factory(cfg)
    model = common.Model(factory, mesh)
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    tx = optim.build(cfg.optim, params_shape, depth=vit_cfg.depth)
    rep = common.replicated(mesh)
    k_ = cfg.model.head.out_dim
    shardings = {
        "step": rep, "rng": rep, "student": model.shardings, "teacher": model.shardings,
        "opt": common.opt_shardings(tx, params_shape, model.shardings, mesh),
        "center": {"cls": rep, "patch": rep},
    }

    def fresh(key):
        student = nnx.to_pure_dict(nnx.split(factory(nnx.Rngs(key)))[1])
        return {"step": jnp.zeros([], jnp.int32), "rng": jax.random.key_data(jax.random.key(cfg.seed + 1)),
                "student": student, "teacher": jax.tree.map(jnp.copy, student), "opt": tx.init(student),
                "center": {"cls": jnp.zeros((1, k_)), "patch": jnp.zeros((1, k_))}}

    def data():
        d = cfg.data
        crops = T.MultiCrop(global_size=tuple(d.global_size), local_size=tuple(d.local_size), n_local=d.n_local,
                            global_scale=tuple(d.global_scale), local_scale=tuple(d.local_scale),
                            patch_size=vit_cfg.patch_size, mask_probability=d.mask_probability,
                            mask_ratio=tuple(d.mask_ratio))
        loader = P.LoaderConfig(batch_size=d.batch_size, seed=cfg.seed, num_workers=d.num_workers)
        return iter(P.vision_ssl(P.data_source(d.dir, "train"), loader, crops))

    def spec():
        return runspec.RunSpec("vision_ssl", cfg, vit=vit_cfg, preprocessing=runspec.preprocessing(cfg.data.dir))

    step = _with_key(make_step(cfg, model, tx, n_tokens(cfg)))
    return common.Setup("vision_ssl", cfg, mesh, model, tx, shardings, jax.eval_shape(fresh, jax.random.key(0)),
                        step, batch_spec(cfg), lambda: jax.jit(fresh, out_shardings=shardings)(jax.random.key(cfg.seed)),
                        data, spec, log_keys=("loss", "dino", "ibot", "koleo"), vit=vit_cfg)


def n_tokens(cfg) -> int:
    """Patch tokens of one global crop."""
    return int(np.prod([g // p for g, p in zip(cfg.data.global_size, cfg.model.vit.patch_size)]))


def batch_spec(cfg, per_process_batch: int | None = None) -> dict:
    """Shapes and dtypes of one stage-1 batch (global batch unless given)."""
    d, b = cfg.data, per_process_batch or cfg.data.batch_size
    c = cfg.model.vit.get("in_channels", 1)
    return {"global": ((b, 2, *d.global_size, c), jnp.float32), "local": ((b, d.n_local, *d.local_size, c), jnp.float32),
            "masks": ((b, 2, n_tokens(cfg)), jnp.bool_)}


@common.locked
def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) stage-1 vision pretraining; returns the last metrics."""
    return common.train(setup(cfg, common.make_mesh(cfg, "vision_ssl")), workdir)


def _with_key(step):
    """The state keeps raw key data (checkpointable); the step wraps it as a typed key."""

    def f(state, batch):
        s = dict(state)
        s["rng"] = jax.random.wrap_key_data(state["rng"])
        new, m = step(s, batch)
        new = dict(new)
        new["rng"] = jax.random.key_data(new["rng"])
        return new, m

    return f


def summary(cfg, m: dict, seconds: float) -> str:
    return (f"stage 1 vision (DINO + iBOT + KoLeo, {cfg.steps} steps) in {seconds:.0f} s: "
            f"loss {m['loss']:.3f} (dino {m['dino']:.3f}, ibot {m['ibot']:.3f}, koleo {m['koleo']:.3f}), "
            f"teacher entropy {m['teacher_entropy']:.2f} nats, feature std {m['feature_std']:.3f}")
