"""``decipher prep``: a manifest of NIfTI series + reports, or a DICOM folder tree (or DICOMDIR)
+ a reports CSV -> sharded ArrayRecord (TFDS) records.

Stages, each safe to interrupt:
0. DICOM only: :mod:`data_prep.dicom` scans the tree's headers, groups the images into volumes
   and writes ``dicom/manifest.csv`` (tags as columns, reports joined by StudyInstanceUID or
   AccessionNumber, identifiers optionally pseudonymised) and one series file per volume; what
   is not a usable volume (SR, RTSTRUCT, localisers, gaps, tilt, too few slices) is recorded in
   ``errors.jsonl`` with status "skipped" and its reason.
1. Per series, in parallel: load, validate, RAS + resample, normalise; the result is written
   atomically to ``cache/<config-hash>/<series>.npz``. A rerun skips cached series, so a
   crash loses nothing already written. Bad inputs (and unusable manifest rows) are skipped and
   recorded, one JSON line each, in ``errors.jsonl`` (file + reason); the rest is processed.
   With ``studies`` (multi-parametric studies) the study grids are read from the headers first:
   "resample" puts every series of a study on its first series' RAS grid, "check" records the
   series off it as errors (STUDY_MODES).
2. Patient-level split (no patient in two splits), deterministic in the seed.
3. A TFDS builder writes ``tfds/decipher_mri/<version>/`` ArrayRecord shards, read back with
   ``tfds.builder_from_directory(path).as_data_source(split)`` (no TensorFlow needed).
4. ``dataset_card.json``: counts, intensity and spacing statistics, and the preprocessing.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time

import numpy as np

from data_prep import dicom
from data_prep import manifest as manifest_lib
from data_prep import reports as reports_lib
from data_prep import storage
from data_prep import volume as volume_lib
from data_prep.schema import DATASET_NAME, FORMAT_VERSION

SPLITS = ("train", "val", "test")
# How the series of a study are put on voxel grids (PrepConfig.studies), in the dataset card's words.
STUDY_MODES = {
    "": "each series resampled onto its own RAS grid (the series of a study may differ in grid)",
    "check": "each series resampled onto its own RAS grid; a series whose grid differs from its study's reference "
             "grid (the RAS grid of the study's first series, in manifest order, whose header loads) is an error",
    "resample": "every series of a study resampled onto its study's reference grid (the RAS grid of the study's first "
                "series, in manifest order, whose header loads): image trilinear, label map nearest, so the series "
                "of a study share one voxel grid",
}


@dataclasses.dataclass(frozen=True)
class DicomOptions:
    """How a DICOM source becomes manifest rows (ignored for a manifest)."""

    reports: str = ""  # CSV: study_instance_uid or accession_number, and report or report_file (+ findings)
    pseudonymise: bool = False  # hash patient, study and series identifiers under ``salt`` on the way in
    salt: str = dataclasses.field(default="", repr=False)  # never written anywhere


@dataclasses.dataclass(frozen=True)
class PrepConfig:
    volume: volume_lib.VolumeConfig = volume_lib.VolumeConfig()
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    workers: int = 0  # 0: one per CPU core; 1: in-process
    # "none": raw volumes in uncompressed ArrayRecord chunks (fast reads); "zlib": zlib volumes in
    # TFDS's zstd chunks (about half the disk, slower reads; BENCHMARKS.md)
    compression: str = "none"
    dicom: DicomOptions = DicomOptions()
    # The series of a study (multi-parametric MRI: T1, T2, FLAIR, DWI acquired in different
    # planes) on voxel grids: "" each on its own; "check": those off their study's reference grid
    # are errors; "resample": all onto it (STUDY_MODES). A study loader stacks a study's series as
    # channels only when they share one grid (decipher_jax.data.pipelines.StudySource).
    studies: str = ""

    def __post_init__(self):
        if self.studies not in STUDY_MODES:
            raise ValueError(f"PrepConfig.studies={self.studies!r}: unknown study grouping; expected one of "
                             f"{sorted(STUDY_MODES)} ('' for each series on its own grid)")
        if self.studies and self.volume.crop_foreground:
            raise ValueError(f"PrepConfig.studies={self.studies!r} with crop_foreground=True: cropping each series to "
                             "its own foreground would take the series of a study off their shared grid; prepare "
                             "without --crop-foreground")

    def cache_key(self) -> str:
        """The cache folder's name: a hash of what a cached series depends on. The volume config,
        and the study grid when series are resampled onto it ("resample"); "check" stores the same
        series as "" (each on its own grid, the mismatched ones not at all), so they share a cache,
        and a cache prepared before ``studies`` existed stays valid."""
        conf = dataclasses.asdict(self.volume)
        if self.studies == "resample":
            conf["studies"] = self.studies
        blob = json.dumps(conf, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclasses.dataclass
class PrepResult:
    out_dir: str
    tfds_dir: str
    counts: dict
    errors: list[dict]
    processed: int
    reused: int
    skipped: list[dict] = dataclasses.field(default_factory=list)  # DICOM objects that are not volumes

    @property
    def ok(self) -> bool:
        return not self.errors


def _read_report(row: manifest_lib.SeriesRow) -> tuple[str, bool]:
    """(text, has_report). A named report file that is missing, empty or not UTF-8 is a bad input."""
    if row.report_file:
        volume_lib.check_file(row.report_file, "report")
        with open(row.report_file, "rb") as f:
            raw = f.read()
        try:
            text = reports_lib.decode_utf8(raw, "report")
        except ValueError as e:
            raise volume_lib.BadInput(row.report_file, str(e)) from None
        if not text.strip():
            raise volume_lib.BadInput(row.report_file, "report is empty")
        return text, True
    if row.report.strip():
        return row.report, True
    return "", False


def _error(series_id: str, path: str, reason: str, **extra) -> dict:
    return {"series_id": series_id, "status": "error", "file": path, "reason": reason, **extra}


def _cached_fields(path: str, keys) -> dict:
    """The string fields ``keys`` of a cache entry ("" where absent); an unreadable entry matches nothing."""
    try:
        with np.load(path) as z:
            return {k: str(z[k]) if k in z.files else "" for k in keys}
    except Exception:  # noqa: BLE001 - an unreadable cache entry is redone
        return {k: None for k in keys}


def grid_digest(grid) -> str:
    """A stable name of a voxel grid ``(affine, shape)``, stored with a series resampled onto it."""
    affine, shape = grid
    return f"{tuple(int(n) for n in shape)} {np.round(np.asarray(affine, float), 4).tolist()}"


def process_row(row: manifest_lib.SeriesRow, cfg: volume_lib.VolumeConfig, cache_dir: str, grid=None) -> dict:
    """Processes one series into ``cache_dir``; returns a status dict and never raises: any failure
    of one series (MemoryError included) is that series' error, not the run's. ``grid``: the
    series' study grid ``(affine, shape)`` to resample onto (``studies="resample"``), or None for
    its own; a cached series is reused only if it was resampled onto the same grid (a study's
    reference series can change with the manifest)."""
    out = os.path.join(cache_dir, f"{row.series_id}.npz")
    # The manifest refuses unsafe ids; this guards any other caller (the id is a file name).
    if os.path.dirname(os.path.realpath(out)) != os.path.realpath(cache_dir):
        return _error(row.series_id, row.image, f"series_id {row.series_id!r} would write outside the cache folder")
    # A DICOM volume's series file carries a digest of its frames (files, sizes, times): its cached
    # preparation is reused only while the digest is the same (new or replaced files redo it).
    digest = dicom.series_digest(row.image) if row.image.endswith(dicom.SERIES_SUFFIX) else ""
    want = {"source_digest": digest} if digest else {}
    if grid is not None:
        want["study_grid"] = grid_digest(grid)
    if os.path.exists(out) and (not want or _cached_fields(out, want) == want):
        return {"series_id": row.series_id, "status": "reused"}
    try:
        text, has_report = _read_report(row)
        res = volume_lib.process(row.image, row.label or None, cfg, grid=grid)
        res.update(want)
        label = res.pop("label")
        tmp = out + ".tmp.npz"
        np.savez(
            tmp, volume=res.pop("volume").astype(np.float16),
            # No label map: a placeholder of 2**3 voxels, since TFDS cuts a bytes tensor's shape to its
            # byte count on decode (a 1-voxel record could not be read back).
            label=label if label is not None else np.zeros((2, 2, 2), np.uint8),
            has_label=label is not None, report_full=reports_lib.normalise(text),
            report=reports_lib.clinical_text(text) if has_report else "", has_report=has_report,
            **{k: np.asarray(v) for k, v in res.items()},
        )
        os.replace(tmp, out)  # atomic: a crash never leaves a half-written cache entry
    except volume_lib.BadInput as e:
        return _error(row.series_id, e.path, str(e))
    except Exception as e:  # noqa: BLE001 - a bug or resource limit on one series must not end the run
        return _error(row.series_id, row.image, f"{row.image}: {type(e).__name__}: {e}")
    return {"series_id": row.series_id, "status": "processed"}


def _grid_words(grid) -> str:
    affine, shape = grid[:2]
    return f"shape {tuple(int(n) for n in shape)}, origin {np.round(affine[:3, 3], 2).tolist()} mm"


def study_grids(rows, cfg: volume_lib.VolumeConfig, every: bool = False) -> tuple[dict, dict]:
    """``(reference, own)`` from the images' headers alone (:func:`data_prep.volume.header_geometry`:
    no voxel is read; the header checks and ``max_voxels`` hold). ``reference``: study id ->
    ``(affine, shape, series id)``, the RAS grid at ``cfg.target_spacing`` of the study's first
    series, in ``rows``' order, whose header loads. ``own``: series id -> its own RAS grid, for
    every series with ``every`` (else for the reference series only). A series whose header does
    not load is left out of both: it is processed as any other and records its own error."""
    reference: dict = {}
    own: dict = {}
    for row in rows:
        if row.study_id in reference and not every:
            continue
        try:
            affine, shape = volume_lib.header_geometry(row.image, cfg)
            grid = volume_lib.ras_grid(affine, shape, cfg.target_spacing)
        except Exception:  # noqa: BLE001 - any unreadable header: the series' own processing says why
            continue
        own[row.series_id] = grid
        reference.setdefault(row.study_id, (*grid, row.series_id))
    return reference, own


def _same_grid(a, b) -> bool:
    return tuple(a[1]) == tuple(b[1]) and bool(np.allclose(a[0], b[0], atol=1e-3))


def group_studies(rows, cfg: PrepConfig) -> tuple[dict, list[dict]]:
    """``(grids, errors)`` of ``cfg.studies``: ``grids`` series id -> the study grid to resample
    it onto ("resample"; empty otherwise), ``errors`` one per series off its study's reference
    grid ("check"), each naming the file and the way out."""
    if not cfg.studies:
        return {}, []
    reference, own = study_grids(rows, cfg.volume, every=cfg.studies == "check")
    if cfg.studies == "resample":
        return {r.series_id: reference[r.study_id][:2] for r in rows if r.study_id in reference}, []
    errors = []
    for r in rows:
        ref = reference.get(r.study_id)
        if r.series_id not in own or ref is None or ref[2] == r.series_id or _same_grid(own[r.series_id], ref):
            continue
        errors.append(_error(r.series_id, r.image, f"{r.image}: its RAS grid ({_grid_words(own[r.series_id])}) differs "
                             f"from the grid of study {r.study_id}'s first series {ref[2]} ({_grid_words(ref)}); "
                             "studies='check' needs the series of a study on one grid: prepare with "
                             "studies='resample' (decipher prep --studies resample) to resample them onto it"))
    return {}, errors


def assign_splits(patients, fractions, seed: int) -> dict[str, str]:
    """Patient -> split, by sorting on a seeded hash; every non-zero split gets >= 1 patient."""
    ps = sorted(set(patients), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n = len(ps)
    counts = [int(round(f * n)) for f in fractions]
    for i in (2, 1):
        if fractions[i] > 0 and counts[i] == 0 and n >= 3:
            counts[i] = 1
    counts[0] = n - counts[1] - counts[2]
    out, start = {}, 0
    for split, c in zip(SPLITS, counts):
        for p in ps[start: start + c]:
            out[p] = split
        start += c
    return out


def _summ(values) -> dict:
    a = np.asarray(values, float)
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())} if a.size else {}


def read_source(source: str, out_dir: str, cfg: PrepConfig, progress: bool):
    """``(manifest, rows, row errors, skipped DICOM objects, DICOM card, DICOM index, scan
    options)`` of a manifest, or of a DICOM tree scanned into ``out_dir/dicom/manifest.csv``."""
    skipped, dicom_card, index, opts, manifest_path = [], None, None, None, source
    if dicom.is_dicom_source(source):
        opts = dicom.ScanOptions(min_slices=cfg.volume.min_size, max_voxels=cfg.volume.max_voxels,
                                 pseudonymise=cfg.dicom.pseudonymise, salt=cfg.dicom.salt)
        manifest_path, skipped, dicom_card, index = dicom.to_manifest(source, os.path.join(out_dir, "dicom"), opts,
                                                                      cfg.dicom.reports, progress)
    row_errors: list[manifest_lib.ManifestError] = []
    rows = manifest_lib.read(manifest_path, row_errors)
    return manifest_path, rows, row_errors, skipped, dicom_card, index, opts


def run(manifest_path: str, out_dir: str, cfg: PrepConfig = PrepConfig(), progress: bool = True) -> PrepResult:
    """Prepares ``manifest_path``: a manifest (CSV / JSONL), or a DICOM folder or DICOMDIR."""
    for p in (manifest_path, out_dir):
        if storage.is_remote(p):
            raise manifest_lib.ManifestError(p, "object storage is read and written by the Beam runner "
                                                "(decipher prep --runner beam); the local pool takes local paths")
    out_dir = os.path.abspath(out_dir)  # the DICOM route's manifest names files under it
    os.makedirs(out_dir, exist_ok=True)
    source = manifest_path
    manifest_path, rows, row_errors, skipped, dicom_card, index, opts = read_source(source, out_dir, cfg, progress)
    cache_dir = os.path.join(out_dir, "cache", cfg.cache_key())
    os.makedirs(cache_dir, exist_ok=True)
    err_path = os.path.join(out_dir, "errors.jsonl")
    errors: list[dict] = []
    statuses = {"processed": 0, "reused": 0}
    workers = cfg.workers or os.cpu_count() or 1
    with open(err_path, "w") as err_file:
        def record(res):
            if res["status"] == "error" and cfg.dicom.pseudonymise and dicom.is_dicom_source(source):
                res = dicom.pseudonymise_item(res, index, opts)  # no DICOM path in errors.jsonl
            if res["status"] == "error":
                errors.append(res)
                err_file.write(json.dumps(res) + "\n")
                err_file.flush()
            else:
                statuses[res["status"]] += 1

        for item in skipped:  # DICOM objects that are not volumes, each with its reason
            err_file.write(json.dumps({"series_id": item.get("series_uid", ""), "status": "skipped", **item}) + "\n")
        for e in row_errors:  # skipped manifest rows: recorded like bad series, named by line and field
            record(_error(e.series_id, e.path, str(e), line=e.line, field=e.field))
        grids, grid_errors = group_studies(rows, cfg)  # the study grids, from the headers
        for e in grid_errors:  # series off their study's grid ("check"): not processed
            record(e)
        off = {e["series_id"] for e in grid_errors}
        todo = [r for r in rows if r.series_id not in off]
        bar = _progress(len(todo), progress)
        if workers == 1:
            for row in todo:
                record(process_row(row, cfg.volume, cache_dir, grids.get(row.series_id)))
                bar.update(1)
        else:
            with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                futs = {ex.submit(process_row, row, cfg.volume, cache_dir, grids.get(row.series_id)): row
                        for row in todo}
                for fut in cf.as_completed(futs):
                    try:
                        res = fut.result()
                    except Exception as e:  # noqa: BLE001 - the worker died (e.g. killed by the OOM killer)
                        row = futs[fut]
                        res = _error(row.series_id, row.image, f"{row.image}: worker failed ({type(e).__name__}: {e}); "
                                                               "rerun to retry")
                    record(res)
                    bar.update(1)
        bar.close()
    bad = {e["series_id"] for e in errors}
    good = [r for r in rows if r.series_id not in bad]
    split_of = assign_splits([r.patient_id for r in good], cfg.split_fractions, cfg.seed)
    by_split = {s: [r for r in good if split_of[r.patient_id] == s] for s in SPLITS}
    tfds_dir = _build_tfds(out_dir, cache_dir, by_split, cfg.compression)
    counts = _write_card(out_dir, cache_dir, cfg, by_split, errors, manifest_path, dicom_card)
    return PrepResult(out_dir, tfds_dir, counts, errors, statuses["processed"], statuses["reused"], skipped)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="prep", unit="series", disable=not enabled, file=sys.stderr)


def _build_tfds(out_dir: str, cache_dir: str, by_split: dict, compression: str, beam_options=None) -> str:
    """Builds the records into ``tfds.staging`` and swaps them in as ``tfds`` (local or remote);
    ``by_split``: each split's rows, or with ``beam_options`` its files of rows (Beam writes)."""
    from data_prep.tfds_builder import build

    final, staging = storage.resolve(out_dir, "tfds"), storage.resolve(out_dir, "tfds.staging")
    if storage.path(staging).exists():
        storage.path(staging).rmtree()
    path = build(staging, cache_dir, {s: rows for s, rows in by_split.items() if rows}, compression, beam_options)
    _swap_in(staging, final)
    return path.replace(staging, final)


def _swap_in(staging: str, final: str) -> None:
    """Swaps the complete new build in; the previous one stays until the new one is whole. (In
    object storage a folder's rename is a copy of each object, not atomic; the old one still goes
    only after the copy.)"""
    if not storage.is_remote(final):
        if os.path.exists(final):
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        os.replace(staging, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
        return
    old = storage.path(final + ".old")
    if old.exists():
        old.rmtree()
    if storage.path(final).exists():
        storage.path(final).rename(old)
    storage.path(staging).rename(final)
    if old.exists():
        old.rmtree()


def series_stats(z) -> dict:
    """What the dataset card summarises of one prepared series (``z``: its cache file)."""
    v = z["volume"].astype(np.float32)
    return {"mean": float(v.mean()), "std": float(v.std()), "orig_spacing": [float(x) for x in z["orig_spacing"]],
            "shape": list(v.shape), "clip": [float(z["clip_lo"]), float(z["clip_hi"])]}


def _write_card(out_dir, cache_dir, cfg: PrepConfig, by_split, errors, manifest_path, dicom_card=None,
                stats: dict | None = None) -> dict:
    """Writes ``dataset_card.json``; ``stats`` (series id -> :func:`series_stats`) when the
    caller has them, else they are read from the cache."""
    counts, summary = {}, {}
    for split, rows in by_split.items():
        counts[split] = {
            "series": len(rows), "studies": len({r.study_id for r in rows}), "patients": len({r.patient_id for r in rows}),
            "body_region": _count(r.body_region for r in rows), "sequence": _count(r.sequence for r in rows),
            "findings": _count(f for r in rows for f in r.findings.split(";") if f),
            "studies_by_sequences": _sequences_per_study(rows),
        }
    per = []
    for rows in by_split.values():
        for r in rows:
            if stats is None:
                with np.load(os.path.join(cache_dir, f"{r.series_id}.npz")) as z:
                    per.append(series_stats(z))
            else:
                per.append(stats[r.series_id])
    if per:
        sp, sh = np.array([s["orig_spacing"] for s in per]), np.array([s["shape"] for s in per])
        cl = np.array([s["clip"] for s in per])
        summary = {
            "stored_intensity": {"mean": float(np.mean([s["mean"] for s in per])),
                                 "std_mean": float(np.mean([s["std"] for s in per]))},
            "raw_clip_range": {"lo": _summ(cl[:, 0]), "hi": _summ(cl[:, 1])},
            "original_spacing_mm": {ax: _summ(sp[:, i]) for i, ax in enumerate("xyz")},
            "stored_shape": {ax: _summ(sh[:, i]) for i, ax in enumerate("xyz")},
        }
    card = {
        "name": DATASET_NAME, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "manifest": storage.absolute(manifest_path), "counts": counts, "statistics": summary,
        "errors": len(errors), "preprocessing": preprocessing_spec(cfg),
        # Where the rows came from: a DICOM scan's files, volumes, skipped objects and pseudonymisation.
        **({"dicom": dicom_card} if dicom_card is not None else {}),
    }
    storage.write_text(storage.resolve(out_dir, "dataset_card.json"), json.dumps(card, indent=1))
    return counts


def preprocessing_spec(cfg: PrepConfig) -> dict:
    """What a model trained on these records expects; stored in the card and in checkpoints."""
    v = cfg.volume
    return {
        "orientation": "RAS (closest canonical, then axis-aligned resampling for oblique affines)",
        "array_axes": "(x, y, z) = (R, A, S) voxel axes; channels added last at load time",
        "target_spacing_mm": list(v.target_spacing), "image_interpolation": "trilinear", "label_interpolation": "nearest",
        "four_d_policy": v.four_d, "intensity": f"clip to percentiles {list(v.clip_percentiles)} "
        f"({'foreground' if v.foreground_only_stats else 'all'} voxels), scale to [0, 1]",
        "stored_dtype": "float16", "record_compression": cfg.compression, "foreground_crop": v.crop_foreground,
        "report_text": "findings + impression sections, NFKC + whitespace normalised; tokenised at load time",
        "split": {"by": "patient_id", "fractions": list(cfg.split_fractions), "seed": cfg.seed},
        "studies": {"mode": cfg.studies or "none", "grid": STUDY_MODES[cfg.studies]},
        "volume_config": dataclasses.asdict(v),
    }


def _sequences_per_study(rows) -> dict:
    """Number of sequences present -> number of studies with that many ({"2": 5, "4": 9}); a
    series without a sequence counts as one of its own."""
    seqs: dict[str, set] = {}
    for r in rows:
        seqs.setdefault(r.study_id, set()).add(r.sequence or ("series", r.series_id))
    n = _count(str(len(v)) for v in seqs.values())
    return dict(sorted(n.items(), key=lambda kv: int(kv[0])))


def _count(items) -> dict:
    out: dict[str, int] = {}
    for i in items:
        out[i or "unknown"] = out.get(i or "unknown", 0) + 1
    return dict(sorted(out.items()))
