"""Frozen ViT features of a prepared split: CLS, mean- and max-pooled patch tokens and selected
intermediate layers, extracted in sharded batches and streamed to disk chunk by chunk.

    feats = extract(model, params, source, mesh, size=(32, 32, 32), out_dir="W/features/test")
    feats = load("W/features/test")        # {"cls": (N, D), "mean": (N, D), "max": (N, D), "layer3_mean": ..., metadata}
    x = combined(feats, "mean+max")        # (N, 2D): named vectors side by side

A chunk file is written atomically every ``chunk_batches`` batches, so a long extraction keeps
little in memory and an interrupted one leaves only complete chunks. Volumes are resized
whole to the encoder's grid (the training crop size), or, with ``window=`` (the crop size),
kept at their prepared spacing and tiled by overlapping windows (MONAI's sliding-window scan,
zero-padded where a side is shorter): each window is encoded and a series' features are the
mean over its windows. The windows of one series are spread over the mesh's batch axes (and
over the processes), so every host steps in lockstep whatever the volume's size.

    feats = extract(model, params, source, mesh, size=(32, 32, 32), window=(32, 32, 32), overlap=0.5)
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


def combined(feats: dict, feature: str) -> np.ndarray:
    """The feature vector ``feature`` of a split's features: one name (``"mean"``), or names
    joined by ``+`` (``"mean+max"``), concatenated in that order."""
    names = feature.split("+")
    missing = [n for n in names if n not in feats]
    if missing:
        raise KeyError(f"feature {feature!r}: no {missing} among {sorted(k for k in feats if not isinstance(feats[k][0], str))}")
    if len(names) == 1:
        return feats[names[0]]
    return np.concatenate([np.asarray(feats[n], np.float32) for n in names], axis=-1)


@functools.lru_cache(maxsize=8)
def _encoder(model, layers: tuple[int, ...]):
    def f(params, batch):
        out = model(params)(batch["image"], collect=layers)
        res = {"cls": out["cls"].astype(jnp.float32), "mean": out["patch"].mean(1).astype(jnp.float32),
               "max": out["patch"].max(1).astype(jnp.float32)}
        for i in layers:
            res[f"layer{i}_mean"] = out["layers"][i].mean(1).astype(jnp.float32)
        return res

    return jax.jit(f)


def _series_windows(source, window, overlap: float, batch_size: int):
    """Per series: ``(meta, host batches of its windows)``; windows padded to whole global
    batches, each process supplying its rows of each."""
    from decipher_jax.eval import seghead

    pi, pc = jax.process_index(), jax.process_count()
    per = batch_size // pc
    decode = T.Decode()
    for i in range(len(source)):
        ex = decode.map(source[i])
        vol = seghead.pad_to_window(np.asarray(ex["image"], np.float32)[None], window)[0]
        corners = seghead.window_corners(vol.shape[:3], window, overlap)
        wins = np.stack([vol[x : x + window[0], y : y + window[1], z : z + window[2]] for x, y, z in corners])
        n = len(wins)
        total = -(-n // batch_size) * batch_size
        wins = np.concatenate([wins, np.repeat(wins[:1], total - n, 0)])
        batches = []
        for b in range(0, total, batch_size):
            lo = b + pi * per
            batches.append(({"image": wins[lo : lo + per]}, int(np.clip(n - lo, 0, per))))
        yield {k: v for k, v in ex.items() if k in embed.META}, batches


def _extract_windows(fn, source, mesh, window, overlap, batch_size):
    rows: dict[str, list] = {}
    for meta, batches in _series_windows(source, tuple(window), overlap, batch_size):
        out = embed.apply(fn, iter(batches), mesh, ["image"], meta_keys=())
        for k, v in out.items():
            rows.setdefault(k, []).append(v.mean(0))  # mean over the series' windows
        for k, v in meta.items():
            rows.setdefault(k, []).append(v)
    return {k: np.stack(v) if not isinstance(v[0], str) else np.asarray(v) for k, v in rows.items()}


def extract(model, params, source, mesh, *, size, out_dir: str | None = None, layers=(), batch_size: int = 16,
            chunk_batches: int = 64, window=None, overlap: float = 0.5) -> dict:
    """Features of every series in ``source`` (``model``: a :class:`decipher_jax.state.Model` of a ViT3D)."""
    fn = functools.partial(_encoder(model, tuple(layers)), params)
    if window is not None:
        feats = _extract_windows(fn, source, mesh, window, overlap, embed.round_batch(batch_size, mesh))
        if out_dir is not None:
            _clear(out_dir)
            _write_chunk(out_dir, 0, feats)
        return feats
    batches = embed.scan_split(source, [T.Decode(), T.Resize(tuple(size))], embed.round_batch(batch_size, mesh))
    if out_dir is None:
        return embed.apply(fn, batches, mesh, ["image"])
    _clear(out_dir)
    part, buf = 0, []

    def flush():
        nonlocal part, buf
        if buf:
            _write_chunk(out_dir, part, embed.apply(fn, iter(buf), mesh, ["image"]))
            part, buf = part + 1, []

    for b in batches:
        buf.append(b)
        if len(buf) == chunk_batches:
            flush()
    flush()
    return load(out_dir)


def _clear(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "part-*.npz")):
        os.remove(old)


def _write_chunk(out_dir: str, part: int, chunk: dict) -> None:
    """Atomically: an interrupted extraction leaves only complete chunks."""
    tmp = os.path.join(out_dir, f".part-{part:05d}.npz")
    np.savez(tmp, **chunk)
    os.replace(tmp, os.path.join(out_dir, f"part-{part:05d}.npz"))


def load(out_dir: str) -> dict:
    parts = sorted(glob.glob(os.path.join(out_dir, "part-*.npz")))
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no feature chunks (part-*.npz)")
    loaded = [dict(np.load(p, allow_pickle=False)) for p in parts]
    return {k: np.concatenate([c[k] for c in loaded]) for k in loaded[0]}
