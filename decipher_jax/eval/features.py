"""Frozen ViT features of a prepared split: CLS, mean-pooled patch tokens and selected
intermediate layers, extracted in sharded batches and streamed to disk chunk by chunk.

    feats = extract(model, params, source, mesh, size=(32, 32, 32), out_dir="W/features/test")
    feats = load("W/features/test")        # {"cls": (N, D), "mean": (N, D), "layer3_mean": ..., metadata}

A chunk file is written atomically every ``chunk_batches`` batches, so a long extraction keeps
little in memory and an interrupted one leaves only complete chunks. Volumes are resized
whole to the encoder's grid (the training crop size).
"""

from __future__ import annotations

import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np

from decipher_jax.data import transforms as T
from decipher_jax.eval import embed


@functools.lru_cache(maxsize=8)
def _encoder(model, layers: tuple[int, ...]):
    def f(params, batch):
        out = model(params)(batch["image"], collect=layers)
        res = {"cls": out["cls"].astype(jnp.float32), "mean": out["patch"].mean(1).astype(jnp.float32)}
        for i in layers:
            res[f"layer{i}_mean"] = out["layers"][i].mean(1).astype(jnp.float32)
        return res

    return jax.jit(f)


def extract(model, params, source, mesh, *, size, out_dir: str | None = None, layers=(), batch_size: int = 16,
            chunk_batches: int = 64) -> dict:
    """Features of every series in ``source`` (``model``: a ``common.Model`` of a ViT3D)."""
    fn = functools.partial(_encoder(model, tuple(layers)), params)
    batches = embed.scan_split(source, [T.Decode(), T.Resize(tuple(size))], embed.round_batch(batch_size, mesh))
    if out_dir is None:
        return embed.apply(fn, batches, mesh, ["image"])
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "part-*.npz")):
        os.remove(old)
    part, buf = 0, []

    def flush():
        nonlocal part, buf
        if buf:
            chunk = embed.apply(fn, iter(buf), mesh, ["image"])
            tmp = os.path.join(out_dir, f".part-{part:05d}.npz")
            np.savez(tmp, **chunk)
            os.replace(tmp, os.path.join(out_dir, f"part-{part:05d}.npz"))
            part, buf = part + 1, []

    for b in batches:
        buf.append(b)
        if len(buf) == chunk_batches:
            flush()
    flush()
    return load(out_dir)


def load(out_dir: str) -> dict:
    parts = sorted(glob.glob(os.path.join(out_dir, "part-*.npz")))
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no feature chunks (part-*.npz)")
    loaded = [dict(np.load(p, allow_pickle=False)) for p in parts]
    return {k: np.concatenate([c[k] for c in loaded]) for k in loaded[0]}
