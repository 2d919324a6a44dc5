"""A pipeline from one config: data -> stage 1 -> stage 2 -> evaluations -> report.

    decipher pipeline --config experiments/configs/demo.py --workdir outputs/demo [--config.a.b=v]
    decipher demo --workdir outputs/demo        # the same config

A config names its stages in ``order``; each stage has a ``kind`` (:data:`STAGES`): ``data``
(the embedded corpus through the library's prep, exactly as real data), ``multiparam_data`` (the
embedded multi-sequence brain studies, prepared onto one grid per study) or ``prepared`` (records
that ``decipher prep`` wrote from your manifest), ``mesh_check`` (a sharded
forward / backward of a ViT against one device), ``train`` (any trainer, from its config file
and overrides, into ``<workdir>/<stage name>``), ``eval`` (the evaluators of an eval config on
the runs), ``ladder`` (the ladder's fine-tuning runs, :func:`ladder_stage`) and ``report``. Strings in overrides may name ``{workdir}``, ``{data}`` (the
prepared data) and ``{multiparam}`` (the multi-parametric records). Each stage says one or more lines; they become ``summary.md``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import time
from collections.abc import Callable

from decipher_jax import layout

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")


class Stop(Exception):
    """A stage cannot run here (e.g. a package it needs is missing): later stages are skipped."""


@dataclasses.dataclass
class Context:
    workdir: str
    cfg: object  # the pipeline config
    lines: list[str] = dataclasses.field(default_factory=list)
    data: str = ""  # the prepared data dir, once the data stage ran
    multiparam: str = ""  # the multi-parametric records, once the multiparam_data stage ran
    mesh: object = None
    summary_written: bool = False

    def say(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.lines.append(msg)

    def fill(self, value):
        if not isinstance(value, str):
            return value
        mp = self.multiparam or layout.PipelineDir(self.workdir).multiparam_prep
        return value.format(workdir=self.workdir, data=self.data, multiparam=mp)

    def get_mesh(self):
        """The pipeline's mesh (``cfg.mesh``; data parallel when the devices do not divide it)."""
        if self.mesh is None:
            import jax
            import numpy as np

            from decipher_jax import sharding as sh

            shape = dict(self.cfg.mesh)
            fixed = int(np.prod([v for v in shape.values() if v != -1]))
            self.mesh = sh.make_mesh(shape if jax.device_count() % fixed == 0 else {"data": -1})
        return self.mesh


def config_path(spec: str) -> str:
    """``name.py[:arg]`` relative to experiments/configs unless it is a path."""
    path, sep, arg = spec.partition(":")
    if not os.path.exists(path) and os.path.exists(os.path.join(CONFIGS, path)):
        path = os.path.join(CONFIGS, path)
    return path + sep + arg


# -- stages -------------------------------------------------------------------------------------

def data_stage(ctx: Context, st) -> None:
    """The embedded corpus (synthetic studies + packaged real templates) through prep."""
    from data_prep import prep, volume
    from decipher_jax.data import corpus

    t0 = time.perf_counter()
    manifest = corpus.build(layout.PipelineDir(ctx.workdir).raw, n_patients=st.patients, seed=ctx.cfg.seed,
                            matrix=st.matrix, version=st.get("generator_version", corpus.synthetic.GENERATOR_VERSION))
    out = layout.PipelineDir(ctx.workdir).prep
    pcfg = prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(float(st.spacing),) * 3),
                           split_fractions=tuple(float(s) for s in st.splits))
    res = prep.run(manifest, out, pcfg, progress=False)
    print(f"prep: {res.processed} processed, {res.reused} reused, {len(res.errors)} failed -> {res.tfds_dir}")
    print("  " + ", ".join(f"{s}: {v['series']} series / {v['patients']} patients" for s, v in res.counts.items()))
    if res.errors:
        for e in res.errors[:10]:
            print(f"    {e['reason']}")
        raise SystemExit(f"prep failed: {len(res.errors)} bad input(s) (see {out}/errors.jsonl)")
    ctx.data = out
    ctx.say(f"data: corpus + prep in {time.perf_counter() - t0:.1f} s -> {out} (card: dataset_card.json)")


def multiparam_data_stage(ctx: Context, st) -> None:
    """The embedded multi-sequence brain corpus (:func:`~decipher_jax.data.synthetic.generate_multiparam_corpus`:
    T1, T2, FLAIR and DWI, some missing) through prep with each study's series resampled onto one
    grid, into ``<workdir>/data/multiparam/prep`` (``{multiparam}`` in later stages' overrides)."""
    from data_prep import prep, volume
    from decipher_jax.data import synthetic

    t0 = time.perf_counter()
    d = layout.PipelineDir(ctx.workdir)
    manifest = synthetic.generate_multiparam_corpus(d.multiparam_raw, n_patients=st.patients, seed=ctx.cfg.seed,
                                                    matrix=st.matrix, p_complete=st.p_complete)
    pcfg = prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(float(st.spacing),) * 3),
                           split_fractions=tuple(float(s) for s in st.splits), studies="resample")
    res = prep.run(manifest, d.multiparam_prep, pcfg, progress=False)
    if res.errors:
        raise SystemExit(f"multiparam prep failed: {len(res.errors)} bad input(s) (see {d.multiparam_prep}/errors.jsonl)")
    ctx.multiparam = d.multiparam_prep
    ctx.say(f"multi-parametric data: {st.patients} brain studies (T1, T2, FLAIR, DWI; {1 - st.p_complete:.0%} with "
            f"sequences missing) + prep onto one grid per study in {time.perf_counter() - t0:.1f} s -> "
            f"{d.multiparam_prep}")


def prepared_stage(ctx: Context, st) -> None:
    """Data prepared elsewhere (``decipher prep`` of your own manifest): ``dir``."""
    from decipher_jax.eval import evaluators

    for split in ("train", "test"):
        evaluators.open_split(ctx.fill(st.dir), split)  # MissingSplit names the directory
    ctx.data = ctx.fill(st.dir)
    ctx.say(f"data: prepared records in {ctx.data}")


def mesh_check_stage(ctx: Context, st) -> None:
    """A multi-crop batch from the loader through a sharded ViT forward / backward, against the
    same computation on one device: the mesh, the rule table and the loader agree."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from decipher_jax import sharding as sh
    from decipher_jax.data import pipelines as P
    from decipher_jax.data import transforms as T
    from decipher_jax.models.vit3d import ViT3D, ViTConfig, num_params

    n, mesh = jax.device_count(), ctx.get_mesh()
    ctx.say(f"devices: {n} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}")

    def fwd_bwd(graphdef, loss_fn, shardings):
        def f(state, batch):
            return jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), batch))(state)

        return jax.jit(f, out_shardings=(None, shardings))

    vcfg = ViTConfig(**dict(st.vit))
    graphdef, state, shardings = sh.init_sharded(lambda r: ViT3D(vcfg, rngs=r), mesh, jax.random.key(0))
    size = tuple(vcfg.img_size)
    crops = T.MultiCrop(global_size=size, local_size=tuple(s // 2 for s in size), n_local=st.n_local,
                        patch_size=tuple(vcfg.patch_size))
    it = iter(P.vision_ssl(P.data_source(ctx.data, "train"), P.LoaderConfig(batch_size=n, seed=0), crops))
    host = next(it)
    ctx.say(f"loader: multi-crop batch global {host['global'].shape}, local {host['local'].shape}, "
            f"masked fraction {host['masks'].mean():.2f}")
    x, m = host["global"][:, 0], host["masks"][:, 0]

    def vit_loss(model, b):
        out = model(b["x"], mask=b["mask"])
        return jnp.mean(out["cls"] ** 2) + jnp.mean(out["patch"] ** 2)

    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        loss, grads = jax.block_until_ready(fwd_bwd(graphdef, vit_loss, shardings)(state, P.to_global({"x": x, "mask": m},
                                                                                                       mesh)))
        dt = time.perf_counter() - t0
    qkv = state["blocks"]["qkv_kernel"][...]
    ctx.say(f"ViT3D ({num_params(state) / 1e6:.2f} M params, grid {vcfg.grid}): sharded fwd/bwd loss {float(loss):.5f} "
            f"in {dt:.2f} s (incl. compile); qkv kernel {qkv.shape} -> per-device {qkv.addressable_shards[0].data.shape}")
    gnorm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
    single = sh.make_mesh(None, jax.devices()[:1])
    s1, sd1 = sh.shard_state(jax.device_get(state), single)
    l1, _ = fwd_bwd(graphdef, vit_loss, sd1)(s1, sh.shard_batch({"x": x, "mask": m}, single))
    ctx.say(f"  grad norm {gnorm:.4f}; single-device loss {float(l1):.5f} (|diff| {abs(float(l1) - float(loss)):.2e})")


def train_stage(ctx: Context, st, name: str) -> None:
    """A trainer from its config file and overrides, into ``<workdir>/<name>``; a rerun trains afresh."""
    from decipher_jax.trainers import common, module_for

    if st.get("requires") and not importlib.util.find_spec(st.requires):
        raise Stop(st.get("missing", f"{name}: {st.requires} not installed; skipped, and the stages after it"))
    spec = config_path(st.config)
    cfg = common.load_config(spec, {k: ctx.fill(v) for k, v in st.get("overrides", ())})
    module = module_for(spec, cfg)
    out = layout.PipelineDir(ctx.workdir).run(name).path
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    metrics = module.train(cfg, out)
    ctx.say(module.summary(cfg, metrics, time.perf_counter() - t0))


def eval_stage(ctx: Context, st) -> None:
    """The evaluators of an eval config (``experiments/configs/eval.py``) on the runs."""
    from decipher_jax.eval import evaluators
    from decipher_jax.trainers import common

    ecfg = common.load_config(config_path(st.config), {k: ctx.fill(v) for k, v in st.get("overrides", ())})
    c = evaluators.Context(out=ctx.workdir, data=ctx.data or ctx.fill(ecfg.data), mesh=ctx.get_mesh(),
                           random=ecfg.random, runs={role: ctx.fill(path) for role, path in ecfg.runs.items()})
    evaluators.run_all(evaluators.from_config(ecfg.evals, ecfg.order), c, say=ctx.say)


def ladder_stage(ctx: Context, st) -> None:
    """The ladder's trained rungs (:mod:`decipher_jax.eval.ladder`): for each of ``tasks`` and
    ``fractions``, the fine-tuning config ``config`` (its ``{task}`` filled) from random init, with
    the stage-2 image tower's architecture (``supervised``), and from the stage-2 run ``init``
    (``fine-tuned``), into ``<workdir>/ladder/<task>/<rung>-<fraction>/``. A finished run is kept
    and an interrupted one resumes, unless the prepared data or the stage-2 run changed since it
    started (:func:`_older_than_inputs`): then it trains afresh, as a retrained stage 2 does. The
    ``ladder`` evaluator reads them."""
    import dataclasses as dc

    from decipher_jax import runs
    from decipher_jax.eval import ladder
    from decipher_jax.trainers import common, finetune

    align = ctx.fill(st.init)
    vit = dc.asdict(runs.align_vit_config(runs.read_spec(align))) if align else None
    t0, done = time.perf_counter(), []
    for task in st.tasks:
        for rung in st.get("rungs", ladder.TRAINED):
            if rung == "fine-tuned" and not align:
                continue
            for f in st.fractions:
                w = ladder.run_dir(ctx.workdir, task, rung, float(f))
                if os.path.exists(w) and _older_than_inputs(w, ctx.data, align if rung == "fine-tuned" else ""):
                    shutil.rmtree(w)  # trained on other data or another stage 2: not this pipeline's rung
                if os.path.exists(os.path.join(w, "test.json")):
                    continue
                over = {"data.dir": ctx.data, "data.label_fraction": float(f), "init": align if rung == "fine-tuned" else ""}
                if rung == "supervised" and vit:  # the same ViT as the pretrained encoder, from random init
                    over["model.vit"] = vit
                over.update({k: ctx.fill(v) for k, v in st.get("overrides", ())})
                cfg = common.load_config(config_path(st.config.format(task=task)), over)
                m = finetune.train(cfg, w)
                done.append(f"{task} {rung} @ {float(f):g}: {m['test/score']:.3f} (best step {m['best_step']})")
    ctx.say(f"ladder: {len(done)} fine-tuning runs in {time.perf_counter() - t0:.0f} s (test score): "
            + "; ".join(done))


def _older_than_inputs(run: str, data: str, init: str) -> bool:
    """Whether a ladder run started before its inputs were last written: the prepared data's
    dataset card, the init run's spec and checkpoints (``init`` "": none). A rerun of the pipeline
    rewrites them (``train_stage`` trains afresh), and with another ``--seed`` the data differ."""
    spec = os.path.join(run, "run_spec.json")
    if not os.path.exists(spec):
        return True
    inputs = [os.path.join(data, "dataset_card.json")] if data else []
    if init:
        ck = os.path.join(init, "checkpoints")
        inputs += [os.path.join(init, "run_spec.json"), ck]
        if os.path.isdir(ck):
            inputs += [os.path.join(ck, d) for d in os.listdir(ck)]
    newest = max((os.path.getmtime(p) for p in inputs if os.path.exists(p)), default=0.0)
    return os.path.getmtime(spec) < newest


def report_stage(ctx: Context, st) -> None:
    from decipher_jax import report

    _write_summary(ctx)
    print(f"wrote {report.build(ctx.workdir)} (open it in a browser)")


STAGES: dict[str, Callable] = {"data": data_stage, "multiparam_data": multiparam_data_stage, "prepared": prepared_stage, "mesh_check": mesh_check_stage, "train": train_stage,
                               "ladder": ladder_stage, "eval": eval_stage, "report": report_stage}


# -- running --------------------------------------------------------------------------------------

def run_stage(ctx: Context, name: str) -> None:
    """One stage of ``ctx.cfg`` (a notebook runs them one by one); raises :class:`Stop`."""
    st = ctx.cfg.stages[name]
    if st.kind not in STAGES:
        raise ValueError(f"stage {name!r}: unknown kind {st.kind!r}; known: {sorted(STAGES)}")
    if st.kind == "train":
        train_stage(ctx, st, name)
    else:
        STAGES[st.kind](ctx, st)


def run(cfg, workdir: str) -> int:
    """Runs ``cfg.order``'s stages in ``workdir``; writes ``summary.md`` (and the report if a stage asks)."""
    from decipher_jax import env

    env.setup(devices=cfg.devices)  # before jax starts; warns if it already runs with other devices
    os.makedirs(workdir, exist_ok=True)
    ctx = Context(workdir, cfg, lines=[f"# {cfg.title}", ""])
    for name in cfg.order:
        try:
            run_stage(ctx, name)
        except Stop as e:
            ctx.say(str(e))
            break
    if not ctx.summary_written:
        _write_summary(ctx)
    return 0


def _write_summary(ctx: Context) -> None:
    out = layout.PipelineDir(ctx.workdir).summary
    with open(out, "w") as f:
        f.write("\n".join(ctx.lines) + "\n")
    ctx.summary_written = True
    print(f"wrote {out}")
