"""Shared test utilities."""

import gzip
import os

import jax
import nibabel as nib
import numpy as np
from flax import nnx


def randomise(model, seed: int = 0, scale: float = 0.05):
    """Replaces every parameter by random values (LayerNorm scales near 1), in place.

    Fresh inits have zero biases and unit norms, which would hide transposition or
    mis-mapping bugs in weight converters.
    """
    r = np.random.default_rng(seed)
    state = nnx.state(model)

    def f(path, var):
        v = var.get_value()
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        x = r.standard_normal(v.shape).astype(np.float32) * scale
        if "scale" in name.split("/")[-1]:
            x = 1.0 + x
        return var.replace(jax.numpy.asarray(x, v.dtype))

    nnx.update(model, jax.tree_util.tree_map_with_path(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return model


def randomise_torch(module, seed: int = 0, scale: float = 0.05):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1.0 + noise if (name.endswith("weight") and p.ndim == 1) else noise)
    return module


MODELS_OF = {"vision_ssl": {"vit"}, "text_mlm": {"bert"}, "clip_align": {"vit", "bert", "towers"}, "finetune": {"vit"}}
TOKENIZED = {"text_mlm", "clip_align"}  # kinds with a text tower, whose tokenizer the spec names


def assert_run_spec(workdir: str, kind: str, starts: int = 1) -> dict:
    """``run_spec.json`` in the one schema every trainer writes: the same fields, the model
    configs of its kind (null for the others), a history entry per start."""
    import dataclasses
    import json
    import os

    from decipher_jax import runspec

    with open(os.path.join(workdir, "run_spec.json")) as f:
        d = json.load(f)
    assert set(d) == {f.name for f in dataclasses.fields(runspec.RunSpec)}, sorted(d)
    assert d["schema"] == runspec.SCHEMA and d["kind"] == kind
    assert {m for m in runspec.MODELS if d[m] is not None} == MODELS_OF[kind]
    assert isinstance(d["config"], dict) and d["config"]["steps" if "steps" in d["config"] else "ssl"]
    assert bool(d["tokenizer"]) == (kind in TOKENIZED)
    assert d["preprocessing"] and d["preprocessing"]["orientation"].startswith("RAS")
    assert len(d["history"]) == starts and d["history"][0]["step"] == 0
    return d


def bad_rows(d, good):
    """One row per kind of bad input, each otherwise like a good row."""
    base = dict(good)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = {}

    def row(name, **kw):
        rows[name] = {**base, "series_id": f"bad_{name}", "label": "", **kw}

    trunc = os.path.join(d, "truncated.nii.gz")
    with open(good["image"], "rb") as f:
        blob = f.read()
    with open(trunc, "wb") as f:
        f.write(blob[: len(blob) // 2])
    row("truncated", image=trunc)
    txt = os.path.join(d, "not_nifti.nii.gz")
    with gzip.open(txt, "wt") as f:
        f.write("this is not an image")
    row("not_nifti", image=txt)
    row("twod", image=save_plain(d, "twod.nii.gz", np.ones((20, 20), np.float32), aff))
    row("nan", image=save_plain(d, "nan.nii.gz", np.full((20, 20, 20), np.nan, np.float32), aff))
    empty = os.path.join(d, "empty.nii.gz")
    open(empty, "wb").close()
    row("zero_size", image=empty)
    row("label_grid", label=save_plain(d, "lab_other.nii.gz", np.zeros((10, 10, 10), np.uint8), aff))
    row("missing", image=os.path.join(d, "does_not_exist.nii.gz"))
    er = os.path.join(d, "empty_report.txt")
    open(er, "w").close()
    row("empty_report", report_file=er)
    return rows


def save_plain(d, name, data, aff):
    p = os.path.join(d, name)
    nib.save(nib.Nifti1Image(data, aff), p)
    return p
