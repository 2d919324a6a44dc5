"""Prep throughput: our per-series chain vs MONAI's LoadImage -> Orientation -> Spacing ->
ScaleIntensityRangePercentiles, on the same NIfTI files, one process each.

    python benchmarks/prep.py [--series 60] [--spacing 2]

Also reports the agreement of the two outputs where their grids coincide (axis-aligned inputs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
from common import PeakRSS, machine, table  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/decipher_bench_data")
    p.add_argument("--series", type=int, default=60)
    p.add_argument("--spacing", type=float, default=2.0)
    args = p.parse_args(argv)
    from decipher_jax.data import corpus

    manifest = os.path.join(args.workdir, "raw", "manifest.csv")
    if not os.path.exists(manifest):
        manifest = corpus.build(os.path.join(args.workdir, "raw"), n_patients=40, seed=0, matrix=40)
    from data_prep import manifest as manifest_lib
    from data_prep import schema

    rows = manifest_lib.read(manifest)  # resolves paths relative to the manifest
    # The real templates (1 mm, ~7 M voxels) plus synthetic series.
    paths = [r.image for r in rows if r.role == schema.TEMPLATE] + [r.image for r in rows][: args.series]

    from data_prep import volume
    from monai import transforms as mt

    cfg = volume.VolumeConfig(target_spacing=(args.spacing,) * 3, foreground_only_stats=False)
    monai_chain = mt.Compose([
        mt.LoadImage(image_only=True, ensure_channel_first=True),
        mt.Orientation(axcodes="RAS"),
        mt.Spacing(pixdim=(args.spacing,) * 3, mode="bilinear"),
        mt.ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
    ])
    results = {}
    for name, fn in (("decipher_jax", lambda pth: volume.process(pth, None, cfg)["volume"]),
                     ("MONAI", lambda pth: np.asarray(monai_chain(pth))[0])):
        fn(paths[0])  # warm-up (imports, caches)
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            outs = [fn(pth) for pth in paths]
            dt = time.perf_counter() - t0
        results[name] = (len(paths) / dt, rss.peak, outs)
    ours, theirs = results["decipher_jax"][2], results["MONAI"][2]
    same = [(a, b) for a, b in zip(ours, theirs) if a.shape == b.shape]
    agree = np.median([np.abs(a - b).mean() for a, b in same]) if same else float("nan")
    rows_out = [[k, f"{v[0]:.2f}", f"{v[1] / 2**20:.0f}"] for k, v in results.items()]
    rows_out.append(["speed-up", f"{results['decipher_jax'][0] / results['MONAI'][0]:.2f}x", ""])
    print(f"# prep: {len(paths)} NIfTI series (2 real 1 mm templates + synthetic) -> RAS {args.spacing} mm + "
          f"percentile scaling; {machine()}")
    print(f"# outputs on identical grids: {len(same)}/{len(paths)}, median mean |ours - MONAI| = {agree:.4f}")
    print(table(["chain", "series/s", "peak RSS MiB"], rows_out))


if __name__ == "__main__":
    main()
