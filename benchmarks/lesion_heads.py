"""Lesion segmentation heads on frozen tokens, side by side across head settings, on a pipeline
run's prepared records (train -> val for the lr -> test), per encoder (stage 2, stage 1, random).

    .venv/bin/python benchmarks/lesion_heads.py --workdir W
    .venv/bin/python benchmarks/lesion_heads.py --workdir W --runs 'skip1 150x4|1|150|4' 'skip2 600x8|2|600|8'

A run is ``name|skip_convs|steps|batch[|anomaly]``: the unetr head's image skip of one or two
3^3 convolutions, the heads' steps and batch, and (1) whether the heads also read each patch's
distance to the nearest normal training patch (``segtasks.with_distance``; default 0) (lrs 1e-2 and 3e-2, one seed, as the Segmentation
evaluator). Prints the test foreground Dice of each head kind and the wall time of each run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--runs", nargs="+", default=["skip1 150x4|1|150|4", "skip2 150x4|2|150|4", "skip2 600x8|2|600|8"])
    p.add_argument("--encoders", default="align,random")
    p.add_argument("--lrs", default="1e-2,3e-2")
    args = p.parse_args(argv)

    from decipher_jax import runs
    from decipher_jax import sharding as sh
    from decipher_jax.eval import segtasks

    mesh = sh.make_mesh({"data": -1})
    w = args.workdir
    want = args.encoders.split(",")
    encs = runs.encoders(align=os.path.join(w, "stage2") if "align" in want else "",
                         ssl_teacher=os.path.join(w, "stage1_vision") if "ssl_teacher" in want else "",
                         random="random" in want, mesh=mesh)
    legacy = {e.name: (e.model, e.params) for e in encs.values()}
    size = next(iter(encs.values())).vit.img_size
    lrs = tuple(float(x) for x in args.lrs.split(","))
    print("| run | encoder | linear | decoder | unetr | seconds |")
    print("|---|---|---|---|---|---|")
    for spec in args.runs:
        name, skip, steps, batch, *anomaly = spec.split("|")
        t0 = time.time()
        res = segtasks.lesions(legacy, os.path.join(w, "data", "prep"), mesh, size=size, lrs=lrs, seeds=(0,),
                               steps=int(steps), batch=int(batch), skip_convs=int(skip),
                               anomaly=bool(int(anomaly[0])) if anomaly else False)
        dt = time.time() - t0
        by = {}
        for row in res["rows"]:
            by.setdefault(row["encoder"], {})[row["head"]] = row["dice_mean_fg"]
        for enc, d in by.items():
            print(f"| {name} | {enc} | {d.get('linear', float('nan')):.3f} | {d.get('decoder', float('nan')):.3f} | "
                  f"{d.get('unetr', float('nan')):.3f} | {dt:.0f} |", flush=True)


if __name__ == "__main__":
    main()
