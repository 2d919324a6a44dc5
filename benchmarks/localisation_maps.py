"""Anomaly maps side by side on a pipeline run's lesion series: text-guided maps read from the
stage-2 towers in several ways, and the text-free ("visual") map, each patch token's distance to
its nearest patch tokens of training studies without findings, for every encoder of the ladder.

    .venv/bin/python benchmarks/localisation_maps.py --workdir W      # W: a `decipher pipeline` workdir
    .venv/bin/python benchmarks/localisation_maps.py --workdir W --shift 2

Maps (one value per patch, made voxel-level by shifting the input: ``--shift s`` encodes every
volume at each offset in ``range(0, patch, s)`` along each axis and averages each voxel's patch
values over the offsets; ``--shift 0``: the patch grid upsampled trilinearly, as the evaluator):
- ``text share``: each patch's share of the image's score for the positive prompt (the evaluator);
- ``text share contrast``: the same against the query's direction, positive minus negative ensemble;
- ``text occlusion``: the drop of the image's score on that direction when the patch is left out
  of the pools (for a max, the gap to the second-largest value of each channel the patch owns);
- ``text dense contrast``: each patch's own embedding (the image made of that patch) on that direction;
- ``visual``: the distance of each patch token to the nearest token of the training series of the
  same body region and sequence without findings, at the same grid position or one step away.
Scored per lesion series: voxel AUROC over the whole volume and over the body (image > 0.1), and
the pointing game (the arg-max voxel in the lesion) over each.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_split(prep, split, size, *, lesions: bool):
    import numpy as np

    from decipher_jax.data import pipelines as P
    from decipher_jax.data import transforms as T

    decode, resize = T.Decode(keep_label=True), T.Resize(tuple(size))
    src = P.data_source(prep, split)
    out = {"image": [], "mask": [], "findings": [], "group": [], "series_id": []}
    for i in range(len(src)):
        ex = src[i]
        d = decode.map(ex)
        if d.get("role", "") == "template":
            continue
        findings = [f for f in str(d.get("findings", "")).split(";") if f]
        has_mask = bool(ex.get("has_label", True))
        if lesions and not has_mask:
            continue
        d = resize.map(d)
        m = (np.asarray(d["label"]) > 0) if has_mask else np.zeros(tuple(size), bool)
        m = m[..., 0] if m.ndim == 4 else m
        if lesions and not m.any():
            continue
        if not lesions and findings:
            continue  # the bank: studies without findings only
        out["image"].append(np.asarray(d["image"], np.float32))
        out["mask"].append(m)
        out["findings"].append(findings)
        out["group"].append(f"{d['body_region']}/{d['sequence']}")
        out["series_id"].append(str(d["series_id"]))
    out["image"], out["mask"] = np.stack(out["image"]), np.stack(out["mask"])
    out["group"] = np.asarray(out["group"])
    return out


def shifted(images, offset):
    """The volumes moved by ``offset`` voxels (content at i goes to i + offset), zero-filled."""
    import numpy as np

    out = np.zeros_like(images)
    sl_src = tuple(slice(0, s - o) for s, o in zip(images.shape[1:4], offset))
    sl_dst = tuple(slice(o, s) for s, o in zip(images.shape[1:4], offset))
    out[(slice(None), *sl_dst)] = images[(slice(None), *sl_src)]
    return out


def to_voxels(grid_vals, offset, patch, size):
    """(B, gd, gh, gw) patch values at one offset -> (B, X, Y, Z) values and a validity mask in
    the original frame (each voxel takes its patch's value)."""
    import numpy as np

    v = grid_vals
    for ax, p in enumerate(patch):
        v = np.repeat(v, p, axis=ax + 1)
    out = np.zeros((len(v), *size), np.float32)
    ok = np.zeros(size, bool)
    sl_src = tuple(slice(o, s) for s, o in zip(size, offset))
    sl_dst = tuple(slice(0, s - o) for s, o in zip(size, offset))
    out[(slice(None), *sl_dst)] = v[(slice(None), *sl_src)]
    ok[sl_dst] = True
    return out, ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--shift", type=int, default=4, help="offset step in voxels (0: trilinear upsampling)")
    p.add_argument("--layers", default="", help="intermediate layers added to the visual map's tokens, e.g. 0")
    args = p.parse_args(argv)
    import jax
    import numpy as np

    from decipher_jax import runs
    from decipher_jax import sharding as sh
    from decipher_jax.eval import evaluators, segtasks
    from decipher_jax.eval import localisation as L
    from decipher_jax.zeroshot import ZeroShot

    prep = os.path.join(args.workdir, "data", "prep")
    mesh = sh.make_mesh({"data": -1})
    align, ssl = os.path.join(args.workdir, "stage2"), os.path.join(args.workdir, "stage1_vision")
    encs = runs.encoders(align=align, ssl_teacher=ssl if os.path.isdir(ssl) else "", mesh=mesh)
    vit = next(iter(encs.values())).vit
    size, patch = tuple(vit.img_size), tuple(vit.patch_size)
    grid = tuple(s // q for s, q in zip(size, patch))
    layers = tuple(int(x) for x in args.layers.split(",") if x)
    test = load_split(prep, "test", size, lesions=True)
    bank = load_split(prep, "train", size, lesions=False)
    body = test["image"][..., 0] > 0.1
    zs = ZeroShot.from_workdir(align, mesh=mesh)
    queries = evaluators.FINDING_QUERIES
    query = [next((f for f in fs if f in queries), None) for fs in test["findings"]]
    keep = np.array([q is not None for q in query])
    print(f"{keep.sum()} test lesion series with a query, bank of {len(bank['image'])} training series without "
          f"findings; grid {grid}, patch {patch}, shift {args.shift}", flush=True)
    names = sorted({q for q in query if q})
    direction = {n: L.query_direction(zs, queries[n]) for n in names}
    positive = {}
    for n in names:
        zp = zs.encode_sentences(list(queries[n]["positive"])).mean(0)
        positive[n] = zp / np.linalg.norm(zp)
    w = np.asarray(jax.device_get(zs.params["image_proj"]), np.float32)
    pools = zs.spec["towers"].get("image_pool", "cls")
    pools = tuple(pools.split("+"))
    d = vit.dim
    t_dir = np.stack([direction[q] if q else np.zeros_like(direction[names[0]]) for q in query])
    t_pos = np.stack([positive[q] if q else np.zeros_like(positive[names[0]]) for q in query])

    offsets = [(0, 0, 0)] if args.shift <= 0 else list(itertools.product(*[range(0, q, args.shift) for q in patch]))
    maps: dict[str, list] = {}

    def add(name, vals, off):
        v, ok = to_voxels(vals, off, patch, size)
        s, c = maps.setdefault(name, [np.zeros_like(v), np.zeros(size, np.float32)])
        s += v
        c += ok

    trilinear = {}
    for off in offsets:
        timg, bimg = shifted(test["image"], off), shifted(bank["image"], off)
        for key, e in encs.items():
            tt = segtasks.encode(e.model, e.params, timg, mesh, layers)
            bt = segtasks.encode(e.model, e.params, bimg, mesh, layers)
            flat = lambda t: t.reshape(len(t), -1, t.shape[-1])  # noqa: E731
            vis = L.visual_map(flat(tt), test["group"], flat(bt), bank["group"], grid)
            if args.shift <= 0:
                trilinear[f"visual, {e.name}"] = vis
            else:
                add(f"visual, {e.name}", vis, off)
            if key != "align":
                continue
            tok = tt[..., :d].reshape(len(tt), -1, d)  # (M, P, D)
            share = 0.0
            dense = 0.0
            drop = 0.0  # the score lost when the patch is left out of the pools
            for i, pool in enumerate(pools):
                wp = w[i * d:(i + 1) * d]
                proj = tok @ wp  # (M, P, e)
                dense = dense + proj
                v = np.einsum("de,me->md", wp, t_dir)  # (M, D): each channel's weight on the direction
                if pool == "mean":
                    share = share + proj / tok.shape[1]
                    drop = drop + np.einsum("mpd,md->mp", tok - tok.mean(1, keepdims=True), v) / (tok.shape[1] - 1)
                elif pool == "max":
                    own = tok == tok.max(axis=1, keepdims=True)
                    share = share + (tok * own) @ wp
                    srt = np.sort(tok, axis=1)
                    gap = (srt[:, -1] - srt[:, -2])[:, None]  # (M, 1, D)
                    drop = drop + np.einsum("mpd,md->mp", own * gap, v)
            if isinstance(share, float):  # a CLS readout: each patch's own embedding
                share = dense
            vals = {"text share": np.einsum("mpe,me->mp", share, t_pos),
                    "text share contrast": np.einsum("mpe,me->mp", share, t_dir),
                    "text occlusion": drop,
                    "text dense contrast": np.einsum("mpe,me->mp", dense / np.linalg.norm(dense, axis=-1, keepdims=True),
                                                     t_dir)}
            for name, v in vals.items():
                v = v.reshape(len(tt), *grid)
                if args.shift <= 0:
                    trilinear[name] = v
                else:
                    add(name, v, off)
        print(f"offset {off} done", flush=True)
    if args.shift <= 0:
        heats = {k: np.asarray(L.upsample(v, size)) for k, v in trilinear.items()}
    else:
        heats = {k: s / np.maximum(c, 1) for k, (s, c) in maps.items()}
    print(f"\n| map | voxel AUROC | voxel AUROC in the body | pointing game | pointing game in the body |")
    print("|---|---|---|---|---|")
    rows = {}
    for name, h in heats.items():
        r = {k: np.asarray(v, float) for k, v in L.score_maps(h[keep], test["mask"][keep], body[keep]).items()}
        rows[name] = r
        print(f"| {name} | {np.nanmean(r['voxel_auroc']):.3f} | {np.nanmean(r['voxel_auroc_body']):.3f} | "
              f"{r['pointing_game'].mean():.2f} | {r['pointing_game_body'].mean():.2f} |")
    frac = test["mask"][keep].reshape(keep.sum(), -1).mean(1)
    fb = np.array([m[b].mean() for m, b in zip(test["mask"][keep], body[keep])])
    print(f"| chance | 0.500 | 0.500 | {frac.mean():.3f} | {fb.mean():.3f} |")
    print("\nper finding, voxel AUROC in the body / pointing game in the body:")
    q = np.asarray([x for x in query if x])
    for name, r in rows.items():
        print(f"  {name}: " + ", ".join(f"{n} ({(q == n).sum()}) {np.nanmean(r['voxel_auroc_body'][q == n]):.2f}/"
                                        f"{r['pointing_game_body'][q == n].mean():.2f}" for n in names))


if __name__ == "__main__":
    main()
