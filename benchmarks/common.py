"""Shared benchmark utilities: peak RSS of a process tree, timing, tables, corpus setup."""

from __future__ import annotations

import os
import platform
import threading
import time

import psutil


class PeakRSS:
    """Samples the RSS of this process and its children (workers) every 50 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                rss = 0
            self.peak = max(self.peak, rss)
            time.sleep(0.05)

    def __enter__(self):
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.python_version()}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def random_batch(spec: dict, rng):
    """Host arrays for a ``batch_spec`` ({name: (shape, dtype)}): uniform [0, 1) values, and
    booleans (masks) True with probability 0.3."""
    import numpy as np

    return {k: (rng.random(shape) < 0.3 if np.dtype(dt) == np.bool_ else rng.random(shape)).astype(dt)
            for k, (shape, dt) in spec.items()}


def prepared_corpus(workdir: str, n_patients: int, spacing: float) -> tuple[str, str]:
    """(manifest, prep dir) of the embedded corpus, built once per workdir."""
    from decipher_jax import env

    env.setup()  # absl flags parsed (grain)
    from data_prep import prep, volume
    from decipher_jax.data import corpus

    manifest = os.path.join(workdir, "raw", "manifest.csv")
    if not os.path.exists(manifest):
        manifest = corpus.build(os.path.join(workdir, "raw"), n_patients=n_patients, seed=0, matrix=40)
    out = os.path.join(workdir, f"prep_{spacing:g}")
    prep.run(manifest, out, prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(spacing,) * 3)), progress=False)
    return manifest, out
