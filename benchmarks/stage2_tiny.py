"""Tiny stage-2 runs from one demo workdir's stage-1 towers: step speed, retrieval, probes.

    .venv/bin/python benchmarks/stage2_tiny.py --demo outputs/demo \\
        --run 'both|tiny|{}' \\
        --run 'frozen, run|tiny,locktext|{"data.cache_text": false}' \\
        --run 'locktext|tiny,locktext|{}'

Each run trains ``clip_align.py:<options>`` (plus the JSON overrides) from the demo's stage-1
vision and text towers on its prepared corpus, then fits the demo's logistic probes
(``suite.probe_encoders``: C chosen on the val split, 3 seeds, all labels) on the stage-2
image tower's mean-pooled patch tokens, beside a random-init ViT of the same shape. Prints two
tables: the trainer's logged steps/s (last window, compile excluded), the final loss,
held-out study R@5, the zero-shot finding queries' mean test AUROC
(``evaluators.FINDING_QUERIES``), and test AUROC per probe task (the finding probes grouped into their mean); then each run's gain over random init per task with
its 95% study-bootstrap interval (``suite.compare``). A ``steps`` override stretches the lr
schedule with it (the configs derive ``optim.total_steps`` from ``steps``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from decipher_jax import env  # noqa: E402

env.setup(devices=8)  # before jax: 8 simulated CPU devices (unless XLA_FLAGS sets a count), offline, absl


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True, help="a `decipher demo` workdir (data/prep, stage1_vision, stage1_text)")
    p.add_argument("--run", action="append", required=True, help="NAME|config options|{json overrides}")
    p.add_argument("--workdir", default=None)
    p.add_argument("--feature", default="mean", help="the attribute probes' frozen feature: mean, max, mean+max, ... (the findings read the anomaly pool)")
    args = p.parse_args(argv)

    import jax

    from benchmarks.common import table
    from decipher_jax import runs, zeroshot
    from decipher_jax import sharding as sh
    from decipher_jax.eval import evaluators, suite
    from decipher_jax.models.vit3d import ViT3D
    from decipher_jax.state import Model
    from decipher_jax.trainers import clip_align, common

    demo = os.path.abspath(args.demo)
    prep = os.path.join(demo, "data", "prep")
    config = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "clip_align.py")
    root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="stage2_tiny_"))
    mesh = sh.make_mesh({"data": -1, "fsdp": 2, "tensor": 2} if jax.device_count() % 4 == 0 else {"data": -1})
    rows, tasks, gains, gain_tasks = [], None, [], []
    for spec in args.run:
        name, opts, over = (spec.split("|") + ["", ""])[:3]
        base = {"data.dir": prep, "init.vision": os.path.join(demo, "stage1_vision"),
                "init.text": os.path.join(demo, "stage1_text", "hf_export"), "eval.before": False}
        cfg = common.load_config(f"{config}:{opts or 'tiny'}", {**base, **json.loads(over or "{}")})
        wd = os.path.join(root, name.replace(" ", "_").replace(",", ""))
        m = clip_align.train(cfg, os.path.join(wd, "stage2"))
        with open(os.path.join(wd, "stage2", "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]
        zs = zeroshot.ZeroShot.from_workdir(os.path.join(wd, "stage2"))
        zq = evaluators.finding_queries(zs, zs.embed_split(prep, "test"))
        model, params2, spec2 = runs.load_align(os.path.join(wd, "stage2"), mesh=mesh)
        vit = runs.align_vit_config(spec2)
        image = Model(lambda r: ViT3D(vit, rngs=r), mesh)
        # The random-init baseline beside every run (the same init each time), so that each run
        # gets its paired gains with study-bootstrap intervals (suite.compare -> eval/compare.json).
        encs = {"stage 2": (image, params2["image"]), "random init": (image, image.init(jax.random.key(123)))}
        probe_rows = suite.probe_encoders(wd, prep, fractions=(1.0,), seeds=(0, 1, 2), mesh=mesh, encs=(encs, vit),
                                          feature=args.feature)
        scores = {k[:2]: v[0] for k, v in suite.summarise(probe_rows, "auroc", group_findings=True).items()}
        with open(os.path.join(wd, "eval", "compare.json")) as f:
            cmp = {c["task"]: c for c in json.load(f) if not c["task"].startswith(suite.FINDING)}
        gains.append([name] + [f"{c['gain']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]" for c in cmp.values()])
        gain_tasks = list(cmp)
        if tasks is None:
            tasks = sorted({t for _, t in scores}, key=suite.task_order)
            rows.append(["random init", "-", "-", "-", "-", "-", "-"] + [f"{scores[('random init', t)]:.3f}" for t in tasks])
        rows.append([name, opts, cfg.steps, f"{last['steps_per_s']:.2f}", f"{m['loss']:.3f}",
                     f"{m.get('eval/test/i2t_study/R@5', float('nan')):.2f}", f"{zq.get('mean_auroc', float('nan')):.3f}"]
                    + [f"{scores.get(('stage 2', t), float('nan')):.3f}" for t in tasks])
        print(rows[-1], flush=True)
    print(table(["run", "config", "steps", "steps/s", "loss", "study R@5", "zero-shot findings AUROC"] + [f"AUROC {t}" for t in tasks], rows))
    print("stage 2 minus random init (AUROC; age: MAE in years, positive = stage 2 better), all labels, "
          "95% study-bootstrap interval:")
    print(table(["run"] + gain_tasks, gains))
    return 0


if __name__ == "__main__":
    sys.exit(main())
