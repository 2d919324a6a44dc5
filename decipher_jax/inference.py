"""Embeddings (and zero-shot scores) of new files with a trained stage-2 run or a bundle.

    emb = Embedder.from_run("outputs/demo/stage2")          # a workdir or an exported bundle
    out = emb.embed(["scan.nii.gz", "dicom_study/"], sentences=["there is an acute infarct"])
    out["embedding"]  # (N, d), out["series_id"], out["scores"] (N, S), out["skipped"]

``decipher embed --run W --images a.nii.gz b/ dicom_dir/ --out emb.npz`` runs this. Each file
goes through exactly the preprocessing recorded in the run (:func:`data_prep.volume.process`
with the run's ``VolumeConfig``: RAS, spacing, intensity window, crop), is stored as the records
store it (float16), then resized whole to the model's grid as the evaluations do, or, with
``window``, tiled by overlapping windows at the prepared spacing (the series' embedding is the
renormalised mean of its windows'). A folder is searched for NIfTI files (``.nii``, ``.nii.gz``)
and scanned for DICOM volumes (:mod:`data_prep.dicom`); bad files are skipped and listed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import jax
import numpy as np

NIFTI = (".nii", ".nii.gz")


@dataclasses.dataclass
class Item:
    """One volume to embed: where it comes from and its identifiers."""

    path: str  # a NIfTI file or a DICOM series file (written by the scan)
    source: str  # what the user named (a file, or the DICOM files' folder)
    series_id: str
    study_id: str = ""
    patient_id: str = ""
    series_description: str = ""


def volume_config(spec: dict):
    """The run's :class:`data_prep.volume.VolumeConfig` (from its preprocessing record)."""
    from data_prep import volume

    pre = spec.get("preprocessing") or {}
    vc = pre.get("volume_config")
    if not vc:
        raise ValueError(f"{spec.get('bundle') or 'the run'} records no preprocessing (volume_config); its data were "
                         "not prepared by decipher prep, so new files cannot be prepared the same way")
    fields = {f.name for f in dataclasses.fields(volume.VolumeConfig)}
    return volume.VolumeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vc.items() if k in fields})


def collect(paths, series_dir: str, min_slices: int = 8, max_voxels: int = 512**3) -> tuple[list[Item], list[dict]]:
    """The volumes named by ``paths`` (NIfTI files, DICOM files or folders, DICOMDIRs) and what
    was skipped, with reasons."""
    from data_prep import dicom

    items, skipped = [], []
    opts = dicom.ScanOptions(min_slices=min_slices, max_voxels=max_voxels)
    os.makedirs(series_dir, exist_ok=True)

    def scan(root):  # a folder's (or a file's) DICOM volumes, after the folder's NIfTI files
        res = dicom.scan(root, opts)
        # A folder's NIfTI files are not DICOM: not listed as skipped.
        skipped.extend(s for s in res.skipped if not (s["reason"] == "not a DICOM file" and s["file"].endswith(NIFTI)))
        for vol in res.volumes:
            sp = dicom.write_series_file(os.path.join(series_dir, f"{len(items):06d}{dicom.SERIES_SUFFIX}"), vol,
                                         vol.series_id)
            t = vol.tags
            items.append(Item(sp, root, vol.series_id, t["study_uid"], t["patient_id"], t["series_description"]))

    for p in paths:  # in the order given
        if not os.path.exists(p):
            skipped.append({"file": p, "reason": "not found"})
        elif os.path.isfile(p) and p.endswith(NIFTI):
            items.append(Item(p, p, _stem(p)))
        elif os.path.isdir(p):
            for d, dirs, files in os.walk(p):
                dirs.sort()
                items += [Item(os.path.join(d, f), os.path.join(d, f), _stem(f)) for f in sorted(files) if f.endswith(NIFTI)]
            scan(p)
        else:
            scan(p)  # a DICOM file or a DICOMDIR
    return items, skipped


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in NIFTI[::-1]:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


class Embedder:
    def __init__(self, model, params, spec: dict, mesh, batch_size: int = 8):
        from decipher_jax.zeroshot import ZeroShot

        self.model, self.params, self.spec, self.mesh = model, params, spec, mesh
        self.vcfg = volume_config(spec)
        self.image_size = tuple(spec["vit"]["img_size"])
        self.batch_size = batch_size
        self.zeroshot = ZeroShot(model, params, spec, mesh, batch_size=batch_size)
        self._encode = jax.jit(lambda p, x: model(p).encode_image(x, patches=True))

    @classmethod
    def from_run(cls, path: str, mesh=None, **kw) -> Embedder:
        """A stage-2 workdir, a pipeline workdir (its ``stage2``) or a bundle."""
        from decipher_jax import bundle, layout, runs

        if bundle.is_bundle(path):
            model, params, spec = bundle.from_pretrained(path, mesh)
        else:
            if not os.path.exists(layout.RunDir(path).spec) and os.path.exists(layout.PipelineDir(path).run("stage2").spec):
                path = layout.PipelineDir(path).run("stage2").path
            model, params, spec = runs.load_align(path, mesh=mesh)
        return cls(model, params, spec, model.mesh, **kw)

    def preprocess(self, path: str) -> np.ndarray:
        """``(X, Y, Z, 1)`` as a prepared record stores it (float16), by prep's own chain."""
        from data_prep import volume

        return volume.process(path, None, self.vcfg)["volume"].astype(np.float16)[..., None]

    def _inputs(self, vol: np.ndarray, window, overlap: float) -> np.ndarray:
        from decipher_jax.data import transforms as T

        if window is None:
            return T._resize(vol, self.image_size)[None]
        from decipher_jax.eval import seghead

        v = seghead.pad_to_window(vol.astype(np.float32)[None], tuple(window))[0]
        corners = seghead.window_corners(v.shape[:3], tuple(window), overlap)
        return np.stack([v[x: x + window[0], y: y + window[1], z: z + window[2]] for x, y, z in corners])

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from decipher_jax import sharding as sh
        from decipher_jax.eval import embed

        n = len(x)
        pad = embed.round_batch(n, self.mesh) - n
        if pad:
            x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
        with jax.set_mesh(self.mesh):
            z, patches = self._encode(self.params, sh.shard_batch({"image": x}, self.mesh)["image"])
        return np.asarray(jax.device_get(z))[:n], np.asarray(jax.device_get(patches))[:n]

    def embed(self, paths, *, sentences=(), tokens: bool = False, window=None, overlap: float = 0.5,
              progress: bool = False) -> dict:
        """Embeddings of every volume ``paths`` name; ``skipped`` lists the rest with reasons."""
        from tqdm import tqdm

        from data_prep.errors import BadInput
        from decipher_jax.eval.retrieval import normalise

        with tempfile.TemporaryDirectory(prefix="decipher-embed-") as tmp:
            items, skipped = collect(paths, tmp, self.vcfg.min_size, self.vcfg.max_voxels)
            done, zs, toks, pending = [], [], [], []

            def flush():
                if not pending:
                    return
                z, p = self._run(np.concatenate([x for _, x in pending]))
                zs.append(z)
                if tokens:
                    toks.append(p)
                done.extend(it for it, _ in pending)
                pending.clear()

            if tokens and window is not None:
                raise ValueError("patch tokens are per window: ask for tokens or for windows, not both")
            for it in tqdm(items, desc="embed", unit="series", disable=not progress):
                try:
                    x = self._inputs(self.preprocess(it.path), window, overlap)
                except BadInput as e:
                    skipped.append({"file": e.path if e.path != it.path else it.source, "reason": e.reason,
                                    "series_id": it.series_id})
                    continue
                if window is not None:  # one series' windows, a batch at a time: their mean embedding
                    flush()
                    z = np.concatenate([self._run(x[i: i + self.batch_size])[0]
                                        for i in range(0, len(x), self.batch_size)])
                    zs.append(normalise(z.mean(0, keepdims=True)))
                    done.append(it)
                    continue
                pending.append((it, x))
                if len(pending) == self.batch_size:
                    flush()
            flush()
        d = int(self.spec["towers"]["embed_dim"]) if zs == [] else zs[0].shape[-1]
        out = {
            "embedding": np.concatenate(zs) if zs else np.zeros((0, d), np.float32),
            **{k: np.asarray([getattr(it, k) for it in done], dtype=str)
               for k in ("series_id", "study_id", "patient_id", "series_description", "source")},
            "skipped": skipped,
        }
        if tokens:
            out["tokens"] = np.concatenate(toks) if toks else np.zeros((0, 0, d), np.float32)
        if sentences:
            out["sentences"] = np.asarray(list(sentences), dtype=str)
            out["scores"] = (self.zeroshot.score(image_embeddings=out["embedding"], sentences=list(sentences))
                             if len(out["embedding"]) else np.zeros((0, len(sentences))))
        return out


def save(out: dict, path: str) -> str:
    """Writes ``out`` (from :meth:`Embedder.embed`) to ``.npz`` or ``.parquet`` atomically, and the
    skipped items to ``<path>.skipped.jsonl``; returns ``path``."""
    arrays = {k: v for k, v in out.items() if k != "skipped"}
    tmp = path + ".tmp"
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(arrays["embedding"])
        cols = {k: v for k, v in arrays.items() if k not in ("sentences", "scores", "tokens")}
        cols["embedding"] = list(arrays["embedding"].astype(np.float32))
        if "tokens" in arrays:
            cols["tokens"] = [t.astype(np.float32).ravel() for t in arrays["tokens"]]
        for j, s in enumerate(arrays.get("sentences", [])):
            cols[f"score: {s}"] = arrays["scores"][:, j]
        table = pa.table({k: (list(v) if not isinstance(v, list) else v) for k, v in cols.items()}) if n else \
            pa.table({k: [] for k in cols})
        pq.write_table(table, tmp)
    elif path.endswith(".npz"):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    else:
        raise ValueError(f"{path}: the output must end in .npz or .parquet")
    with open(path + ".skipped.jsonl.tmp", "w") as f:
        for s in out["skipped"]:
            f.write(json.dumps(s) + "\n")
    os.replace(path + ".skipped.jsonl.tmp", path + ".skipped.jsonl")
    os.replace(tmp, path)
    return path
