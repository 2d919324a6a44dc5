"""Finding probes on readouts of the frozen patch tokens that look where a series differs from
normal ones, beside the mean + max pool the attributes read: the ``"anomaly"`` pool of
``eval.features`` (softmax(d / tau) weights, d each patch's distance to the nearest normal
training patch) at the bank's own tau and at half and twice it, and the single patch farthest
from normal (the visual map's arg-max). Every encoder of a pipeline workdir; probes as the
suite fits them (C chosen on the val split, seed 0).

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/anomaly_readout.py --workdir /tmp/demo
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--prep", default=None, help="default: <workdir>/data/prep")
    p.add_argument("--fractions", default="0.1,1.0")
    args = p.parse_args(argv)

    from decipher_jax import sharding as sh
    from decipher_jax.data import transforms as T
    from decipher_jax.eval import embed, features, localisation, probes, suite

    prep = args.prep or os.path.join(args.workdir, "data", "prep")
    mesh = sh.make_mesh({"data": -1})
    encs, vit = suite.encoders(args.workdir, mesh)
    sources = suite.split_sources(prep)
    fractions = tuple(float(f) for f in args.fractions.split(","))
    readouts = ("mean+max", "argmax", "anomaly, tau x0.5", "anomaly", "anomaly, tau x2", "mean+max+anomaly")
    table = []
    for name, (model, params) in encs.items():
        t0 = time.time()
        bank = features.normal_bank(model, params, sources["train"], mesh, size=vit.img_size, patch_size=vit.patch_size)
        fn = functools.partial(features._encoder(model, (), True), params)
        feats = {}
        for sp, src in sources.items():
            d = embed.apply(fn, embed.scan_split(src, [T.Decode(), T.Resize(tuple(vit.img_size))],
                                                 embed.round_batch(16, mesh)), mesh, ["image"])
            tok = d["patch"]
            f = features.with_anomaly(d, bank)
            for k in (0.5, 2.0):
                f[f"anomaly, tau x{k:g}"] = features.with_anomaly(d, dataclasses.replace(bank, tau=bank.tau * k))["anomaly"]
            dist = bank.distances(tok, localisation.groups_of(d), d["series_id"], d.get("patient_id"))
            f["argmax"] = tok[np.arange(len(tok)), dist.argmax(1)]
            f["mean+max"] = features.combined(f, "mean+max")
            f["mean+max+anomaly"] = features.combined(f, "mean+max+anomaly")
            feats[sp] = f
        held = suite.val_targets(feats["train"], feats.get("val"))
        t1 = time.time()
        for readout in readouts:
            res_f, res_ab = {f: [] for f in fractions}, {}
            for tname, ytr, yte in suite.tasks(feats["train"], feats["test"], ("abnormal", "findings")):
                tr_ok, te_ok = suite.known(ytr), suite.known(yte)
                yva = held.get(tname)
                res = probes.logistic_sweep(feats["train"][readout][tr_ok], feats["test"][readout][te_ok],
                                            [probes.Task(tname, ytr[tr_ok], yte[te_ok], yva)], fractions=fractions,
                                            seeds=(0,), iters=100, cv_groups=suite.cv_groups(feats["train"], tr_ok),
                                            val_x=feats["val"][readout] if yva is not None else None)
                for r in res:
                    (res_f[r["fraction"]].append(r["auroc"]) if tname != "abnormal" else res_ab.__setitem__(r["fraction"], r["auroc"]))
            table.append([name, readout] + [f"{np.mean(res_f[f]):.3f}" for f in fractions]
                         + [f"{res_ab[f]:.3f}" for f in fractions])
        print(f"# {name}: bank {len(bank.series_id)} series, tau {bank.tau:.4f}; tokens and maps {t1 - t0:.0f} s, "
              f"probes {time.time() - t1:.0f} s", flush=True)
    hdr = ["encoder", "readout"] + [f"findings {f:g}" for f in fractions] + [f"abnormal {f:g}" for f in fractions]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
