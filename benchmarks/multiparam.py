"""Multi-parametric MRI (issue 22): findings by the sequences present, for stem and scale variants.

    python benchmarks/multiparam.py --workdir outputs/mp_bench [--variants linear,conv] [--steps 300]
        [--patients 400] [--reuse] [--trained-steps 300]

Each variant runs experiments/configs/multiparam_demo.py's stages (the embedded multi-sequence
corpus, shared by the variants; the multi-sequence and single-sequence encoders pretrained with
the variant's overrides; the ``multiparam`` evaluator) in ``<workdir>/<variant>/`` and prints one
table: mean test AUROC over the findings per number of sequences present, for every encoder row,
and the issue's criteria (all sequences against the best single-sequence encoder; above it with
k sequences). The held-out reconstruction against the copy baselines comes from each run's
``heldout.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

VARIANTS = {
    "linear": (),
    "conv": (("model.vit.stem", "conv"),),
    "nocon": (("pretrain.contrastive_weight", 0.0),),
    "skip16": (("model.voxel_skip", 16),),
    "noviewdrop": (("pretrain.view_drop", 0.0),),
    "conv_noviewdrop": (("model.vit.stem", "conv"), ("pretrain.view_drop", 0.0)),
    "brainmvp": (("pretrain.temperature", 1.0), ("pretrain.loss_on", "all"), ("pretrain.residual", False),
                 ("pretrain.templates", "reconstruction"), ("pretrain.view_drop", 0.0)),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="outputs/mp_bench")
    p.add_argument("--variants", default="linear,conv")
    p.add_argument("--steps", type=int, default=300)
    # 400: at 160 patients (about 25 complete test studies) the rows' intervals overlap entirely
    p.add_argument("--patients", type=int, default=400)
    p.add_argument("--reuse", action="store_true", help="keep finished pretraining runs (those with heldout.json)")
    p.add_argument("--trained-steps", type=int, default=300, help="the end-to-end rungs' steps (0: none)")
    args = p.parse_args(argv)
    from decipher_jax import env

    env.setup(devices=2)
    from decipher_jax import layout, pipeline
    from decipher_jax.eval import multiparam as mpe
    from decipher_jax.trainers import common

    cfg = common.load_config(os.path.join(pipeline.CONFIGS, "multiparam_demo.py"))
    cfg.stages.multiparam_data.patients = args.patients
    data_dir = os.path.join(args.workdir, "data_shared")
    results = {}
    for name in args.variants.split(","):
        w = os.path.join(args.workdir, name)
        os.makedirs(w, exist_ok=True)
        ctx = pipeline.Context(w, cfg, lines=[])
        prep_dir = layout.PipelineDir(data_dir).multiparam_prep
        if not os.path.exists(os.path.join(prep_dir, "dataset_card.json")):
            pipeline.run_stage(pipeline.Context(data_dir, cfg, lines=[]), "multiparam_data")
        ctx.multiparam = prep_dir
        t0 = time.perf_counter()
        for stage in ("multiparam", "multiparam_single"):
            if args.reuse and os.path.exists(os.path.join(w, stage, "heldout.json")):
                continue
            st = cfg.stages[stage]
            st.overrides = tuple(st.overrides) + VARIANTS[name] + (("steps", args.steps),)
            pipeline.run_stage(ctx, stage)
            st.overrides = (("data.dir", "{multiparam}"),)
        cfg.stages.multiparam_eval.overrides = (("evals.multiparam.trained_steps", args.trained_steps),)
        pipeline.run_stage(ctx, "multiparam_eval")
        with open(layout.PipelineDir(w).result("multiparam")) as f:
            r = json.load(f)
        held = {}
        for run in ("multiparam", "multiparam_single"):
            with open(os.path.join(w, run, "heldout.json")) as f:
                held[run] = json.load(f)
        results[name] = (r, held, time.perf_counter() - t0)
    print("\n| variant | encoder | 1 seq | 2 | 3 | 4 | held-out MSE template view / copy template |")
    print("|---|---|---|---|---|---|---|")
    for name, (r, held, secs) in results.items():
        for enc, row in r["rows"].items():
            run = "multiparam_single" if enc.startswith("single") else "multiparam"
            h = held[run] if enc.startswith(("multi", "single")) else None
            hs = f"{h['masked_mse_template']:.4f} / {h['copy_template']:.4f}" if h else ""
            print(f"| {name} | {enc} | " + " | ".join(mpe.by_size_cell(row, k) for k in (1, 2, 3, 4)) + f" | {hs} |")
        for enc, row in (r.get("segmentation") or {}).get("rows", {}).items():
            print(f"| {name} | lesion Dice, {enc} | " + " | ".join(mpe.by_size_cell(row, k) for k in (1, 2, 3, 4)) + " | |")
        for key, c in (r.get("criteria") or {}).items():
            g = c.get("gain") or {}
            print(f"| {name} | criteria [{key}] | all {c['all_sequences']:.3f} vs best single ({c['best_single_sequence']}) "
                  f"{c['best_single']:.3f}: gain {g.get('gain', float('nan')):+.3f} [{g.get('lo', float('nan')):+.3f}, "
                  f"{g.get('hi', float('nan')):+.3f}], graceful {c['graceful']} | | | | {secs:.0f} s |")
    print(f"# {r['studies']} studies; findings {r['findings']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
