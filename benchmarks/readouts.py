"""Frozen readouts of the patch tokens for the finding probes, side by side, on a pipeline run.

    .venv/bin/python benchmarks/readouts.py --workdir /tmp/lad5 [--fractions 1.0,0.1]

Per encoder of the run (stage 2, stage 1's teacher, random init) the patch tokens of every
series of the train, val and test splits (resized whole to the encoder's grid, as the probes
see them), then readouts:
- ``mean+max``: the probes' default (the suite's ``probe_encoders``);
- ``zmax+zmin``: each token standardised by the mean and standard deviation of the training
  series' tokens at the same grid position in the same (body region, sequence) group, then the
  max and the min over positions. Label-free: the statistics use every training series, not
  the normal ones. A lesion is a patch unlike that position's usual patch, which a plain max
  over positions sees only if it is brighter than every other patch of the volume;
- ``mean+max+zmax+zmin``: both.
The same logistic probes as the suite (one per finding on its regions' series, penalty chosen
on the val split, label fractions by patient, seed 0). Prints mean test AUROC per encoder and
readout, and per finding.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.lru_cache(maxsize=4)
def _tokens_fn(model):
    import jax
    import jax.numpy as jnp

    def f(params, batch):
        out = model(params)(batch["image"])
        p = out["patch"].astype(jnp.float32)
        return {"patch": p, "mean": p.mean(1), "max": p.max(1)}

    return jax.jit(f)


def tokens(model, params, source, mesh, size):
    from decipher_jax.data import transforms as T
    from decipher_jax.eval import embed

    fn = functools.partial(_tokens_fn(model), params)
    batches = embed.scan_split(source, [T.Decode(), T.Resize(tuple(size))], embed.round_batch(16, mesh))
    return embed.apply(fn, batches, mesh, ["image"])


def groups(d) -> np.ndarray:
    return np.char.add(np.char.add(np.asarray(d["body_region"]).astype(str), "|"), np.asarray(d["sequence"]).astype(str))


def position_stats(train: dict, min_count: int = 4):
    """{group: (mean, std)} of the training tokens at each grid position, (P, D) each; a
    group with fewer than ``min_count`` series falls back to the statistics of all of them."""
    g = groups(train)
    p = train["patch"]
    every = (p.mean(0), p.std(0) + 1e-3)
    out = {}
    for k in np.unique(g):
        rows = p[g == k]
        out[k] = (rows.mean(0), rows.std(0) + 1e-3) if len(rows) >= min_count else every
    return out, every


def standardised_readouts(d: dict, stats) -> dict:
    per, every = stats
    g = groups(d)
    z = np.empty_like(d["patch"])
    for k in np.unique(g):
        mu, sd = per.get(k, every)
        z[g == k] = (d["patch"][g == k] - mu) / sd
    return {"zmax": z.max(1), "zmin": z.min(1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--fractions", default="1.0,0.1")
    p.add_argument("--readouts", default="mean+max,zmax+zmin,mean+max+zmax+zmin")
    args = p.parse_args(argv)

    from decipher_jax import sharding as sh
    from decipher_jax.eval import features, probes, suite

    fractions = tuple(float(x) for x in args.fractions.split(","))
    readouts = args.readouts.split(",")
    mesh = sh.make_mesh({"data": -1})
    encs, vit = suite.encoders(args.workdir, mesh)
    sources = suite.split_sources(os.path.join(args.workdir, "data", "prep"))
    results, per_finding = {}, {}
    for name, (model, params) in encs.items():
        t0 = time.time()
        feats = {s: tokens(model, params, src, mesh, vit.img_size) for s, src in sources.items()}
        stats = position_stats(feats["train"])
        for d in feats.values():
            d.update(standardised_readouts(d, stats))
        t_tok = time.time() - t0
        held = suite.val_targets(feats["train"], feats.get("val"), names=("findings",))
        for r in readouts:
            x = {s: features.combined(d, r) for s, d in feats.items()}
            scores = {f: [] for f in fractions}
            for tname, ytr, yte in suite.tasks(feats["train"], feats["test"], names=("findings",)):
                tr_ok, te_ok = suite.known(ytr), suite.known(yte)
                yva = held.get(tname)
                res = probes.logistic_sweep(x["train"][tr_ok], x["test"][te_ok],
                                            [probes.Task(tname, ytr[tr_ok], yte[te_ok], yva)], fractions=fractions,
                                            seeds=(0,), iters=100, cv_groups=suite.cv_groups(feats["train"], tr_ok),
                                            val_x=x["val"] if yva is not None else None)
                for row in res:
                    scores[row["fraction"]].append(row["auroc"])
                    if row["fraction"] == max(fractions):
                        per_finding.setdefault((name, r), {})[tname.replace(suite.FINDING, "")] = row["auroc"]
            results[(name, r)] = {f: float(np.mean(v)) for f, v in scores.items()}
            print(f"{name:>24} {r:>22}: " + "  ".join(f"{f:g}: {results[(name, r)][f]:.3f}" for f in fractions)
                  + f"  (tokens {t_tok:.0f} s)", flush=True)
    print("\n| encoder | readout | " + " | ".join(f"{f:g} labels" for f in fractions) + " |")
    print("|---|---|" + "---|" * len(fractions))
    for (name, r), v in results.items():
        print(f"| {name} | {r} | " + " | ".join(f"{v[f]:.3f}" for f in fractions) + " |")
    names = sorted({k for v in per_finding.values() for k in v})
    print("\n| encoder | readout | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for (name, r), v in per_finding.items():
        print(f"| {name} | {r} | " + " | ".join(f"{v.get(n, float('nan')):.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
