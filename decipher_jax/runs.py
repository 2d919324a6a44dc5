"""Reading trained runs back from their workdirs.

A stage-2 (``clip_align``) workdir holds ``run_spec.json`` (the towers' configs, the tokenizer,
the training config) and ``checkpoints/``. :func:`load_align` rebuilds the model from the spec
and restores its parameters on a mesh; zero-shot, evaluation and the benchmarks read runs
through here rather than through the trainer.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from decipher_jax import checkpoint as ckpt
from decipher_jax import layout
from decipher_jax import sharding as sh
from decipher_jax.models import bert
from decipher_jax.models.towers import TowersConfig, TwoTowers
from decipher_jax.models.vit3d import ViT3D, ViTConfig
from decipher_jax.state import Model, abstract


def from_json(d: dict) -> dict:
    """Dataclass fields read back from JSON (lists become the tuples the configs declare)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def read_spec(workdir: str) -> dict:
    """A workdir's run spec (:func:`decipher_jax.runspec.read`) as a dict; a clear error without one."""
    from decipher_jax import runspec

    spec = runspec.read(workdir)
    if spec is None:
        raise FileNotFoundError(f"{layout.RunDir(workdir).spec}: not found; {workdir} is not a trained run "
                                f"(a workdir of `decipher train`)")
    return spec.to_dict()


def align_vit_config(spec: dict) -> ViTConfig:
    """The image tower's :class:`ViTConfig` of a stage-2 run spec."""
    return ViTConfig(**from_json(spec["vit"]))


def load_align(workdir: str, mesh=None, step: int | None = None):
    """``(model, params, spec)`` of a stage-2 workdir's latest (or given) checkpoint on ``mesh``."""
    spec = read_spec(workdir)
    vit, bcfg = align_vit_config(spec), bert.BertConfig(**from_json(spec["bert"]))
    tcfg = TowersConfig(**spec["towers"])
    mesh = mesh or sh.make_mesh({"data": -1})
    model = Model(lambda r: TwoTowers(vit, bcfg, tcfg, rngs=r), mesh)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    step, restored = ckpt.restore_subtree(layout.RunDir(workdir).checkpoints,
                                          {"params": abstract(shapes, model.shardings)}, step=step)
    return model, restored["params"], spec | {"step": step}


def load(workdir: str, mesh=None, step: int | None = None):
    """``(model, params, spec)`` of any run, by its kind: ``clip_align`` the two towers,
    ``vision_ssl`` its EMA teacher's backbone (a ViT3D), ``text_mlm`` its BERT, ``finetune`` the
    classifier at its best val step (else its latest). ``model`` is a :class:`Model` on ``mesh``."""
    from decipher_jax.models.classifier import Classifier

    spec = read_spec(workdir)
    kind, mesh = spec.get("kind", ""), mesh or sh.make_mesh({"data": -1})
    run = layout.RunDir(workdir)
    if kind == "clip_align":
        return load_align(workdir, mesh, step)
    if kind == "vision_ssl":
        vit = ViTConfig(**from_json(spec["vit"]))
        model = Model(lambda r: ViT3D(vit, rngs=r), mesh)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
        step, part = ckpt.restore_subtree(run.checkpoints, {"teacher": {"backbone": abstract(shapes, model.shardings)}},
                                          step=step)
        return model, part["teacher"]["backbone"], spec | {"step": step}
    if kind == "text_mlm":
        bcfg = bert.BertConfig(**from_json(spec["bert"]))
        model, folder = Model(lambda r: bert.Bert(bcfg, rngs=r), mesh), run.checkpoints
    elif kind == "finetune":
        vit, n_out = ViTConfig(**from_json(spec["vit"])), len(spec["config"]["task_spec"]["names"])
        # Runs before the pooled readout had the CLS and mean patch token only.
        pool = tuple(spec["config"].get("model", {}).get("pool", ("cls", "mean")))
        bank = len(spec["config"].get("anomaly_bank", {}).get("rows", ()))  # the anomaly pool's normal series
        model = Model(lambda r: Classifier(vit, n_out, rngs=r, pool=pool, bank_size=bank), mesh)
        folder = os.path.join(workdir, "best") if os.path.isdir(os.path.join(workdir, "best")) else run.checkpoints
    else:
        raise ValueError(f"{workdir}: a run of kind {kind!r}; known: clip_align, vision_ssl, text_mlm, finetune")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    step, restored = ckpt.restore_subtree(folder, {"params": abstract(shapes, model.shardings)}, step=step)
    return model, restored["params"], spec | {"step": step}


# -- frozen image encoders of a pipeline's runs -------------------------------------------------

OBJECTIVE_NAMES = {"clip": "CLIP", "siglip": "SigLIP", "regress": "regression"}


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A frozen image encoder under evaluation: a stable ``id`` (file names, comparisons) and a
    ``name`` for people, from the run that made it."""

    id: str  # "align" (stage 2's image tower), "ssl_teacher" (stage 1's EMA teacher), "random"
    name: str  # "stage 2 (CLIP)", "stage 2 (SigLIP)", "stage 1 (DINO teacher)", "random init"
    model: Model
    params: dict
    vit: ViTConfig


def align_name(spec: dict) -> str:
    return f"stage 2 ({OBJECTIVE_NAMES.get(spec['towers']['objective'], spec['towers']['objective'])})"


def encoders(*, align: str = "", ssl_teacher: str = "", random: bool = True, mesh=None,
             random_seed: int = 123) -> dict[str, Encoder]:
    """``{id: Encoder}`` in the order align, ssl_teacher, random, all with the align run's ViT
    (an SSL run alone gives its own). ``align`` / ``ssl_teacher``: workdirs ("" = leave out)."""
    mesh = mesh or sh.make_mesh({"data": -1})
    out: dict[str, Encoder] = {}
    vit = None
    if align:
        _, params, spec = load_align(align, mesh=mesh)
        vit = align_vit_config(spec)
        model = Model(lambda r: ViT3D(vit, rngs=r), mesh)
        out["align"] = Encoder("align", align_name(spec), model, params["image"], vit)
    if ssl_teacher:
        spec = read_spec(ssl_teacher)
        vit = vit or ViTConfig(**from_json(spec.get("vit") or spec["config"]["model"]["vit"]))
        model = Model(lambda r: ViT3D(vit, rngs=r), mesh)
        out["ssl_teacher"] = Encoder("ssl_teacher", "stage 1 (DINO teacher)", model, ssl_teacher_params(ssl_teacher, model),
                                     vit)
    if random:
        if vit is None:
            raise ValueError("a random-init encoder needs a run to take its architecture from")
        model = Model(lambda r: ViT3D(vit, rngs=r), mesh)
        out["random"] = Encoder("random", "random init", model, model.init(jax.random.key(random_seed)), vit)
    return out


def ssl_teacher_params(ssl_workdir: str, model: Model) -> dict:
    """The EMA teacher's backbone from a ``vision_ssl`` workdir's latest checkpoint, on ``model``'s
    shardings (a ViT3D of the run's config); the rest of the checkpoint is never read."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    _, part = ckpt.restore_subtree(layout.RunDir(ssl_workdir).checkpoints,
                                   {"teacher": {"backbone": abstract(shapes, model.shardings)}})
    return part["teacher"]["backbone"]
