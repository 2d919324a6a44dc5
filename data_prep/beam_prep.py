"""``decipher prep --runner beam``: the preparation of :mod:`data_prep.prep` as Apache Beam
pipelines, for corpora that outgrow one machine (TFDS's own engine for large datasets).

The same code runs on the DirectRunner here and on Dataflow, Spark or Flink by pipeline options
(WORKSPACE.md). Two pipelines, with the small global step between them on the driver:

1. **Process.** The manifest's rows are spread over the workers; each series goes through the
   local path's :func:`data_prep.prep.process_row` (the same validation, RAS + resampling,
   normalisation and label handling) into ``cache/<config-hash>/<series>.npz`` under ``--out``. A
   series already in the cache is reused, so a rerun after an interruption does only the rest.
   Each series' status (processed / reused / error with its file and reason, plus the dataset
   card's statistics) comes back to the driver as JSON lines in ``beam/`` (removed once read); a
   bad series never fails the pipeline.
2. The driver reads the statuses, writes ``errors.jsonl`` and draws the patient-level splits
   (:func:`data_prep.prep.assign_splits`, the same function of the seed).
3. **Write.** The TFDS builder with ``beam=True``: Beam reads the cache files, TFDS's Beam writer
   shuffles them by key and writes the ArrayRecord shards (the same hashing, so the same record
   order as the local path), each with the local path's chunk options.
4. The dataset card, from the statistics of step 1 (the driver reads no volume).

``--out`` and the manifest's paths may be ``gs://`` (:mod:`data_prep.storage`): a worker streams
a remote input to a local temporary file and uploads what it writes. A DICOM tree is scanned on
the driver (:func:`data_prep.dicom.to_manifest`) and needs a local ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import tempfile
import uuid

import apache_beam as beam

from data_prep import dicom
from data_prep import manifest as manifest_lib
from data_prep import prep, storage


class _WriteStatuses(beam.DoFn):
    """Each bundle's statuses as one JSON-lines file in ``folder``, written when the bundle ends (a
    retried bundle may leave a second file with the same lines; the driver keys them by series)."""

    def __init__(self, folder: str):
        self.folder = folder

    def start_bundle(self):
        self.lines = []

    def process(self, res):
        self.lines.append(json.dumps(res))

    def finish_bundle(self):
        if self.lines:
            storage.write_text(storage.resolve(self.folder, f"status-{uuid.uuid4().hex}.jsonl"),
                               "".join(x + "\n" for x in self.lines))


def pipeline_options(beam_options: str = "", workers: int = 0):
    """``PipelineOptions`` from a command-line string such as ``"--runner=DataflowRunner
    --project=P --region=R --temp_location=gs://B/tmp"``. Without a runner in it, the
    DirectRunner runs ``workers`` processes (0: one per core; 1: in this process)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = shlex.split(beam_options)
    if not any(f.startswith("--runner") for f in flags):
        n = workers or os.cpu_count() or 1
        flags += ["--runner=DirectRunner"] + (["--direct_running_mode=multi_processing", f"--direct_num_workers={n}"]
                                              if n > 1 else [])
    return PipelineOptions(flags)


class _Process:
    """One series through :func:`data_prep.prep.process_row`, the body of the pipeline's ``Map``.
    Inputs in object storage are streamed to a worker-local folder first; with a remote cache the
    series is prepared locally and uploaded, and a cached series is reused without being
    downloaded. A bad input is a status, never an exception; a storage failure while uploading is
    raised, so that the runner retries the bundle."""

    def __init__(self, vcfg, cache_dir: str):
        self.vcfg, self.cache_dir = vcfg, cache_dir

    def __call__(self, row):
        remote_cache = storage.is_remote(self.cache_dir)
        cached = storage.resolve(self.cache_dir, f"{row.series_id}.npz")
        if remote_cache and storage.path(cached).exists():
            return self._with_stats({"series_id": row.series_id, "status": "reused"}, cached)
        if not remote_cache and not any(storage.is_remote(getattr(row, k)) for k in ("image", "label", "report_file")):
            return self._with_stats(prep.process_row(row, self.vcfg, self.cache_dir), cached)
        with tempfile.TemporaryDirectory(prefix="decipher-prep-") as tmp:
            local, names = {}, {}
            for k in ("image", "label", "report_file"):
                src = getattr(row, k)
                if src and storage.is_remote(src):
                    os.makedirs(os.path.join(tmp, k))
                    what = {"image": "image", "label": "label map", "report_file": "report"}[k]
                    try:
                        local[k] = storage.fetch(src, os.path.join(tmp, k))  # a folder each: names may clash
                    except FileNotFoundError:
                        return prep._error(row.series_id, src, f"{src}: {what} file not found")
                    except OSError as e:
                        return prep._error(row.series_id, src, f"{src}: cannot read the {what} file ({e})")
                    names[local[k]] = src
            work = os.path.join(tmp, "cache") if remote_cache else self.cache_dir
            os.makedirs(work, exist_ok=True)
            res = prep.process_row(dataclasses.replace(row, **local), self.vcfg, work)
            for lp, src in names.items():  # errors name the files the manifest named
                for key in ("file", "reason"):
                    if key in res:
                        res[key] = res[key].replace(lp, src)
            done = os.path.join(work, f"{row.series_id}.npz")
            res = self._with_stats(res, done)  # read here, not back from the bucket
            if res["status"] == "processed" and remote_cache:
                storage.copy(done, cached)
            return res

    @staticmethod
    def _with_stats(res: dict, cached: str) -> dict:
        """The dataset card's statistics of a prepared series, read where it was prepared. A cache
        entry that cannot be read is that series' error (delete it and rerun), not the job's."""
        if res["status"] in ("processed", "reused"):
            import numpy as np

            try:
                with storage.path(cached).open("rb") as f, np.load(f) as z:
                    res["stats"] = prep.series_stats(z)
            except Exception as e:  # noqa: BLE001 - e.g. a truncated file left by another tool
                return prep._error(res["series_id"], cached, f"{cached}: the prepared series cannot be read "
                                   f"({type(e).__name__}: {e}); delete it and rerun")
        return res


def run(manifest_path: str, out_dir: str, cfg: prep.PrepConfig = prep.PrepConfig(), beam_options: str = "",
        progress: bool = True) -> prep.PrepResult:
    """Prepares ``manifest_path`` (a manifest, or a DICOM folder or DICOMDIR) into ``out_dir``
    with Beam; the result, the files written and their contents are those of :func:`prep.run`."""
    if cfg.studies:  # process_row would need each series' study grid, read from the headers on the driver
        raise ValueError(f"PrepConfig.studies={cfg.studies!r}: study grouping is done by the local runner "
                         "(data_prep.prep.run, decipher prep without --runner beam); the Beam runner prepares each "
                         "series on its own grid")
    out_dir = storage.absolute(out_dir)
    remote = storage.is_remote(out_dir)
    if not remote:
        os.makedirs(out_dir, exist_ok=True)
    if dicom.is_dicom_source(manifest_path) and remote:
        raise manifest_lib.ManifestError(manifest_path, "a DICOM tree is scanned on this machine and needs a "
                                         f"local --out (not {out_dir}); prepare to a local folder or a gcsfuse mount")
    manifest_path, rows, row_errors, skipped, dicom_card, index, opts = prep.read_source(manifest_path, out_dir, cfg,
                                                                                         progress)
    cache_dir = storage.resolve(out_dir, f"cache/{cfg.cache_key()}")
    if not remote:
        os.makedirs(cache_dir, exist_ok=True)
    options = pipeline_options(beam_options, cfg.workers)

    # 1. Process every series on the workers; their statuses come back through files.
    work = storage.resolve(out_dir, "beam")
    if storage.path(work).exists():
        storage.path(work).rmtree()
    storage.path(work).mkdir(parents=True)
    with beam.Pipeline(options=options) as p:
        _ = (p | "RowFiles" >> beam.Create(manifest_lib.write_row_files(rows, work, "rows"))
             | "Rows" >> beam.FlatMap(manifest_lib.read_row_file)
             | "Spread" >> beam.Reshuffle() | "Process" >> beam.Map(_Process(cfg.volume, cache_dir))
             | "Statuses" >> beam.ParDo(_WriteStatuses(work)))
    statuses = {}
    for f in sorted(storage.path(work).glob("status-*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                res = json.loads(line)
                statuses[res["series_id"]] = res

    # 2. errors.jsonl (manifest order) and the splits, as the local path writes them.
    errors: list[dict] = []
    lines = [json.dumps({"series_id": it.get("series_uid", ""), "status": "skipped", **it}) for it in skipped]
    for e in row_errors:
        errors.append(prep._error(e.series_id, e.path, str(e), line=e.line, field=e.field))
    for r in rows:
        res = statuses.get(r.series_id) or prep._error(r.series_id, r.image, f"{r.image}: no status came back from "
                                                       "the pipeline; rerun to retry")
        if res["status"] == "error":
            errors.append({k: v for k, v in res.items() if k != "stats"})
    if cfg.dicom.pseudonymise and index is not None:
        errors = [dicom.pseudonymise_item(e, index, opts) for e in errors]
    storage.write_text(storage.resolve(out_dir, "errors.jsonl"),
                       "".join(x + "\n" for x in lines + [json.dumps(e) for e in errors]))
    bad = {e["series_id"] for e in errors}
    good = [r for r in rows if r.series_id not in bad]
    split_of = prep.assign_splits([r.patient_id for r in good], cfg.split_fractions, cfg.seed)
    by_split = {s: [r for r in good if split_of[r.patient_id] == s] for s in prep.SPLITS}

    # 3. The shards, written by TFDS's Beam writer.
    row_files = {s: manifest_lib.write_row_files(r, work, f"{s}-rows") for s, r in by_split.items() if r}
    tfds_dir = prep._build_tfds(out_dir, cache_dir, row_files, cfg.compression, beam_options=options)
    storage.path(work).rmtree()  # errors.jsonl and the card keep what the statuses said
    # 4. The card, from the workers' statistics.
    counts = prep._write_card(out_dir, cache_dir, cfg, by_split, errors, manifest_path, dicom_card,
                              stats={sid: s["stats"] for sid, s in statuses.items() if "stats" in s})
    n = {k: sum(s["status"] == k for s in statuses.values()) for k in ("processed", "reused")}
    return prep.PrepResult(out_dir, tfds_dir, counts, errors, n["processed"], n["reused"], skipped)
