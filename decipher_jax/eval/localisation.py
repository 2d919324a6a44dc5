"""Text-guided anomaly localisation: a prompt's score read per patch token of a stage-2 image
tower gives a 3D heatmap, upsampled (trilinear) to the volume, scored against lesion masks. With
a mean or max readout a patch's value is its share of the image's score for the prompt
(``TwoTowers.patch_contributions``); with a CLS readout, its own embedding's similarity.

    res = evaluate_split(zs, "outputs/demo/data/prep", "test", out="outputs/demo/localisation")

Scores per series with a lesion: the pointing game (is the heatmap's maximum inside the
lesion?) and voxel AUROC (heatmap as a voxel classifier of the mask). Baselines for the same
masks: a uniformly random point hits with probability = lesion fraction; random voxel scores
give AUROC 0.5.
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

# Finding name in the records -> the query sentence (prompt-ensembled by ZeroShot).
PROMPTS = {
    "infarct": "there is an acute infarct",
    "mass": "there is a mass suspicious for neoplasm",
    "cord_lesion": "there is a spinal cord lesion",
    "liver_lesion": "there is a focal liver lesion",
    "fracture": "there is a vertebral compression fracture",
    "effusion": "there is a joint effusion",
}


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


@functools.lru_cache(maxsize=4)
def _patches(model):
    def f(params, batch):
        m = model(params)
        patch = m.patch_contributions(batch["image"]) if hasattr(m, "patch_contributions") else None
        if patch is None:  # a CLS readout: each patch's own embedding
            _, patch = m.encode_image(batch["image"], patches=True)
        return {"patch": patch, "label": batch["label"], "image": batch["image"][..., 0]}

    return jax.jit(f)


def evaluate_split(zs, data_dir: str, split: str, prompts: dict = PROMPTS, out: str | None = None,
                   n_examples: int = 4) -> dict:
    """Heatmaps for every series with a lesion and a finding in ``prompts``; metrics (and examples)."""
    from decipher_jax.data import pipelines as P

    source = P.data_source(data_dir, split)
    size = zs.image_size
    grid = tuple(s // p for s, p in zip(size, zs.spec["vit"]["patch_size"]))
    fn = functools.partial(_patches(zs.model), zs.params)
    tf = [T.Decode(keep_label=True), T.Resize(size)]
    res = embed.apply(fn, embed.scan_split(source, tf, embed.round_batch(zs.batch_size, zs.mesh)), zs.mesh, ["image", "label"])
    findings = [str(f).split(";") for f in res["findings"]]
    query = [next((f for f in fs if f in prompts), None) for fs in findings]
    keep = np.array([q is not None and lab.any() for q, lab in zip(query, res["label"])])
    if not keep.any():
        return {"n_series": 0}
    names = sorted({q for q, k in zip(query, keep) if k})
    text = dict(zip(names, zs.encode_sentences([prompts[n] for n in names])))
    idx = np.flatnonzero(keep)
    t = np.stack([text[query[i]] for i in idx])  # (M, d)
    cos = np.einsum("mnd,md->mn", res["patch"][idx], t).reshape(len(idx), *grid)
    heat = np.asarray(upsample(cos, size))
    mask = res["label"][idx][..., 0] if res["label"].ndim == 5 else res["label"][idx]
    hits, aucs = pointing_game(heat, mask), voxel_auroc(heat, mask)
    frac = mask.reshape(len(mask), -1).mean(1)
    out_d = {"n_series": int(len(idx)), "pointing_game": float(hits.mean()),
             "pointing_game_random": float(frac.mean()), "voxel_auroc": float(np.nanmean(aucs)),
             "per_finding": {n: {"n": int(sum(query[i] == n for i in idx)),
                                 "pointing_game": float(np.mean([h for h, i in zip(hits, idx) if query[i] == n])),
                                 "voxel_auroc": float(np.nanmean([a for a, i in zip(aucs, idx) if query[i] == n]))}
                             for n in names}}
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "localisation.json"), "w") as f:
            json.dump(out_d, f, indent=1)
        # Example slices for the report: the axial slice through each lesion's centre of mass.
        ex = idx[: n_examples]
        image = res["image"][ex]
        sl = [int(np.round(np.argwhere(m).mean(0)[2])) for m in mask[: len(ex)]]
        np.savez(os.path.join(out, "examples.npz"), heat=np.stack([h[..., z] for h, z in zip(heat[: len(ex)], sl)]),
                 mask=np.stack([m[..., z] for m, z in zip(mask[: len(ex)], sl)]),
                 image=np.stack([v[..., z] for v, z in zip(image, sl)]),
                 series_id=np.asarray(res["series_id"][ex]), query=np.asarray([prompts[query[i]] for i in ex]))
    return out_d
