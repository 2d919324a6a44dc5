"""The demo's pretrained-vs-random comparison on several draws of the embedded corpus.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 --workdir outputs/demo_seeds

Runs ``decipher demo --seed S`` (one process per seed: each sets up its own simulated
devices) into ``<workdir>/seed<S>``, or reuses a finished one (``summary.md`` present;
``--rerun`` forces it), then prints one table: per seed and task, stage 2 minus random init
with its 95% study-bootstrap interval (``eval/compare.json``; AUROC, or for age the MAE in
years, positive = stage 2 better), and in the last column how many tasks stage 2 wins with
an interval clear of 0 against how many it loses. One demo run is one draw of corpus,
split and training; this shows which of its gains survive another draw. The last row treats
each draw's gain as one sample: the mean over draws with a t-interval (which, unlike the
per-draw bootstrap, also spans the training and probe-selection noise) and the count of
draws with a positive gain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default="outputs/demo_seeds")
    p.add_argument("--rerun", action="store_true", help="run the demo again where a finished one exists")
    args = p.parse_args(argv)

    from benchmarks.common import table

    rows, tasks, gains = [], None, {}
    for seed in args.seeds:
        wd = os.path.abspath(os.path.join(args.workdir, f"seed{seed}"))
        if args.rerun or not os.path.exists(os.path.join(wd, "summary.md")):
            t0 = time.perf_counter()
            env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
            log_path = os.path.join(args.workdir, f"seed{seed}.log")
            os.makedirs(args.workdir, exist_ok=True)
            with open(log_path, "w") as log:
                rc = subprocess.call([sys.executable, "-m", "decipher_jax.cli", "demo", "--workdir", wd,
                                      "--seed", str(seed)], env=env, stdout=log, stderr=subprocess.STDOUT)
            if rc:
                print(f"seed {seed}: the demo failed (exit {rc}); see {log_path}")
                continue
            print(f"seed {seed}: demo in {time.perf_counter() - t0:.0f} s", flush=True)
        with open(os.path.join(wd, "eval", "compare.json")) as f:
            cmp = {c["task"]: c for c in json.load(f) if c.get("a_id") == "align" and ":" not in c["task"]}
        tasks = tasks or list(cmp)
        for t in tasks:
            if t in cmp:
                gains.setdefault(t, []).append(cmp[t]["gain"])
        wins = sum(cmp[t]["lo"] > 0 for t in tasks if t in cmp)
        losses = sum(cmp[t]["hi"] < 0 for t in tasks if t in cmp)
        n = next(iter(cmp.values()))["n_studies"]
        rows.append([f"{seed} ({n})"] + [f"{cmp[t]['gain']:+.3f} [{cmp[t]['lo']:+.3f}, {cmp[t]['hi']:+.3f}]"
                                         if t in cmp else "-" for t in tasks] + [f"{wins} / {losses}"])
    if rows:
        print("stage 2 minus random init, all labels, 95% study-bootstrap intervals (age: MAE in years, "
              "positive = stage 2 better):")
        if len(rows) >= 2:  # across draws: each draw's gain is one sample (its corpus, split and training)
            from scipy import stats

            cells = []
            for t in tasks:
                g = np.asarray(gains.get(t, []))
                half = stats.t.ppf(0.975, len(g) - 1) * g.std(ddof=1) / np.sqrt(len(g)) if len(g) > 1 else np.nan
                cells.append(f"{g.mean():+.3f} [{g.mean() - half:+.3f}, {g.mean() + half:+.3f}], "
                             f"{int((g > 0).sum())}/{len(g)} > 0")
            rows.append([f"mean over {len(rows)} draws (t-interval)"] + cells + [""])
        print(table(["corpus seed (test studies)"] + tasks + ["wins / losses"], rows))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
