"""The ladder's two trained rungs (supervised from random init, fine-tuned from stage 2) on a
finished demo workdir, with a fine-tuning config variant, into ``--out``: the demo ladder
stage's settings (``experiments/configs/demo.py``: 200 steps, val every 50, the stage-2 ViT for
the supervised rung) at 10 % and 100 % labels. Prints each run's test score, best val step and
val curve. ``--set`` overrides apply to both rungs, or with ``--fine-tuned-only`` to the
fine-tuned rung alone (recipes compared against one supervised reference).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu .venv/bin/python \\
        benchmarks/ladder_rungs.py --workdir /tmp/demo --out /tmp/rungs/lpft --config findings,tiny,anomaly
    ... --config findings,tiny,anomaly --fine-tuned-only --set 'optim.lr_rules=[["backbone/.*", 0.1]]'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a finished demo (its data/prep and stage2)")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="findings,tiny,anomaly", help="finetune.py's argument")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="a config override")
    p.add_argument("--fine-tuned-only", action="store_true", help="--set acts on the fine-tuned rung alone")
    p.add_argument("--fractions", default="0.1,1.0")
    p.add_argument("--rungs", default="supervised,fine-tuned")
    args = p.parse_args(argv)

    from benchmarks.common import table
    from decipher_jax import runs
    from decipher_jax.trainers import common, finetune

    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    align = os.path.join(args.workdir, "stage2")
    vit = dataclasses.asdict(runs.align_vit_config(runs.read_spec(align)))
    body = []
    for rung in args.rungs.split(","):
        for f in (float(x) for x in args.fractions.split(",")):
            w = os.path.join(args.out, f"{rung}-{f:g}")
            t0 = time.perf_counter()
            if not os.path.exists(os.path.join(w, "test.json")):
                over = {"data.dir": os.path.join(args.workdir, "data", "prep"), "data.label_fraction": f,
                        "init": align if rung == "fine-tuned" else "", "steps": 200, "eval.every": 50}
                if rung == "supervised":
                    over["model.vit"] = vit
                if rung == "fine-tuned" or not args.fine_tuned_only:
                    over.update(extra)
                finetune.train(common.load_config(os.path.join(CONFIGS, "finetune.py") + ":" + args.config, over), w)
            with open(os.path.join(w, "test.json")) as fh:
                r = json.load(fh)
            evals = " ".join(f"{int(k)}:{v:.3f}" for k, v in sorted(r["val"]["evals"].items(), key=lambda kv: int(kv[0])))
            body.append([rung, f"{f:g}", f"{r['test']['score']:.3f}", r["best_step"], evals,
                         f"{time.perf_counter() - t0:.0f}"])
    print(f"{args.workdir}: finetune.py:{args.config} {' '.join(args.set)}"
          + (" (fine-tuned rung only)" if args.fine_tuned_only and args.set else ""))
    print(table(["rung", "labels", "test AUROC", "best val step", "val AUROC by step", "seconds"], body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
