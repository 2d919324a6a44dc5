"""Tiny stage-1 runs: does the teacher stay sharp and diverse, and do the features probe well?

    .venv/bin/python benchmarks/ssl_tiny.py --prep outputs/demo/data/prep \\
        --run 'old|{"model.head.batch_norm": false, "ssl.teacher_temp": 0.07, "ssl.momentum_start": 0.9}' \\
        --run 'new|{}'

Each run trains the tiny ``vision_ssl`` config (plus the JSON overrides) on a prepared corpus,
then fits logistic probes (C by 3-fold CV, 3 seeds, all labels) on the teacher backbone's
mean-pooled patch tokens, beside a random-init ViT of the same shape. Prints one table: the
teacher's per-sample entropy and that of the batch mean at the end, the student's KL to the
teacher (DINO loss minus teacher entropy; mean of the first 5 and the last 5 steps), the CLS
feature spread, and held-out AUROC per probe task (the finding probes grouped into their mean).
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
    p.add_argument("--prep", required=True, help="a prepared corpus (decipher prep output)")
    p.add_argument("--run", action="append", required=True, help="NAME|{json overrides}")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from benchmarks.common import table
    from decipher_jax import sharding as sh
    from decipher_jax.eval import suite
    from decipher_jax.models.vit3d import ViT3D, ViTConfig
    from decipher_jax.state import Model
    from decipher_jax.trainers import common, vision_ssl

    config = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "vision_ssl.py") + ":tiny"
    root = args.workdir or tempfile.mkdtemp(prefix="ssl_tiny_")
    prep = os.path.abspath(args.prep)
    mesh = sh.make_mesh({"data": -1})
    rows, tasks = [], None
    for spec in args.run:
        name, _, over = spec.partition("|")
        cfg = common.load_config(config, {"data.dir": prep, **json.loads(over or "{}")})
        wd = os.path.join(os.path.abspath(root), name)
        vision_ssl.train(cfg, wd)
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            log = [json.loads(line) for line in f]
        kl = [r["dino"] - r["teacher_entropy"] for r in log]
        vit = ViTConfig(**cfg.model.vit.to_dict())
        model = Model(lambda r: ViT3D(vit, rngs=r), mesh)
        encs = {"stage 1": (model, suite.stage1_teacher(wd, model))}
        if tasks is None:  # the random-init baseline once, beside the first run
            encs["random init"] = (model, model.init(jax.random.key(123)))
        rows_p = suite.probe_encoders(wd, prep, fractions=(1.0,), seeds=(0, 1, 2), mesh=mesh, encs=(encs, vit))
        # {(encoder, task): test AUROC, mean over seeds}; the finding probes grouped into their mean
        scores = {k[:2]: v[0] for k, v in suite.summarise(rows_p, "auroc", group_findings=True).items()}
        if tasks is None:
            tasks = sorted({t for _, t in scores})
            rows.append(["random init", "-", "-", "-", "-", "-"]
                        + [f"{scores[('random init', t)]:.3f}" for t in tasks])
        e = log[-1]
        rows.append([name, len(log), f"{e['teacher_entropy']:.2f}", f"{e['teacher_entropy_of_mean']:.2f}",
                     f"{np.mean(kl[:5]):.2f} -> {np.mean(kl[-5:]):.2f}", f"{e['feature_std']:.3f}"]
                    + [f"{scores.get(('stage 1', t), float('nan')):.3f}" for t in tasks])
        print(rows[-1], flush=True)
    print(table(["run", "steps", "teacher entropy", "entropy of batch mean", "KL first -> last", "CLS std"]
                + [f"probe {t}" for t in tasks], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
