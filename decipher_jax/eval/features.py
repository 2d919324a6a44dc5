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

With a bank of normal series' patch tokens (:func:`normal_bank`, from the training split), each
series also gets ``"anomaly"``: its patch tokens pooled with weights softmax(d / tau), d each
patch's cosine distance to the nearest normal patch of its body region and sequence within one
grid step (the visual anomaly map of ``eval.localisation``) and tau the bank's own typical spread
of d. A finding occupies a few patches; the mean and max pools are dominated by the anatomy
every series shares, where this pool looks at the patches that differ from normal studies
(BENCHMARKS.md, "Finding probes on the patches that differ from normal").

    bank = normal_bank(model, params, train_source, mesh, size=(32, 32, 32), patch_size=(8, 8, 8))
    feats = extract(model, params, test_source, mesh, size=(32, 32, 32), bank=bank)   # + "anomaly"
"""

from __future__ import annotations

import dataclasses
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
def _encoder(model, layers: tuple[int, ...], patches: bool = False):
    def f(params, batch):
        out = model(params)(batch["image"], collect=layers)
        res = {"cls": out["cls"].astype(jnp.float32), "mean": out["patch"].mean(1).astype(jnp.float32),
               "max": out["patch"].max(1).astype(jnp.float32)}
        for i in layers:
            res[f"layer{i}_mean"] = out["layers"][i].mean(1).astype(jnp.float32)
        if patches:
            res["patch"] = out["patch"].astype(jnp.float32)
        return res

    return jax.jit(f)


@dataclasses.dataclass(frozen=True)
class NormalBank:
    """Patch tokens ``(K, N, D)`` of K series without findings (at most ``per_group`` of each body
    region and sequence), their groups, series and patient ids, the patch grid, the neighbourhood
    ``reach`` and ``tau``, the softmax temperature of the ``"anomaly"`` pool: the mean over the
    bank's series of the spread (standard deviation over patches) of their distances to the rest
    of the bank, so the pool is as sharp for every encoder whatever the scale of its distances.

    A query series is never compared with its own patient's bank series (nor with itself): a
    training series would otherwise find the same anatomy in another of its patient's studies,
    which no test patient can (the splits are patient-disjoint)."""

    tokens: np.ndarray
    groups: np.ndarray
    series_id: np.ndarray
    grid: tuple[int, ...]
    tau: float
    reach: int = 1
    patient_id: np.ndarray | None = None  # (K,) str; "" or None: unknown (then the series alone is excluded)

    @classmethod
    def build(cls, tokens, groups, series_id, grid, reach: int = 1, patient_id=None) -> NormalBank:
        """A bank of these tokens, its ``tau`` measured on them (each series against the other
        patients')."""
        pid = None if patient_id is None else np.asarray(patient_id).astype(str)
        bank = cls(np.asarray(tokens, np.float32), np.asarray(groups).astype(str), np.asarray(series_id).astype(str),
                   tuple(int(g) for g in grid), 1.0, reach, pid)
        tau = float(bank.distances(bank.tokens, bank.groups, bank.series_id, pid).std(1).mean())
        return dataclasses.replace(bank, tau=max(tau, 1e-6))

    def exclusion(self, series_id, patient_id=None) -> np.ndarray:
        """``(M, K)``: the bank rows each query may not use: its own series, and its patient's
        (unless the bank holds that patient's series only: then its own series alone)."""
        sid = np.asarray(series_id).astype(str)
        own = sid[:, None] == self.series_id[None]
        out = own.copy()
        if patient_id is not None and self.patient_id is not None:
            pid = np.asarray(patient_id).astype(str)
            out |= (pid[:, None] == self.patient_id[None]) & (pid[:, None] != "")
            out = np.where(out.all(1, keepdims=True), own, out)
        return out

    def distances(self, tokens, groups, series_id, patient_id=None):
        """``(M, N)`` distances to the nearest normal patch, leaving out the query's own series and
        patient (:meth:`exclusion`)."""
        from decipher_jax.eval import localisation

        dist, _ = localisation.nearest_normal(tokens, groups, self.tokens, self.groups, self.grid, self.reach,
                                              self.exclusion(series_id, patient_id))
        return dist


def _need_meta(rows: dict, what: str) -> None:
    missing = [k for k in ("series_id", "body_region", "sequence") if k not in rows]
    if missing:  # embed.apply keeps string metadata only in a single process
        raise ValueError(f"{what}: the rows lack {missing}; the anomaly pool needs each row's metadata, which the "
                         "frozen-encoder pass keeps in a single process only")


def normal_bank(model, params, source, mesh, *, size, patch_size, per_group: int = 64, reach: int = 1,
                batch_size: int = 16, rows=None) -> NormalBank:
    """The bank of :func:`extract`'s ``"anomaly"`` pool from ``source`` (the training split): its
    series without findings (``rows``, else ``eval.localisation.normal_index(source, per_group)``:
    a caller building banks for several encoders reads the split's metadata once)."""
    from decipher_jax.data import pipelines as P
    from decipher_jax.eval import localisation

    idx = localisation.normal_index(source, per_group) if rows is None else list(rows)
    if len(idx) < 2:
        raise ValueError(f"normal bank: {len(idx)} series without findings in the split, at least 2 are needed")
    fn = functools.partial(_encoder(model, (), True), params)
    out = embed.apply(fn, embed.scan_split(P.Subset(source, idx), [T.Decode(), T.Resize(tuple(size))],
                                           embed.round_batch(batch_size, mesh)), mesh, ["image"])
    grid = tuple(int(s) // int(p) for s, p in zip(size, patch_size))
    if out["patch"].shape[1] != int(np.prod(grid)):
        raise ValueError(f"normal bank: {out['patch'].shape[1]} patch tokens, the grid {grid} has {int(np.prod(grid))}")
    _need_meta(out, "normal bank")
    return NormalBank.build(out["patch"], localisation.groups_of(out), out["series_id"], grid, reach,
                            out.get("patient_id"))


def with_anomaly(chunk: dict, bank: NormalBank) -> dict:
    """``chunk`` with its ``"patch"`` tokens replaced by the ``"anomaly"`` pool (see the module)."""
    from decipher_jax.eval import localisation

    chunk = dict(chunk)
    tok = chunk.pop("patch")
    _need_meta(chunk, "anomaly pool")
    d = bank.distances(tok, localisation.groups_of(chunk), chunk["series_id"], chunk.get("patient_id"))
    w = np.exp((d - d.max(1, keepdims=True)) / bank.tau)
    chunk["anomaly"] = np.einsum("mn,mnd->md", w / w.sum(1, keepdims=True), tok).astype(np.float32)
    return chunk


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
            chunk_batches: int = 64, window=None, overlap: float = 0.5, bank: NormalBank | None = None) -> dict:
    """Features of every series in ``source`` (``model``: a :class:`decipher_jax.state.Model` of a
    ViT3D); with ``bank``, also the ``"anomaly"`` pool (a chunk's patch tokens are held on the
    host until it is written: lower ``chunk_batches`` for a large model; without ``out_dir`` the
    whole split's are, so pass one for a large split)."""
    fn = functools.partial(_encoder(model, tuple(layers), bank is not None), params)
    post = (lambda c: with_anomaly(c, bank)) if bank is not None else (lambda c: c)  # noqa: E731
    if window is not None:
        if bank is not None:
            raise ValueError("features: the anomaly pool (bank=) is for whole-volume features, not sliding windows")
        feats = _extract_windows(fn, source, mesh, window, overlap, embed.round_batch(batch_size, mesh))
        if out_dir is not None:
            _clear(out_dir)
            _write_chunk(out_dir, 0, feats)
        return feats
    batches = embed.scan_split(source, [T.Decode(), T.Resize(tuple(size))], embed.round_batch(batch_size, mesh))
    if out_dir is None:
        return post(embed.apply(fn, batches, mesh, ["image"]))
    _clear(out_dir)
    part, buf = 0, []

    def flush():
        nonlocal part, buf
        if buf:
            _write_chunk(out_dir, part, post(embed.apply(fn, iter(buf), mesh, ["image"])))
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
