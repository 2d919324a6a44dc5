"""The TFDS builder that writes prepared series as ArrayRecord shards (no TensorFlow needed).

Outside a dataset package, ``DatasetInfo`` is built directly (``dataset_info_from_configs``
fails there). Readers need only the directory:
``tfds.builder_from_directory(path).as_data_source("train")``.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from data_prep import storage
from data_prep.schema import DATASET_NAME, FORMAT_VERSION, METADATA, RECORD, Field

ENCODINGS = {"none": tfds.features.Encoding.BYTES, "zlib": tfds.features.Encoding.ZLIB}
# ArrayRecord chunk options per setting. TFDS writes zstd:3 chunks, so even "raw" volumes were
# decompressed on every read (3.6 ms for a 2 M-voxel record, against 1.4 ms uncompressed).
RECORD_OPTIONS = {"none": "group_size:1,uncompressed", "zlib": "group_size:1"}


def features(compression: str = "none") -> tfds.features.FeaturesDict:
    """The record's TFDS features, one per :data:`data_prep.schema.RECORD` field."""
    # "none" stores raw bytes: decoding is a copy. zlib halves the size of MRI float16 volumes
    # but costs ~16 ms per 2 M-voxel record on one core (benchmarks/loader.py).
    return tfds.features.FeaturesDict({f.name: _feature(f, ENCODINGS[compression]) for f in RECORD})


def _feature(f: Field, encoding):
    if f.kind == "volume":
        return tfds.features.Tensor(dtype=f.dtype, shape=(None, None, None), encoding=encoding)
    if f.kind == "tensor":
        return tfds.features.Tensor(dtype=f.dtype, shape=f.shape)
    if f.kind == "scalar":
        return tfds.features.Scalar(dtype=f.dtype)
    return tfds.features.Text()


def _value(f: Field, v):
    """``v`` as field ``f`` stores it."""
    if f.kind in ("volume", "tensor"):
        return np.asarray(v).astype(f.dtype, copy=False)
    return f.dtype(v) if f.kind == "scalar" else str(v)


def example(cache_dir: str, row) -> tuple[str, dict]:
    """``(key, example)`` of one series: the manifest's metadata from ``row``, the rest, made by
    prep, from the series' cache file (local or remote)."""
    p = storage.resolve(cache_dir, f"{row.series_id}.npz")
    with (storage.path(p).open("rb") if storage.is_remote(p) else open(p, "rb")) as fh, np.load(fh) as z:
        ex = {f.name: _value(f, getattr(row, f.name) if f.name in METADATA else z[f.name]) for f in RECORD}
    return row.series_id, ex


class RecordWriter(tfds.core.writer.ExampleWriter):
    """Writes each ArrayRecord shard with the chunk options of :data:`RECORD_OPTIONS` (TFDS's own
    writer fixes ``group_size:1`` with zstd chunks). A shard bound for object storage, which the
    ArrayRecord writer cannot open, is written to a local temporary file and streamed up."""

    def __init__(self, options: str):
        super().__init__(tfds.core.file_adapters.FileFormat.ARRAY_RECORD)
        self.options = options

    def write(self, path, examples):
        from array_record.python import array_record_module as arm

        path = os.fspath(path)
        with tempfile.TemporaryDirectory(prefix="decipher-shard-") as tmp:
            local = os.path.join(tmp, "shard") if storage.is_remote(path) else path
            w = arm.ArrayRecordWriter(local, self.options)
            try:
                for _, serialized in examples:
                    w.write(serialized)
            finally:
                w.close()
            if local != path:
                storage.copy(local, path)
        return None


class DecipherMri(tfds.core.GeneratorBasedBuilder):
    """Prepared MRI series with reports, label maps and metadata. With ``beam=True`` the examples
    are a Beam transform: TFDS runs them, shuffles and writes the shards on the runner that
    ``download_and_prepare``'s ``DownloadConfig(beam_options=...)`` names, and ``rows_by_split``
    holds files of rows rather than rows."""

    VERSION = tfds.core.Version(FORMAT_VERSION)

    def __init__(self, *, cache_dir: str, rows_by_split: dict, compression: str = "none", beam: bool = False,
                 **kwargs):
        self._cache_dir = cache_dir
        self._rows_by_split = rows_by_split
        self._compression = compression
        self._beam = beam
        super().__init__(**kwargs)

    def _example_writer(self):
        return RecordWriter(RECORD_OPTIONS[self._compression])

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=features(self._compression),
                                     description="Decipher-MR prepared series (see dataset_card.json).")

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(rows) for split, rows in self._rows_by_split.items()}

    def _generate_examples(self, rows):
        if self._beam:  # ``rows``: files of rows (data_prep.manifest.write_row_files), so the graph carries paths
            import apache_beam as beam

            from data_prep.manifest import read_row_file

            return (beam.Create(list(rows)) | beam.FlatMap(read_row_file) | beam.Reshuffle()  # spread over the workers
                    | beam.Map(lambda r, d=self._cache_dir: example(d, r)))
        return (example(self._cache_dir, r) for r in rows)


def build(data_dir: str, cache_dir: str, rows_by_split: dict, compression: str = "none", beam_options=None) -> str:
    """Writes the dataset under ``data_dir`` (local or remote); returns the versioned dataset
    directory. With ``beam_options`` (``PipelineOptions``, which name the runner) the examples are
    read, shuffled and written as shards by a Beam pipeline."""
    b = DecipherMri(cache_dir=cache_dir, rows_by_split=rows_by_split, compression=compression,
                    beam=beam_options is not None, data_dir=data_dir, file_format="array_record")
    assert b.name == DATASET_NAME
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False, beam_options=beam_options))
    return os.fspath(b.data_dir)


def rewrite_records(path: str, options: str, chunk: int = 16) -> None:
    """Rewrites an ArrayRecord file with new writer ``options`` (same records, same order),
    streaming ``chunk`` records at a time; the file is replaced only once the copy is whole."""
    from array_record.python import array_record_module as arm

    reader = arm.ArrayRecordReader(path)
    tmp = path + ".rewrite"
    writer = arm.ArrayRecordWriter(tmp, options)
    try:
        n = reader.num_records()
        for start in range(0, n, chunk):
            for rec in reader.read(start, min(start + chunk, n)):
                writer.write(rec)
    finally:
        reader.close()
        writer.close()
    os.replace(tmp, path)
