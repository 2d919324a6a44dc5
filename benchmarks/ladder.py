"""The ladder at a larger scale than the demo (issue 18, item 6), with its table.

    .venv/bin/python benchmarks/ladder.py --workdir outputs/ladder            # this CPU, ~60 min
    .venv/bin/python benchmarks/ladder.py --workdir outputs/ladder_gpu --gpu  # an H100 / H200, ~8 min

Runs ``decipher pipeline --config experiments/configs/ladder.py[:gpu]`` in a child process (it
sets up its own devices) into ``--workdir``, or reuses the stages a previous run finished (the
pipeline keeps finished runs; ``--rerun`` starts over), then prints one table from the
workdir's ``eval/ladder.json``: per task, rung and label fraction the test score with its 95%
study-bootstrap interval, and the stages' wall-clock times from ``summary.md``. ``--seed`` draws
another corpus (the generator seed and the split).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the ladder's rungs bottom to top (the probes name the frozen ones by their encoders' names)
RUNG_ORDER = ("random init", "stage 1 (DINO teacher)", "stage 2 (CLIP)", "supervised", "fine-tuned")
RUNG_NAME = {"random init": "random init, frozen", "stage 1 (DINO teacher)": "stage 1 (DINO teacher), frozen",
             "stage 2 (CLIP)": "stage 2 (CLIP), frozen", "supervised": "supervised (from random init)",
             "fine-tuned": "fine-tuned from stage 2"}


def ladder_table(workdir: str) -> str:
    from benchmarks.common import table

    with open(os.path.join(workdir, "eval", "ladder.json")) as f:
        res = json.load(f)
    rows = res["rows"]
    fractions = sorted({r["fraction"] for r in rows})
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        by = {(r["rung"], r["fraction"]): r for r in rows if r["task"] == task}
        rungs = sorted({k[0] for k in by}, key=lambda r: RUNG_ORDER.index(r) if r in RUNG_ORDER else 99)
        metric = next(r["metric"] for r in rows if r["task"] == task)
        body = [[RUNG_NAME.get(rung, rung)] + [f"{by[(rung, f)]['score']:.3f} [{by[(rung, f)]['lo']:.3f}, "
                                               f"{by[(rung, f)]['hi']:.3f}]" if (rung, f) in by else "-"
                                               for f in fractions] for rung in rungs]
        n = next(r["n_studies"] for r in rows if r["task"] == task)
        out.append(f"{task} ({metric}, {n} test studies):\n"
                   + table(["rung"] + [f"{f:.0%} labels" for f in fractions], body))
    out.append("\n".join(f"  {key}: best val step {run['best_step']}, test {run['test']:.3f}"
                          for key, run in sorted(res.get("runs", {}).items())))
    out.append(per_finding_table(workdir))
    return "\n\n".join(o for o in out if o)


def per_finding_table(workdir: str) -> str:
    """The frozen probes' test AUROC per finding, all labels, first seed (``eval/probes.json``)."""
    from benchmarks.common import table

    path = os.path.join(workdir, "eval", "probes.json")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        rows = [r for r in json.load(f) if r["task"].startswith("finding: ") and r["fraction"] == 1.0 and r["seed"] == 0]
    feature = rows[0].get("feature", "mean") if rows else "mean"  # the feature the probes read (one per run)
    rows = [r for r in rows if r.get("feature", "mean") == feature]
    encs = sorted({r["encoder"] for r in rows}, key=lambda e: RUNG_ORDER.index(e) if e in RUNG_ORDER else 99)
    tasks = sorted({r["task"] for r in rows})
    by = {(r["encoder"], r["task"]): r["auroc"] for r in rows}
    body = [[e] + [f"{by[(e, t)]:.2f}" if (e, t) in by else "-" for t in tasks] for e in encs]
    return f"frozen probes per finding (test AUROC on the {feature} feature, all labels, seed 0):\n" + table(
        ["encoder"] + [t[len("finding: "):] for t in tasks], body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="outputs/ladder")
    p.add_argument("--gpu", action="store_true", help="the GPU scale (experiments/configs/ladder.py:gpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rerun", action="store_true", help="delete the workdir first")
    args = p.parse_args(argv)

    wd = os.path.abspath(args.workdir)
    if args.rerun and os.path.isdir(wd):
        shutil.rmtree(wd)
    os.makedirs(wd, exist_ok=True)
    if not os.path.exists(os.path.join(wd, "eval", "ladder.json")):
        env = dict(os.environ)
        if not args.gpu:
            env.setdefault("JAX_PLATFORMS", "cpu")
        cmd = [sys.executable, "-m", "decipher_jax.cli", "pipeline", "--config",
               "experiments/configs/ladder.py" + (":gpu" if args.gpu else ""), "--workdir", wd, f"--config.seed={args.seed}"]
        t0 = time.perf_counter()
        with open(os.path.join(wd, "ladder.log"), "a") as log:
            rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if rc:
            print(f"the pipeline failed (exit {rc}); see {wd}/ladder.log")
            return rc
        print(f"pipeline in {time.perf_counter() - t0:.0f} s", flush=True)
    with open(os.path.join(wd, "summary.md")) as f:
        print(f.read().strip(), "\n")
    print(ladder_table(wd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
