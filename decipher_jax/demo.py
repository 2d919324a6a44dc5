"""The demo: ``experiments/configs/demo.py`` run by :mod:`decipher_jax.pipeline`."""

from __future__ import annotations


def config(seed: int = 0, devices: int | None = None, full: bool = False, **stages):
    """The demo's pipeline config; ``stages`` update single stages, e.g. ``data={"patients": 250}``;
    ``full``: with the multi-parametric stages (``demo.py:full``)."""
    from decipher_jax import pipeline
    from decipher_jax.trainers import common

    cfg = common.load_config(pipeline.config_path("demo.py:full" if full else "demo.py"))
    cfg.seed = seed
    if devices is not None:  # else the config's own count
        cfg.devices = devices
    for name, fields in stages.items():
        cfg.stages[name].update(fields)
    return cfg


def run(workdir: str, devices: int | None = None, seed: int = 0, full: bool = False, **stages) -> int:
    from decipher_jax import pipeline

    return pipeline.run(config(seed, devices, full, **stages), workdir)
