"""`decipher prep` on Apache Beam's DirectRunner against the local process pool, on the same
manifest, side by side in one run; then a scaling statement for a Decipher-MR-sized corpus.

    python benchmarks/prep_beam.py [--patients 40] [--workers 2] [--spacing 2]

Each configuration runs the whole preparation (process every series, split, write the ArrayRecord
shards, the card) from an empty output folder, in a fresh process (peak RSS: that process and its
workers). The scaling statement times ``volume.process`` on the real 1 mm brain templates in the
corpus (MNI152 from nilearn, Colin27 from mricron-data) on one core, and multiplies out to 203k
series (the paper's corpus) over a number of cores, with TFDS's shard count for the output and
the local writer's measured rate for the records.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import psutil  # noqa: E402
from common import PeakRSS, machine, table  # noqa: E402

PAPER_SERIES = 203_000


def _one(kind: str, manifest: str, out: str, workers: int, spacing: float) -> None:
    """One preparation (in a child process); prints a JSON line with its timing."""
    from data_prep import prep, volume

    cfg = prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(spacing,) * 3), workers=workers)
    from data_prep import beam_prep

    write = [0.0]  # seconds in the records' writing (TFDS's builder), beside the whole run

    def timed(fn):
        def f(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                write[0] += time.perf_counter() - t
        return f

    prep._build_tfds = timed(prep._build_tfds)  # both runners write through it
    t0 = time.perf_counter()
    res = (beam_prep.run if kind == "beam" else prep.run)(manifest, out, cfg, progress=False)
    dt = time.perf_counter() - t0
    n = sum(c["series"] for c in res.counts.values())
    print(json.dumps({"seconds": dt, "write": write[0], "series": n, "processed": res.processed,
                      "errors": len(res.errors)}))


def _run(kind: str, manifest: str, out: str, workers: int, spacing: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    base = psutil.Process().memory_info().rss
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    with PeakRSS() as rss:
        p = subprocess.run([sys.executable, __file__, "--one", kind, "--manifest", manifest, "--out", out,
                            "--workers", str(workers), "--spacing", str(spacing)],
                           env=env, capture_output=True, text=True, check=False)
    if p.returncode:
        raise SystemExit(f"{kind}: failed\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["peak_mib"] = (rss.peak - base) / 2**20
    res["bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(out, "tfds"))
                       for f in fs)
    return res


def _real_series_cost(manifest: str, spacing: float) -> tuple[float, int, float]:
    """(seconds per real 1 mm series on one core, how many, stored MiB per series)."""
    from data_prep import manifest as manifest_lib
    from data_prep import schema, volume

    real = [r for r in manifest_lib.read(manifest) if r.role == schema.TEMPLATE]
    cfg = volume.VolumeConfig(target_spacing=(spacing,) * 3)
    volume.process(real[0].image, None, cfg)  # warm-up
    t0, size = time.perf_counter(), 0
    for r in real:
        size += volume.process(r.image, None, cfg)["volume"].size * 2  # float16
    return (time.perf_counter() - t0) / len(real), len(real), size / len(real) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/decipher_bench_beam")
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--scale-workers", type=int, nargs="+", default=[64, 256, 1024],
                   help="cores for the scaling statement (Dataflow n2-highmem-4 workers have 4 each)")
    p.add_argument("--one"), p.add_argument("--manifest"), p.add_argument("--out")
    args = p.parse_args(argv)
    if args.one:
        return _one(args.one, args.manifest, args.out, args.workers, args.spacing)

    from decipher_jax.data import corpus

    manifest = os.path.join(args.workdir, "raw", "manifest.csv")
    if not os.path.exists(manifest):
        manifest = corpus.build(os.path.join(args.workdir, "raw"), n_patients=args.patients, seed=0, matrix=40)
    rows, results = [], []
    for kind, workers, label in (("local", args.workers, f"local process pool, {args.workers} workers"),
                                 ("beam", args.workers, f"Beam DirectRunner, multi-processing, {args.workers} workers"),
                                 ("local", 1, "local, in-process"), ("beam", 1, "Beam DirectRunner, in-process")):
        r = _run(kind, manifest, os.path.join(args.workdir, kind), workers, args.spacing)
        results.append(r)
        rows.append([label, r["series"], f"{r['seconds']:.1f}", f"{r['seconds'] - r['write']:.1f}",
                     f"{r['write']:.1f}", f"{r['series'] / r['seconds']:.2f}", f"{r['peak_mib']:.0f}",
                     f"{r['bytes'] / 2**20:.0f}"])
    print(f"# prep of the embedded corpus ({args.patients} patients + the real templates) at {args.spacing} mm, "
          f"from an empty folder; {machine()}")
    print(table(["runner", "series", "seconds", "of which processing", "of which records", "series/s",
                 "peak RSS MiB", "records MiB"], rows))

    import tensorflow_datasets as tfds

    sec, n_real, mib = _real_series_cost(manifest, args.spacing)
    total = PAPER_SERIES * mib * 2**20
    fractions = (("train", 0.7), ("val", 0.15), ("test", 0.15))  # prep's default split
    shards = {s: tfds.core.utils.shard_utils.ShardConfig().get_number_shards(int(total * f), int(PAPER_SERIES * f))
              for s, f in fractions}
    print(f"\n# scaling: volume.process on the {n_real} real 1 mm brain templates at {args.spacing} mm: {sec:.2f} s "
          f"per series on one core, {mib:.1f} MiB stored per series (float16)")
    print(f"# {PAPER_SERIES:,} such series: {PAPER_SERIES * sec / 3600:.0f} core-hours; records "
          f"{total / 2**30:.0f} GiB, in TFDS's default shards: " + ", ".join(f"{s} {n}" for s, n in shards.items()))
    local = results[0]
    write_rate = local["bytes"] / local["write"]  # the local TFDS writer: one process
    print(f"# writing the records: the local pool's TFDS writer {write_rate / 2**20:.0f} MiB/s in one process "
          f"-> {total / write_rate / 3600:.1f} process-hours for {total / 2**30:.0f} GiB (Beam spreads it over the "
          "workers, after a shuffle of every record)")
    print(table(["cores", "hours, processing", "hours, processing + writing (at the local writer's rate per core)"],
                [[w, f"{PAPER_SERIES * sec / w / 3600:.2f}", f"{(PAPER_SERIES * sec + total / write_rate) / w / 3600:.2f}"]
                 for w in args.scale_workers]))


if __name__ == "__main__":
    main()
