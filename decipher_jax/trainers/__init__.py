"""The trainers: each module has ``setup(cfg, mesh) -> common.Setup``, ``train(cfg, workdir)``
(the shared :func:`decipher_jax.trainers.common.train` over its setup) and
``summary(cfg, metrics, seconds)`` (one line of prose for a pipeline's summary)."""

import importlib

# A config file's name -> its trainer (a config may also name one: ``config.trainer``).
TRAINERS = {"vision_ssl.py": "decipher_jax.trainers.vision_ssl", "text_mlm.py": "decipher_jax.trainers.text_mlm",
            "clip_align.py": "decipher_jax.trainers.clip_align", "finetune.py": "decipher_jax.trainers.finetune",
            "caption.py": "decipher_jax.trainers.caption",
            "multiparam.py": "decipher_jax.trainers.multiparam"}


def module_for(config_spec: str, cfg):
    """The trainer module of ``path/to/config.py[:arg]`` (or of ``cfg.trainer``)."""
    import os

    name = os.path.basename(config_spec.split(":")[0])
    if "trainer" not in cfg and name not in TRAINERS:
        raise ValueError(f"no trainer for config {name}; set config.trainer to a module with train(config, workdir)")
    return importlib.import_module(cfg.get("trainer", TRAINERS.get(name)))
