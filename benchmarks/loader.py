"""Loader throughput: our Grain pipeline vs MONAI Dataset + torch DataLoader, same records.

Both read the *same* prepared ArrayRecord split through the same random-access source and
apply equivalent augmentations (random-resized 3D crop + resize, flips, intensity scale /
shift / gamma, Gaussian noise), with the same number of worker processes.

    python benchmarks/loader.py --workers 2 --batches 20 [--workdir /tmp/bench_data]

Prints volumes/s (single crop), multi-crop samples/s and peak RSS (process + workers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
from common import PeakRSS, machine, prepared_corpus, table  # noqa: E402


class FromSource:
    """MONAI-side reader: record index -> channel-first float32 volume (picklable)."""

    def __init__(self, tfds_dir, split):
        self.tfds_dir, self.split, self._src = tfds_dir, split, None

    def __getstate__(self):
        return {"tfds_dir": self.tfds_dir, "split": self.split, "_src": None}

    def __call__(self, i):
        if self._src is None:
            from decipher_jax.data.pipelines import data_source

            self._src = data_source(self.tfds_dir, self.split)
        return {"image": np.asarray(self._src[int(i)]["volume"], np.float32)[None]}


def monai_crop(size, scale_min):
    from monai import transforms as mt

    # RandSpatialCrop with random size between (scale_min^(1/3) * size_of_volume) and full ~ random-resized crop.
    return [
        mt.RandScaleCropd("image", roi_scale=scale_min ** (1 / 3), max_roi_scale=1.0, random_size=True),
        mt.Resized("image", spatial_size=size, mode="trilinear"),
        mt.RandFlipd("image", prob=0.5, spatial_axis=0), mt.RandFlipd("image", prob=0.5, spatial_axis=1),
        mt.RandFlipd("image", prob=0.5, spatial_axis=2),
        mt.RandAdjustContrastd("image", prob=1.0, gamma=(np.exp(-0.2), np.exp(0.2))),
        mt.RandScaleIntensityd("image", factors=0.1, prob=1.0), mt.RandShiftIntensityd("image", offsets=0.1, prob=1.0),
        mt.RandGaussianNoised("image", prob=1.0, std=0.02),
    ]


class MonaiMultiCrop:
    """2 global + n local crops, each through MONAI's random transforms (picklable)."""

    def __init__(self, gsize, lsize, n_local):
        from monai import transforms as mt

        self.g = mt.Compose(monai_crop(gsize, 0.32))
        self.l_ = mt.Compose(monai_crop(lsize, 0.05))
        self.n_local = n_local

    def __call__(self, d):
        g = [self.g(dict(d))["image"] for _ in range(2)]
        loc = [self.l_(dict(d))["image"] for _ in range(self.n_local)]
        import torch

        return {"global": torch.stack([torch.as_tensor(x) for x in g]), "local": torch.stack([torch.as_tensor(x) for x in loc])}


def run_monai(tfds_dir, n, kind, args):
    import torch
    from monai import transforms as mt
    from monai.data import Dataset

    reader = FromSource(tfds_dir, "train")
    if kind == "single":
        tf = mt.Compose([reader] + monai_crop((args.size,) * 3, 0.32))
    else:
        tf = mt.Compose([reader, MonaiMultiCrop((args.size,) * 3, (args.size // 2,) * 3, args.n_local)])
    ds = Dataset(data=list(range(n)), transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                     persistent_workers=args.workers > 0, drop_last=True,
                                     multiprocessing_context="spawn" if args.workers else None)

    def batches():
        while True:
            yield from dl

    return batches()


def run_ours(tfds_dir, kind, args):
    from decipher_jax.data import pipelines as P
    from decipher_jax.data import transforms as T

    src = P.data_source(tfds_dir, "train")
    cfg = P.LoaderConfig(batch_size=args.batch, seed=0, num_workers=args.workers, read_threads=args.read_threads)
    if kind == "single":
        return iter(P.images(src, cfg, (args.size,) * 3, train=True))
    crops = T.MultiCrop(global_size=(args.size,) * 3, local_size=(args.size // 2,) * 3, n_local=args.n_local,
                        patch_size=(8, 8, 8))
    return iter(P.vision_ssl(src, cfg, crops))


def measure(make_iter, batches, warmup=2):
    with PeakRSS() as rss:
        it = make_iter()
        for _ in range(warmup):
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        dt = time.perf_counter() - t0
    return dt, rss.peak


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def measure_one(prep_dir, n, name, kind, args):
    """One (loader, pipeline) measurement; run in a fresh process so that allocator settings
    (ours, or MONAI's with the same settings) cannot leak from one row into the next."""
    if name == "ours":
        return measure(lambda: run_ours(prep_dir, kind, args), args.batches)
    if name == "monai+malloc":  # MONAI with the allocator settings our loader applies
        from decipher_jax.data.pipelines import tune_malloc

        tune_malloc()
    return measure(lambda: run_monai(prep_dir, n, kind, args), args.batches)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/decipher_bench_data")
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n-local", type=int, default=4)
    p.add_argument("--read-threads", type=int, default=None, help="Grain reader threads per process (default: auto)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "name,kind" in a child process
    args = p.parse_args(argv)
    _, prep_dir = prepared_corpus(args.workdir, args.patients, args.spacing)
    from decipher_jax.data.pipelines import data_source

    n = len(data_source(prep_dir, "train"))
    if args.one:
        name, kind = args.one.split(",")
        dt, peak = measure_one(prep_dir, n, name, kind, args)
        print("RESULT " + json.dumps({"dt": dt, "peak": peak}))
        return
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    rows = []
    labels = {"ours": "decipher_jax (Grain)", "monai": "MONAI + DataLoader", "monai+malloc": "MONAI + DataLoader, our malloc settings"}
    for kind in ("single", "multicrop"):
        res = {}
        for name in ("ours", "monai", "monai+malloc"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), "--one", f"{name},{kind}"],
                                 env=env, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"{name} {kind} failed:\n{out.stderr[-3000:]}")
            r = json.loads(line[0][7:])
            res[name] = args.batches * args.batch / r["dt"]
            rows.append([kind, labels[name], f"{res[name]:.1f}", f"{r['peak'] / 2**20:.0f}"])
        rows.append([kind, "speed-up over MONAI (over MONAI with our malloc settings)",
                     f"{res['ours'] / res['monai']:.2f}x ({res['ours'] / res['monai+malloc']:.2f}x)", ""])
    print(f"# loader: {n} train series at {args.spacing} mm, crops {args.size}^3 (+{args.n_local} local "
          f"{args.size // 2}^3), batch {args.batch}, {args.workers} workers; each row in a fresh process; {machine()}")
    print(table(["pipeline", "loader", "samples/s", "peak RSS MiB"], rows))


if __name__ == "__main__":
    main()
