"""Anomaly localisation on lesion series, read from a frozen stage-2 model in two ways.

- **Text-guided**: each patch's score for the finding's query, the direction between its
  positive and its negative prompt ensembles (``queries.FINDING_QUERIES``). With a mean or max
  readout a patch's score is its share of the image's score (``TwoTowers.patch_contributions``);
  with a CLS readout, or a model trained to align patches with the report's sentences
  (``loss.patch_weight``), the patch's own embedding's.
- **Visual** (text-free): each patch token's distance to the nearest patch token, at the same
  grid position or one step away, of training series of the same body region and sequence
  without findings (:func:`visual_map`; PatchCore's nearest-neighbour anomaly score, position
  aware), for the stage-2 image tower and for a random-init ViT of the same shape (the floor).

    res = evaluate_split(zs, "outputs/demo/data/prep", "test", out="outputs/demo/localisation")

Each map, upsampled trilinearly from the patch grid, is scored per lesion series: the pointing
game (is the map's maximum inside the lesion?) and voxel AUROC (the map as a voxel classifier
of the mask), over the whole volume and over the body (voxels above ``BODY``). Baselines for the
same masks: a uniformly random point hits with probability = the lesion fraction; random voxel
scores give AUROC 0.5.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from decipher_jax.data import transforms as T
from decipher_jax.eval import embed
from decipher_jax.eval.probes import auroc
from decipher_jax.eval.queries import FINDING_QUERIES
from decipher_jax.models.towers import normalise
from decipher_jax.models.vit3d import grid_neighbours

def upsample(grid_heat, size):
    """(B, gd, gh, gw) -> (B, *size), trilinear."""
    grid_heat = jnp.asarray(grid_heat, jnp.float32)
    return jax.image.resize(grid_heat, (grid_heat.shape[0], *size), method="trilinear")


def pointing_game(heat, mask) -> np.ndarray:
    """(B,) bool: the heatmap's arg-max voxel lies in the mask."""
    heat, mask = np.asarray(heat), np.asarray(mask) > 0
    flat = heat.reshape(len(heat), -1).argmax(1)
    return mask.reshape(len(mask), -1)[np.arange(len(mask)), flat]


def voxel_auroc(heat, mask) -> np.ndarray:
    return np.array([auroc(h.ravel(), m.ravel() > 0) for h, m in zip(np.asarray(heat), np.asarray(mask))])


BODY = 0.1  # prepared intensities are in [0, 1]; air sits below this


@functools.lru_cache(maxsize=4)
def _patches(model, own: bool):
    """Per series, from one pass of the image tower: ``text`` the patches' text-guided
    embeddings ``(B, N, d)`` (``own``: each patch's own normalised embedding; else its share of
    the pooled one), ``tokens`` the tower's patch tokens ``(B, N, D)``, the label and the image."""
    def f(params, batch):
        m = model(params)
        tokens = m.image(batch["image"])["patch"]
        text = normalise(m.project_image(tokens)) if own else m.patch_shares(tokens)
        return {"text": text, "tokens": tokens.astype(jnp.float32), "label": batch["label"],
                "image": batch["image"][..., 0]}

    return jax.jit(f)


@functools.lru_cache(maxsize=4)
def _tokens(model, tower: bool):
    """Patch tokens ``(B, N, D)`` of a ViT (``tower``: a two-tower model's image tower)."""
    def f(params, batch):
        m = model(params)
        return {"tokens": (m.image if tower else m)(batch["image"])["patch"].astype(jnp.float32)}

    return jax.jit(f)


def query_direction(zs, query: dict) -> np.ndarray:
    """A finding query's direction in the shared space: its positive prompt ensemble minus its
    negative one, each normalised."""
    zp = zs.encode_sentences(list(query["positive"])).mean(0)
    zn = zs.encode_sentences(list(query["negative"])).mean(0)
    return zp / np.linalg.norm(zp) - zn / np.linalg.norm(zn)


def _field(ex, k):
    v = ex.get(k, b"")
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def group_of(body_region, sequence) -> str:
    return f"{body_region}/{sequence}"


def groups_of(meta) -> np.ndarray:
    """Every row's :func:`group_of` from metadata arrays ``meta["body_region"]``, ``meta["sequence"]``."""
    return np.array([group_of(r, q) for r, q in zip(np.asarray(meta["body_region"]).astype(str),
                                                    np.asarray(meta["sequence"]).astype(str))])


def normal_index(source, per_group: int = 64, seed: int = 0) -> list[int]:
    """Rows of ``source`` without findings (templates left out), at most ``per_group`` of each
    body region and sequence (a fixed random subset): the visual map's memory bank stays
    bounded whatever the corpus' size."""
    by: dict[str, list[int]] = {}
    for i in range(len(source)):
        ex = source[i]
        if _field(ex, "findings").strip() or _field(ex, "role") == "template":
            continue
        by.setdefault(group_of(_field(ex, "body_region"), _field(ex, "sequence")), []).append(i)
    rng = np.random.default_rng(seed)
    return sorted(j for idx in by.values() for j in (idx if len(idx) <= per_group else rng.choice(idx, per_group, replace=False)))


def nearest_normal(tokens, groups, bank, bank_groups, grid, reach: int = 1, exclude=None):
    """Per series and patch, the nearest bank token of its series' group (body region /
    sequence) at most ``reach`` grid steps away (Chebyshev) by cosine: ``(distance (M, N),
    index (M, N, 2))``, the index a ``(bank row, patch)`` pair. A group with fewer than two bank
    series is compared with the whole bank (every series of it alike, whatever its label).
    ``exclude`` ``(M, K)`` bool: per series the bank rows never to use (its own patient's
    series, when they are in the bank); a series left with no row of its group uses the rest
    of the bank. ``tokens`` ``(M, N, D)``, ``bank`` ``(K, N, D)``, ``N = prod(grid)``. Memory:
    one ``(N, K_group, N)`` similarity at a time."""
    def unit(t):
        t = np.asarray(t, np.float32)
        return t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-8)

    near = grid_neighbours(grid, reach)  # (N, N)
    t, b = unit(tokens), unit(bank)
    groups, bank_groups = np.asarray(groups), np.asarray(bank_groups)
    exclude = np.zeros((len(t), len(b)), bool) if exclude is None else np.asarray(exclude, bool)
    if exclude.shape != (len(t), len(b)):
        raise ValueError(f"nearest_normal: exclude has shape {exclude.shape}, expected {(len(t), len(b))}")
    dist = np.zeros(t.shape[:2], np.float32)
    index = np.zeros((*t.shape[:2], 2), np.int64)
    for g in np.unique(groups):
        in_g = bank_groups == g
        if in_g.sum() < 2:
            in_g = np.ones(len(b), bool)
        for i in np.flatnonzero(groups == g):
            bi = np.flatnonzero(in_g & ~exclude[i])
            if not len(bi):  # every bank series of the group is this patient's
                bi = np.flatnonzero(~exclude[i])
            if not len(bi):
                raise ValueError("nearest_normal: every bank series is excluded for a query")
            sim = np.einsum("pd,kqd->pkq", t[i], b[bi])
            sim = np.where(near[:, None, :], sim, -np.inf).reshape(len(t[i]), -1)
            j = sim.argmax(1)
            dist[i] = 1.0 - sim[np.arange(len(j)), j]
            k, q = np.unravel_index(j, (len(bi), b.shape[1]))
            index[i] = np.stack([bi[k], q], -1)
    return dist, index


def visual_map(tokens, groups, bank, bank_groups, grid, reach: int = 1) -> np.ndarray:
    """``(M, *grid)``: each patch token's cosine distance to the nearest bank token of its
    series' group (body region / sequence) at most ``reach`` grid steps away (Chebyshev); a
    group with fewer than two bank series is compared with the whole bank (:func:`nearest_normal`)."""
    dist, _ = nearest_normal(tokens, groups, bank, bank_groups, grid, reach)
    return dist.reshape(len(dist), *grid)


def detect(maps, abnormal, has_lesion, regions) -> dict:
    """Series-level detection from visual maps ``(M, *grid)`` of every series of a split: each
    series' score is its map's maximum (its most anomalous patch; no labels are fitted), scored by
    AUROC against ``abnormal`` (any finding: the probes' "abnormal" task) and ``has_lesion`` (a lesion
    mask), over all series and within each body region."""
    top = np.asarray(maps).reshape(len(maps), -1).max(1)
    abnormal, has_lesion, regions = np.asarray(abnormal, bool), np.asarray(has_lesion, bool), np.asarray(regions)

    def au(y, k=slice(None)):
        y = y[k]
        return float(auroc(top[k], y)) if 0 < y.sum() < len(y) else float("nan")

    return {"n_series": int(len(top)), "n_abnormal": int(abnormal.sum()), "n_lesion": int(has_lesion.sum()),
            "abnormal_auroc": au(abnormal), "lesion_auroc": au(has_lesion),
            "per_region": {str(r): {"n": int((regions == r).sum()), "abnormal_auroc": au(abnormal, regions == r),
                                    "lesion_auroc": au(has_lesion, regions == r)}
                           for r in sorted(set(regions.tolist()))}}


def score_maps(heat, mask, body) -> dict:
    """Per series: voxel AUROC and the pointing game, over the volume and over the body."""
    heat, mask, body = np.asarray(heat), np.asarray(mask) > 0, np.asarray(body)
    in_body = np.where(body, heat, -np.inf)
    return {"voxel_auroc": voxel_auroc(heat, mask),
            "voxel_auroc_body": np.array([auroc(h[b], m[b]) for h, m, b in zip(heat, mask, body)]),
            "pointing_game": pointing_game(heat, mask), "pointing_game_body": pointing_game(in_body, mask)}


def _summary(sc, query, idx, names) -> dict:
    out = {k: float(np.nanmean(v)) for k, v in sc.items()}
    out["per_finding"] = {n: {"n": int(sum(query[i] == n for i in idx)),
                              **{k: float(np.nanmean([x for x, i in zip(v, idx) if query[i] == n])) for k, v in sc.items()}}
                          for n in names}
    return out


def evaluate_split(zs, data_dir: str, split: str, queries: dict | None = None, out: str | None = None,
                   n_examples: int = 4, *, floor=None, bank_split: str = "train", bank_per_group: int = 64) -> dict:
    """Text-guided and visual maps for every series with a lesion and a finding in ``queries``;
    their scores (and example slices). ``floor``: ``(model, params)`` of a random-init ViT of the
    stage-2 tower's shape, whose visual map is scored beside the tower's. Each visual map also
    detects (:func:`detect`) over every patient series of the split (templates left out), except on
    ``bank_split`` itself, whose normal series are in the bank."""
    from decipher_jax.data import pipelines as P

    queries = FINDING_QUERIES if queries is None else queries
    source = P.data_source(data_dir, split)
    size = zs.image_size
    grid = tuple(s // p for s, p in zip(size, zs.spec["vit"]["patch_size"]))
    loss = zs.spec.get("config", {}).get("loss", {})
    own = bool(loss.get("patch_weight")) or zs.spec["towers"].get("image_pool", "cls") == "cls"
    fn = functools.partial(_patches(zs.model, own), zs.params)
    bs = embed.round_batch(zs.batch_size, zs.mesh)
    tf = [T.Decode(keep_label=True), T.Resize(size)]
    res = embed.apply(fn, embed.scan_split(source, tf, bs), zs.mesh, ["image", "label"])
    findings = [str(f).split(";") for f in res["findings"]]
    query = [next((f for f in fs if f in queries), None) for fs in findings]
    mask_all = res["label"][..., 0] if res["label"].ndim == 5 else res["label"]
    keep = np.array([q is not None and (m > 0).any() for q, m in zip(query, mask_all)])
    if not keep.any():
        return {"n_series": 0}
    idx = np.flatnonzero(keep)
    names = sorted({query[i] for i in idx})
    direction = {n: query_direction(zs, queries[n]) for n in names}
    t = np.stack([direction[query[i]] for i in idx])  # (M, d)
    text = np.einsum("mnd,md->mn", res["text"][idx], t).reshape(len(idx), *grid)
    groups_all = groups_of(res)
    bank_source = P.data_source(data_dir, bank_split)
    bank_src = P.Subset(bank_source, normal_index(bank_source, bank_per_group))
    bank_tf = [T.Decode(), T.Resize(size)]
    maps = {"text": text}
    detection = {}
    abnormal = np.array([bool(str(f).strip()) for f in res["findings"]])
    has_lesion = np.array([(m > 0).any() for m in mask_all])
    # Detection over the split's patients: templates (tissue-class label maps, not lesions) left out, and
    # none on the bank's own split, whose normal series would find themselves in the bank.
    patients = np.asarray(res["role"]).astype(str) != "template"  # the rows' own metadata, in their order
    detect_here = split != bank_split
    encoders = {"stage 2": (zs.model, zs.params, True)} | ({"random init": (*floor, False)} if floor is not None else {})
    for name, (model, params, tower) in encoders.items():
        fn_tok = functools.partial(_tokens(model, tower), params)
        bank = embed.apply(fn_tok, embed.scan_split(bank_src, bank_tf, bs), zs.mesh, ["image"])
        if tower:  # the stage-2 image tower: the split's tokens came with the text maps
            tok_all = res["tokens"]
        else:
            tok_all = embed.apply(fn_tok, embed.scan_split(source, bank_tf, bs), zs.mesh, ["image"])["tokens"]
        bank_groups = groups_of(bank)
        vis = visual_map(tok_all, groups_all, bank["tokens"], bank_groups, grid)  # every series of the split
        maps[f"visual, {name}"] = vis[idx]
        if detect_here:
            detection[name] = detect(vis[patients], abnormal[patients], has_lesion[patients],
                                     np.asarray(res["body_region"])[patients])
    mask = mask_all[idx]
    body = res["image"][idx] > BODY
    heats = {k: np.asarray(upsample(v, size)) for k, v in maps.items()}
    scores = {k: score_maps(h, mask, body) for k, h in heats.items()}
    frac = mask.reshape(len(mask), -1).astype(bool).mean(1)
    frac_body = np.array([(m[b] > 0).mean() for m, b in zip(mask, body)])
    txt = _summary(scores["text"], query, idx, names)
    out_d = {"n_series": int(len(idx)), "bank_series": int(len(bank_src)), "text_map": "patch" if own else "share",
             **txt,
             "pointing_game_random": float(frac.mean()), "pointing_game_body_random": float(frac_body.mean()),
             "visual": {k.split(", ", 1)[1]: _summary(v, query, idx, names) for k, v in scores.items() if k != "text"}}
    for name, d in detection.items():
        out_d["visual"][name]["detection"] = d
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "localisation.json"), "w") as f:
            json.dump(out_d, f, indent=1)
        # Example slices for the report: the axial slice through each lesion's centre of mass.
        ex = idx[: n_examples]
        image = res["image"][ex]
        sl = [int(np.round(np.argwhere(m).mean(0)[2])) for m in mask[: len(ex)]]
        pick = lambda vols: np.stack([v[..., z] for v, z in zip(vols[: len(ex)], sl)])  # noqa: E731
        np.savez(os.path.join(out, "examples.npz"), heat=pick(heats["text"]), visual=pick(heats["visual, stage 2"]),
                 mask=pick(mask), image=np.stack([v[..., z] for v, z in zip(image, sl)]),
                 series_id=np.asarray(res["series_id"][ex]),
                 query=np.asarray([queries[query[i]]["label"] for i in ex]))
    return out_d
