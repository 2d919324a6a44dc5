"""Stage 1 (vision) against its step count: the EMA teacher's frozen features on the demo's tasks.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/stage1_steps.py --workdir /tmp/demo --out /tmp/s1 \\
        --steps 30 300 1000 3000

Trains ``vision_ssl.py:tiny`` on a finished demo's prepared corpus (``<workdir>/data/prep``) for
each step count (``<out>/steps<N>``; a finished run is reused, and ``--existing N=RUN`` names one
trained elsewhere, e.g. the demo's own 30-step ``stage1_vision``), then runs the Probes evaluator
on its teacher beside a random-init ViT of the same shape (``decipher eval
--config eval.py:probes``, the demo's protocol: three label fractions, three seeds, the findings'
readout and every penalty chosen on val) into ``<out>/eval<N>``. Prints one table: training
seconds and the teacher's last entropies, the findings' mean test AUROC at 10 / 30 / 100 % labels,
and stage 1 minus random init with its 95 % study-bootstrap interval (findings, "abnormal", age
MAE in years: positive = stage 1 better). Two simulated devices, as the demo.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args, log):
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=2"))
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "decipher_jax.cli", *args], env=env, stdout=f,
                             stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        raise SystemExit(f"decipher {args[0]} failed (exit {rc}); see {log}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a finished demo (its data/prep)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=[30, 300, 1000])
    p.add_argument("--existing", action="append", default=[], metavar="N=RUN", help="a stage-1 run of N steps")
    args = p.parse_args(argv)

    from benchmarks.common import table

    prep = os.path.join(os.path.abspath(args.workdir), "data", "prep")
    existing = {int(k): v for k, v in (e.split("=", 1) for e in args.existing)}
    os.makedirs(args.out, exist_ok=True)
    body = []
    for n in args.steps:
        run = existing.get(n) or os.path.join(args.out, f"steps{n}")
        seconds = ""
        if n not in existing and not os.path.exists(os.path.join(run, "checkpoints", str(n))):
            t0 = time.perf_counter()
            _cli(["train", "--config", os.path.join(ROOT, "experiments/configs/vision_ssl.py") + ":tiny", "--workdir",
                  run, f"--config.data.dir={prep}", f"--config.steps={n}", "--config.checkpoint_every=500",
                  "--config.log_every=50"], os.path.join(args.out, f"steps{n}.log"))
            seconds = f"{time.perf_counter() - t0:.0f}"
        ev = os.path.join(args.out, f"eval{n}")
        if not os.path.exists(os.path.join(ev, "eval", "compare.json")):
            _cli(["eval", "--config", os.path.join(ROOT, "experiments/configs/eval.py") + ":probes", "--workdir", ev,
                  "--config.runs.align=", f"--config.runs.ssl_teacher={run}", f"--config.data={prep}"],
                 os.path.join(args.out, f"eval{n}.log"))
        with open(os.path.join(run, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]
        with open(os.path.join(ev, "eval", "probes.json")) as f:
            rows = json.load(f)
        with open(os.path.join(ev, "eval", "compare.json")) as f:
            cmp = {c["task"]: c for c in json.load(f) if c.get("a_id") == "ssl_teacher"}
        mean = {}
        for r in rows:
            if r["task"].startswith("finding"):
                mean.setdefault((r["encoder_id"], r["fraction"]), []).append(r["auroc"])
        fr = sorted({f for _, f in mean})
        auc = lambda enc: " / ".join(f"{np.mean(mean[(enc, f)]):.3f}" for f in fr)  # noqa: E731
        gain = lambda t: "-" if t not in cmp else f"{cmp[t]['gain']:+.3f} [{cmp[t]['lo']:+.3f}, {cmp[t]['hi']:+.3f}]"  # noqa: E731
        findings = next((t for t in cmp if t.startswith("findings")), "")
        body.append([n, seconds or "-", f"{last.get('teacher_entropy', float('nan')):.2f} / "
                     f"{last.get('teacher_entropy_of_mean', float('nan')):.2f}", auc("ssl_teacher"), auc("random"),
                     gain(findings), gain("abnormal"), gain("age")])
    print(f"{args.workdir}: stage 1 vision (vision_ssl.py:tiny) by step count; findings at "
          f"{' / '.join(f'{f:g}' for f in fr)} of the labels")
    print(table(["steps", "train s", "teacher entropy / of the mean (nats)", "stage 1 findings", "random init",
                 "findings gain", "abnormal gain", "age gain (years)"], body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
