"""Segmentation tasks on frozen encoders: heads of :mod:`decipher_jax.eval.seghead` trained on
patch tokens, several encoders compared on the same voxels.

- ``brain_tissue``: background / grey matter / white matter on a real packaged volume (nilearn's
  MNI152 template with its GM/WM maps, from ``decipher prep`` like any series). One volume, so
  the split is by hemisphere: heads learn on random windows with a loss mask over the left
  hemisphere and are scored on the right one, predicted by sliding windows over the whole
  volume (it is larger than the encoder's crop). When Colin27 + AAL is present, the same heads
  are scored on it as a second subject (classes: background / AAL grey matter / other brain).
- ``lesions``: background / lesion on the synthetic corpus's masks (every labelled series but
  those of role ``template``); every series resized whole to the encoder's grid; heads learn on
  the train split, the lr is chosen on the val split, scores are on the test split's series that
  have a lesion.

For every (task, encoder, head kind) the lr x seed grid trains in one vmapped call; the lr with
the best validation Dice is kept and Dice / HD95 are averaged over its seeds.

    res = run(encoders, "outputs/demo/data/prep", out="outputs/demo/segmentation")
"""

from __future__ import annotations

import functools
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from data_prep.schema import TEMPLATE
from decipher_jax.data import pipelines as P
from decipher_jax.data import transforms as T
from decipher_jax.eval import embed, segmentation
from decipher_jax.eval import seghead as S

KINDS = ("linear", "decoder", "unetr")
TISSUE = ("background", "grey matter", "white matter")


@functools.lru_cache(maxsize=8)
def _tokens_fn(model, layers: tuple[int, ...]):
    def f(params, batch):
        vit = model(params)
        out = vit(batch["image"], collect=layers)
        grid = vit.token_grid(batch["image"].shape[1:4])
        n = vit.config.num_prefix
        toks = [out["patch"]] + [out["layers"][i][:, n:] for i in layers]
        t = jnp.concatenate(toks, axis=-1).astype(jnp.float32)
        return {"tokens": t.reshape(t.shape[0], *grid, t.shape[-1])}

    return jax.jit(f)


def encode(model, params, volumes: np.ndarray, mesh, layers=(), batch_size: int = 16) -> np.ndarray:
    """Patch tokens (B, gd, gh, gw, D * (1 + len(layers))) of volumes (B, X, Y, Z, 1), sharded."""
    fn = functools.partial(_tokens_fn(model, tuple(layers)), params)
    bs = embed.round_batch(min(batch_size, len(volumes)), mesh)

    def batches():
        for i in range(0, len(volumes), bs):
            chunk = volumes[i : i + bs]
            n = len(chunk)
            if n < bs:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], bs - n, 0)])
            yield {"image": np.asarray(chunk, np.float32)}, n

    return embed.apply(fn, batches(), mesh, ["image"], meta_keys=())["tokens"]


def find_series(prep_dir: str, series_id: str, splits=("train", "val", "test")) -> dict | None:
    """The decoded record (image, label, spacing) of one series, from whichever split holds it."""
    for split in splits:
        try:
            src = P.data_source(prep_dir, split)
        except Exception:  # noqa: BLE001 - a split may not exist
            continue
        for i in range(len(src)):
            ex = src[i]
            sid = ex["series_id"]
            if (sid.decode() if isinstance(sid, bytes) else str(sid)) == series_id:
                out = T.Decode(keep_label=True).map(ex)
                out["spacing"] = np.asarray(ex["spacing"], np.float32)
                return out
    return None


def _crop(vol, corner, window):
    return vol[tuple(slice(c, c + w) for c, w in zip(corner, window))]


def check_kinds(kinds, what: str = "lesion head kinds") -> tuple[str, ...]:
    """``kinds`` as a tuple of known head kinds (at least one), else a ValueError naming ``what``."""
    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"{what} {kinds}: choose from {KINDS}")
    return kinds


def _fit(tokens, labels, images, weights, classes, grid, kinds=KINDS):
    """{kind: params stacked over the (lr, seed) grid} for each head kind of ``kinds``."""
    out = {}
    for kind in kinds:
        params, _ = S.train_heads(tokens, labels, kind=kind, classes=classes, images=images, weights=weights, **grid)
        out[kind] = params
    return out


@functools.partial(jax.jit, static_argnums=(0,))
def _predict(kind, params, tokens, images):
    """Arg-max labels (B, X, Y, Z) of a head on windows (B, X, Y, Z, 1)."""
    return jnp.argmax(S.apply_head(kind, params, tokens, images.shape[1:4], images), -1)


class _Volume:
    """A volume prepared for sliding-window inference: padded, its window corners (overlap 0.5)
    and the frozen tokens of every window, computed once per encoder."""

    def __init__(self, image, window, overlap=0.5):
        self.shape = image.shape[:3]
        self.window = tuple(window)
        self.padded = S.pad_to_window(image[None].astype(np.float32), self.window)[0]
        self.corners = S.window_corners(self.padded.shape[:3], self.window, overlap)
        self.windows = np.stack([_crop(self.padded, c, self.window) for c in self.corners])

    def predict(self, kind, params, tokens, classes: int) -> np.ndarray:
        """(X, Y, Z) labels: per-window one-hot votes averaged over the overlaps (MONAI's
        ``sliding_window_inference`` with constant weights), then arg-max."""
        labels = np.asarray(_predict(kind, params, jnp.asarray(tokens), jnp.asarray(self.windows)))
        votes = [np.eye(classes, dtype=np.float32)[lab][None] for lab in labels]
        out = S.stitch(votes, self.corners, self.padded.shape[:3], self.window)[0]
        return out[: self.shape[0], : self.shape[1], : self.shape[2]].argmax(-1)


def _scores(pred, gt, classes, spacing=None, region=None):
    """Dice and HD95 (mm) per class, on the voxels of ``region`` (a slice tuple) when given."""
    if region is not None:
        pred, gt = pred[(slice(None),) + region], gt[(slice(None),) + region]
    p, g = segmentation.one_hot(pred, classes), segmentation.one_hot(gt, classes)
    d = np.asarray(segmentation.dice(p, g))
    h = segmentation.hd95(np.asarray(p), np.asarray(g), spacing=spacing)
    return d, h


def brain_tissue(encoders: dict, prep_dir: str, mesh, *, window, layers=(), lrs=(3e-3, 1e-2), seeds=(0, 1),
                 steps: int = 300, hidden: int = 32, batch: int = 8, skip_convs: int = 1, n_random: int = 48, seed: int = 0,
                 series_id: str = "MNI152_T1", transfer_id: str = "COLIN27_T1") -> dict:
    """GM/WM on the real MNI152 volume, split by hemisphere; ``{}`` when the volume is absent."""
    grid = {"lrs": tuple(lrs), "seeds": tuple(seeds), "steps": steps, "hidden": hidden, "batch": batch,
            "skip_convs": skip_convs}
    rec = find_series(prep_dir, series_id)
    if rec is None:
        return {}
    window = tuple(window)
    img = rec["image"].astype(np.float32)
    gt = rec["label"].astype(np.int32)
    vol = _Volume(img, window)
    half = img.shape[0] // 2  # RAS: x < half is the left hemisphere
    rng = np.random.default_rng(seed)
    corners = vol.corners + [tuple(int(rng.integers(0, s - w + 1)) for s, w in zip(vol.padded.shape[:3], window))
                             for _ in range(n_random)]
    lab = S.pad_to_window(gt[None, ..., None], window)[0, ..., 0]
    train_w = np.broadcast_to(np.arange(lab.shape[0])[:, None, None] < half, lab.shape).astype(np.float32)
    win_img = np.stack([_crop(vol.padded, c, window) for c in corners])
    win_lab = np.stack([_crop(lab, c, window) for c in corners])
    win_w = np.stack([_crop(train_w, c, window) for c in corners])
    transfer = find_series(prep_dir, transfer_id)
    tvol = _Volume(transfer["image"].astype(np.float32), window) if transfer is not None else None
    res = {"series": series_id, "shape": list(img.shape[:3]), "spacing_mm": rec["spacing"].tolist(),
           "window": list(window), "train_windows": len(corners), "eval_windows": len(vol.corners),
           "classes": list(TISSUE), "transfer": transfer_id if transfer is not None else None, "rows": []}
    left, right = (slice(0, half), slice(None), slice(None)), (slice(half, None), slice(None), slice(None))
    examples = {}
    for name, (model, params) in encoders.items():
        toks = encode(model, params, win_img, mesh, layers)
        eval_toks = toks[: len(vol.corners)]  # the sliding-window corners come first
        t_toks = encode(model, params, tvol.windows, mesh, layers) if tvol is not None else None
        heads = _fit(toks, win_lab, win_img, win_w, 3, grid)
        for kind, hp in heads.items():
            per_head = []
            for i in range(len(lrs) * len(seeds)):
                p = jax.tree.map(lambda a: a[i], hp)  # noqa: B023
                pred = vol.predict(kind, p, eval_toks, 3)[None]
                d, h = _scores(pred, gt[None], 3, rec["spacing"], right)
                dl, _ = _scores(pred, gt[None], 3, None, left)
                ph = {"dice": d[0], "hd95": h[0], "train_dice": dl[0], "pred": pred[0]}
                if tvol is not None:
                    tp = tvol.predict(kind, p, t_toks, 3)
                    gm = (transfer["label"] > 0).astype(np.int32)  # AAL regions are grey matter
                    ph["transfer"] = float(np.asarray(segmentation.dice(segmentation.one_hot((tp == 1)[None].astype(np.int32), 2),
                                                                        segmentation.one_hot(gm[None], 2)))[0, 1])
                per_head.append(ph)
            best = _best(per_head, lrs, seeds, key="train_dice")
            row = _row("brain_tissue", name, kind, best, per_head, lrs, seeds, TISSUE)
            if tvol is not None:
                row["colin27_grey_matter_dice"] = float(np.mean([per_head[j]["transfer"] for j in best["idx"]]))
            res["rows"].append(row)
            examples[(name, kind)] = per_head[best["idx"][0]]["pred"]
    res["example"] = {"image": img[..., 0], "label": gt, "half": half, "preds": examples}
    return res


def _nanmean(x, axis=None):
    """``np.nanmean`` without the all-NaN warning (a class absent everywhere stays NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def _best(per_head, lrs, seeds, key):
    """The lr whose seeds have the best mean foreground ``key`` Dice; its head indices."""
    ns = len(seeds)
    means = [_nanmean([_nanmean(per_head[li * ns + s][key][1:]) for s in range(ns)]) for li in range(len(lrs))]
    li = int(np.nanargmax(means)) if not np.all(np.isnan(means)) else 0
    return {"lr": float(lrs[li]), "idx": [li * ns + s for s in range(ns)]}


def _row(task, encoder, kind, best, per_head, lrs, seeds, classes):
    d = np.stack([per_head[j]["dice"] for j in best["idx"]])
    h = np.stack([per_head[j]["hd95"] for j in best["idx"]])
    row = {"task": task, "encoder": encoder, "head": kind, "lr": best["lr"], "seeds": len(seeds)}
    for c, name in enumerate(classes):
        if c == 0:
            continue
        row[f"dice_{name.replace(' ', '_')}"] = float(_nanmean(d[:, c]))
        row[f"hd95_{name.replace(' ', '_')}_mm"] = float(_nanmean(h[:, c])) if np.isfinite(h[:, c]).any() else None
    row["dice_mean_fg"] = float(_nanmean(d[:, 1:]))
    row["dice_std_seeds"] = float(np.std(_nanmean(d[:, 1:], axis=1)))
    return row


def _split_arrays(prep_dir, split, size, lesion_only: bool):
    from decipher_jax.eval import localisation

    decode, resize = T.Decode(keep_label=True), T.Resize(tuple(size))
    src = P.data_source(prep_dir, split)
    imgs, labs, ids, spacing = [], [], [], []
    meta = {"series_id": [], "patient_id": [], "group": []}
    for i in range(len(src)):
        ex = src[i]
        if not bool(ex.get("has_label", True)):
            continue
        d = decode.map(ex)
        if "role" not in d:  # without it a template's tissue classes would count as lesions
            raise ValueError(f"{prep_dir}: records of format < 1.3 have no role field; rerun `decipher prep` "
                             "(it reuses its cache)")
        if d["role"] == TEMPLATE:
            continue  # tissue classes, not lesions
        d = resize.map(d)
        lab = (np.asarray(d["label"]) > 0).astype(np.int32)
        lab = lab[..., 0] if lab.ndim == 4 else lab
        if lesion_only and not lab.any():
            continue
        imgs.append(d["image"].astype(np.float32))
        labs.append(lab)
        ids.append(d["series_id"])
        meta["series_id"].append(str(d["series_id"]))
        meta["patient_id"].append(str(d.get("patient_id", "")))
        meta["group"].append(localisation.group_of(d.get("body_region", ""), d.get("sequence", "")))
        spacing.append(np.asarray(ex["spacing"]) * np.asarray(ex["volume"].shape) / np.asarray(size))
    return np.stack(imgs), np.stack(labs), ids, np.stack(spacing), meta


def normal_volumes(prep_dir: str, size, per_group: int = 64) -> tuple[np.ndarray, dict]:
    """``(volumes (K, *size, 1), {"series_id", "patient_id", "group"})``: the training split's
    series without findings (:func:`decipher_jax.eval.localisation.normal_index`), resized
    whole: the lesion heads' bank."""
    from decipher_jax.eval import localisation

    src = P.data_source(prep_dir, "train")
    idx = localisation.normal_index(src, per_group)
    decode, resize = T.Decode(), T.Resize(tuple(size))
    ex = [resize.map(decode.map(src[i])) for i in idx]
    meta = {"series_id": [str(e["series_id"]) for e in ex], "patient_id": [str(e.get("patient_id", "")) for e in ex],
            "group": [localisation.group_of(e["body_region"], e["sequence"]) for e in ex]}
    return (np.stack([e["image"].astype(np.float32) for e in ex]) if ex else np.zeros((0, *size, 1), np.float32)), meta


def with_distance(tokens: np.ndarray, bank, meta: dict) -> np.ndarray:
    """``tokens`` ``(B, *grid, C)`` with one more channel: each patch's cosine distance to the
    nearest patch of the ``bank`` (a :class:`decipher_jax.eval.features.NormalBank`) of its
    series' body region and sequence within one grid step, over ``bank.tau`` (the visual anomaly
    map, scaled alike for every encoder). ``meta``: the series' ``series_id``, ``patient_id``
    and ``group``. Distances read the first ``bank.tokens.shape[-1]`` channels (the last
    layer's tokens when intermediate layers follow)."""
    dim = bank.tokens.shape[-1]
    flat = tokens.reshape(len(tokens), -1, tokens.shape[-1])[..., :dim]
    d = bank.distances(flat, meta["group"], meta["series_id"], meta["patient_id"]) / bank.tau
    return np.concatenate([tokens, d.reshape(*tokens.shape[:-1], 1)], -1).astype(np.float32)


def lesions(encoders: dict, prep_dir: str, mesh, *, size, layers=(), lrs=(3e-3, 1e-2), seeds=(0, 1),
            steps: int = 300, hidden: int = 32, batch: int = 8, skip_convs: int = 1, kinds=KINDS,
            anomaly: bool = False) -> dict:
    """Lesion segmentation on the synthetic corpus (train -> val for the lr -> test), one row per
    (encoder, head kind of ``kinds``). ``anomaly``: the heads also read each patch's distance
    to the nearest patch of the training split's normal series (:func:`with_distance`), each
    encoder's own bank. On three demo draws it lifts the best head on frozen stage-2 tokens from
    0.17-0.27 to 0.26-0.40 Dice (BENCHMARKS.md, "Finding probes on the patches that differ from
    normal")."""
    kinds = check_kinds(kinds)
    grid = {"lrs": tuple(lrs), "seeds": tuple(seeds), "steps": steps, "hidden": hidden, "batch": batch,
            "skip_convs": skip_convs}
    size = tuple(size)
    tr_img, tr_lab, _, _, tr_meta = _split_arrays(prep_dir, "train", size, lesion_only=True)
    va_img, va_lab, _, _, va_meta = _split_arrays(prep_dir, "val", size, lesion_only=True)
    te_img, te_lab, te_ids, te_sp, te_meta = _split_arrays(prep_dir, "test", size, lesion_only=True)
    res = {"size": list(size), "n_train": len(tr_img), "n_val": len(va_img), "n_test": len(te_img),
           "lesion_fraction_test": float(te_lab.mean()), "rows": [],
           "heads": {"steps": steps, "batch": batch, "lrs": list(lrs), "seeds": list(seeds), "kinds": list(kinds),
                     "anomaly": bool(anomaly)}}
    if anomaly:
        bank_img, bank_meta = normal_volumes(prep_dir, size)
        if len(bank_img) < 2:
            raise ValueError(f"{prep_dir}: lesion heads with anomaly=True need 2 training series without findings, "
                             f"found {len(bank_img)}")
        res["heads"]["bank_series"] = len(bank_img)
    examples = {}
    for name, (model, params) in encoders.items():
        toks = {k: encode(model, params, v, mesh, layers) for k, v in (("tr", tr_img), ("va", va_img), ("te", te_img))}
        if anomaly:
            from decipher_jax.eval import features

            bt = encode(model, params, bank_img, mesh, ())
            bank = features.NormalBank.build(bt.reshape(len(bt), -1, bt.shape[-1]), bank_meta["group"],
                                             bank_meta["series_id"], bt.shape[1:4], patient_id=bank_meta["patient_id"])
            toks = {k: with_distance(v, bank, m) for (k, v), m in zip(toks.items(), (tr_meta, va_meta, te_meta))}
        heads = _fit(toks["tr"], tr_lab, tr_img, None, 2, grid, kinds)
        for kind, hp in heads.items():
            per_head = []
            for i in range(len(lrs) * len(seeds)):
                p = jax.tree.map(lambda a: a[i], hp)  # noqa: B023
                pv = np.asarray(_predict(kind, p, jnp.asarray(toks["va"]), jnp.asarray(va_img)))
                pt = np.asarray(_predict(kind, p, jnp.asarray(toks["te"]), jnp.asarray(te_img)))
                dv, _ = _scores(pv, va_lab, 2)
                d, h = _scores(pt, te_lab, 2, spacing=None)
                h_mm = np.array([segmentation.hd95(np.asarray(segmentation.one_hot(pt[j:j + 1], 2)),
                                                   np.asarray(segmentation.one_hot(te_lab[j:j + 1], 2)),
                                                   spacing=te_sp[j])[0] for j in range(len(pt))])
                per_head.append({"dice": _nanmean(d, 0), "hd95": _nanmean(h_mm, 0) if np.isfinite(h_mm).any()
                                 else np.full(2, np.nan), "val_dice": _nanmean(dv, 0), "pred": pt})
            best = _best(per_head, lrs, seeds, key="val_dice")
            res["rows"].append(_row("lesions", name, kind, best, per_head, lrs, seeds, ("background", "lesion")))
            examples[(name, kind)] = per_head[best["idx"][0]]["pred"]
    res["example"] = {"image": te_img[..., 0], "label": te_lab, "series_id": te_ids, "preds": examples}
    return res


def run(encoders: dict, prep_dir: str, mesh, *, size, out: str | None = None, layers=(), n_examples: int = 3,
        lesion: dict | None = None, **grid) -> dict:
    """Both tasks; writes ``segmentation.json`` (rows) and ``examples.npz`` (overlay slices).
    ``grid``: lrs, seeds, steps, hidden, batch, skip_convs of the heads; ``lesion``: any of those,
    ``kinds`` and ``anomaly`` (:func:`lesions`) set for the lesion task alone (a longer schedule
    there costs brain tissue nothing)."""
    lesion_grid = {**grid, **(lesion or {})}
    res = {"brain_tissue": brain_tissue(encoders, prep_dir, mesh, window=size, layers=layers, **grid),
           "lesions": lesions(encoders, prep_dir, mesh, size=size, layers=layers, **lesion_grid)}
    if out:
        os.makedirs(out, exist_ok=True)
        ex = {}
        for task, r in res.items():
            if not r:
                continue
            e = r.pop("example")
            best = max(r["rows"], key=lambda row: row["dice_mean_fg"])
            pred = e["preds"][(best["encoder"], best["head"])]
            if task == "brain_tissue":
                z = e["image"].shape[2] // 2
                ex[f"{task}_image"], ex[f"{task}_label"] = e["image"][None, :, :, z], e["label"][None, :, :, z]
                ex[f"{task}_pred"] = pred[None, :, :, z]
            else:
                k = min(n_examples, len(e["image"]))
                zs = [int(np.round(np.argwhere(m).mean(0)[2])) for m in e["label"][:k]]
                ex[f"{task}_image"] = np.stack([v[..., z] for v, z in zip(e["image"][:k], zs)])
                ex[f"{task}_label"] = np.stack([v[..., z] for v, z in zip(e["label"][:k], zs)])
                ex[f"{task}_pred"] = np.stack([v[..., z] for v, z in zip(pred[:k], zs)])
            ex[f"{task}_title"] = np.asarray(f"{best['encoder']}, {best['head']} head")
        with open(os.path.join(out, "segmentation.json"), "w") as f:
            json.dump(res, f, indent=1)
        np.savez(os.path.join(out, "examples.npz"), **ex)
    else:
        for r in res.values():
            r.pop("example", None)
    return res
