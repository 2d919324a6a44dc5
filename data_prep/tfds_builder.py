"""The TFDS builder that writes prepared series as ArrayRecord shards (no TensorFlow needed).

Outside a dataset package, ``DatasetInfo`` is built directly (``dataset_info_from_configs``
fails there). Readers need only the directory:
``tfds.builder_from_directory(path).as_data_source("train")``.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from data_prep.schema import DATASET_NAME, FORMAT_VERSION, METADATA, RECORD, Field

ENCODINGS = {"none": tfds.features.Encoding.BYTES, "zlib": tfds.features.Encoding.ZLIB}
# ArrayRecord chunk options per setting. TFDS writes zstd:3 chunks, so even "raw" volumes were
# decompressed on every read (3.6 ms for a 2 M-voxel record, against 1.4 ms uncompressed).
RECORD_OPTIONS = {"none": "group_size:1,uncompressed"}


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


class DecipherMri(tfds.core.GeneratorBasedBuilder):
    """Prepared MRI series with reports, label maps and metadata."""

    VERSION = tfds.core.Version(FORMAT_VERSION)

    def __init__(self, *, cache_dir: str, rows_by_split: dict, compression: str = "none", **kwargs):
        self._cache_dir = cache_dir
        self._rows_by_split = rows_by_split
        self._compression = compression
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=features(self._compression),
                                     description="Decipher-MR prepared series (see dataset_card.json).")

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(rows) for split, rows in self._rows_by_split.items()}

    def _generate_examples(self, rows):
        # The manifest's metadata comes from the row; the rest, made by prep, from the series' cache file.
        for r in rows:
            with np.load(os.path.join(self._cache_dir, f"{r.series_id}.npz")) as z:
                ex = {f.name: _value(f, getattr(r, f.name) if f.name in METADATA else z[f.name]) for f in RECORD}
            yield r.series_id, ex


def build(data_dir: str, cache_dir: str, rows_by_split: dict, compression: str = "none") -> str:
    """Writes the dataset under ``data_dir``; returns the versioned dataset directory."""
    b = DecipherMri(cache_dir=cache_dir, rows_by_split=rows_by_split, compression=compression, data_dir=data_dir,
                    file_format="array_record")
    assert b.name == DATASET_NAME
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    if compression in RECORD_OPTIONS:
        for f in sorted(os.listdir(b.data_dir)):
            if ".array_record-" in f:
                rewrite_records(os.path.join(b.data_dir, f), RECORD_OPTIONS[compression])
    return b.data_dir


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
