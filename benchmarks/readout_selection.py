"""How the findings' probe readout is chosen on the val split, rule against rule, from the
features a pipeline's probes evaluation stored (``<workdir>/eval/features/<encoder>/<split>``:
the mean, max and anomaly pools of every encoder). For each encoder, label fraction and seed the
candidate readouts (``mean+max`` and ``anomaly``) are chosen by:

- ``family`` (the suite's rule, :func:`decipher_jax.eval.suite.select_readout`): the held-out
  log-loss pooled over the findings and "abnormal", weighted by their val rows;
- ``per probe``: each finding's own val log-loss (9-17 val series per finding at the demo's scale);
- ``abnormal only``: the "abnormal" task's val log-loss, applied to every finding;
- ``fixed``: one readout for every encoder.

Prints the mean finding test AUROC (mean over the probe seeds) per rule, encoder and fraction,
and stage 2 minus random init.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/readout_selection.py --workdir /tmp/demo
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ENCODERS = ("stage_2", "stage_1", "random_init")


def load_split(workdir: str, tag: str, split: str) -> dict:
    parts = [dict(np.load(f, allow_pickle=False)) for f in sorted(glob.glob(
        os.path.join(workdir, "eval", "features", tag, split, "part-*.npz")))]
    if not parts:
        raise FileNotFoundError(f"{workdir}: no stored features of {tag}/{split} (run the probes evaluation)")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--candidates", default="mean+max|anomaly")
    p.add_argument("--fractions", default="0.1,0.3,1.0")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args(argv)

    from benchmarks.common import table
    from decipher_jax.eval import features, suite

    cands = suite.readouts(args.candidates)
    fractions = tuple(float(f) for f in args.fractions.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    sweeps = {}  # encoder -> task -> [(feature, rows, scores)]
    for tag in ENCODERS:
        if not os.path.isdir(os.path.join(args.workdir, "eval", "features", tag)):
            continue
        feats = {sp: load_split(args.workdir, tag, sp) for sp in ("train", "val", "test")}
        for d in feats.values():
            for c in cands:
                d[c] = features.combined(d, c)
        held = suite.val_targets(feats["train"], feats["val"])
        sweeps[tag] = {t: suite.sweep_readouts(feats, t, ytr, yte, args.candidates, yva=held.get(t),
                                               fractions=fractions, seeds=seeds)
                       for t, ytr, yte in suite.tasks(feats["train"], feats["test"], names=("findings", "abnormal"))}

    def findings_auroc(tag: str, rule: str) -> list[float]:
        per = sweeps[tag]
        fin = [t for t in per if t.startswith(suite.FINDING)]
        if rule == "family":
            chosen = suite.select_readout(per)
            rows = {t: chosen[t][0] for t in fin}
        else:
            rows = {t: [] for t in fin}
            for i in range(len(fractions) * len(seeds)):
                for t in fin:
                    if rule == "per probe":
                        j = int(np.argmin([r[i]["cv_log_loss"] for _, r, _ in per[t]]))
                    elif rule == "abnormal only":
                        j = int(np.argmin([r[i]["cv_log_loss"] for _, r, _ in per["abnormal"]]))
                    else:
                        j = cands.index(rule.split(" ", 1)[1])
                    rows[t].append(per[t][j][1][i])
        out = []
        for fi in range(len(fractions)):
            idx = range(fi * len(seeds), (fi + 1) * len(seeds))
            out.append(float(np.mean([np.mean([rows[t][i]["auroc"] for t in fin]) for i in idx])))
        return out

    rules = ["family", "per probe", "abnormal only"] + [f"fixed {c}" for c in cands]
    body = []
    for rule in rules:
        got = {tag: findings_auroc(tag, rule) for tag in sweeps}
        cells = ["/".join(f"{v:.3f}" for v in got[tag]) for tag in sweeps]
        gain = ("/".join(f"{a - b:+.3f}" for a, b in zip(got["stage_2"], got["random_init"]))
                if {"stage_2", "random_init"} <= set(got) else "-")
        body.append([rule, *cells, gain])
    frac = " / ".join(f"{f:g}" for f in fractions)
    print(f"{args.workdir}: mean finding test AUROC over seeds {args.seeds}, label fractions {frac}")
    print(table(["rule", *sweeps, "stage 2 - random init"], body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
