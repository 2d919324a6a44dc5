"""Paths that may be local or in object storage (``gs://``, ``s3://``, ``az://``), through
``etils.epath`` as TFDS does (on fsspec: ``gcsfs`` for ``gs://``, or ``tf.io.gfile`` when
TensorFlow is installed).

The readers that need a local file (nibabel's NIfTI loader, ArrayRecord's C++ writer and reader,
which cannot open ``gs://``: google/array_record#120, tensorflow/datasets#10981) are handed a
streamed local copy; memory stays one copy buffer whatever the file's size. On a TPU VM, a
``gcsfuse`` mount makes a bucket a local path and none of this is needed.
"""

from __future__ import annotations

import os
import shutil

from etils import epath

SCHEMES = ("gs://", "s3://", "az://")
COPY_BUFFER = 8 << 20


def is_remote(path: str) -> bool:
    return str(path).startswith(SCHEMES)


def path(p: str) -> epath.Path:
    return epath.Path(p)


def resolve(base: str, p: str) -> str:
    """``p`` relative to the folder ``base`` (local or remote), unless absolute or remote itself."""
    if is_remote(p) or os.path.isabs(p):
        return p
    return f"{base.rstrip('/')}/{p}" if is_remote(base) else os.path.join(base, p)


def absolute(p: str) -> str:
    return p if is_remote(p) else os.path.abspath(p)


def copy(src: str, dst: str) -> None:
    """Streams ``src`` to ``dst`` (either side local or remote) in fixed-size chunks. A remote object
    appears only once its upload is finalised, so a reader never sees half of one; a local ``dst``
    is written beside itself and renamed into place."""
    tmp = dst if is_remote(dst) else dst + ".part"
    with path(src).open("rb") as fi, path(tmp).open("wb") as fo:
        shutil.copyfileobj(fi, fo, COPY_BUFFER)
    if tmp != dst:
        os.replace(tmp, dst)


def fetch(src: str, folder: str) -> str:
    """A local copy of ``src`` inside ``folder`` under its own file name (its extension, which
    nibabel reads, kept); a local ``src`` is returned as it is."""
    if not is_remote(src):
        return src
    dst = os.path.join(folder, str(src).rstrip("/").rsplit("/", 1)[-1])
    copy(src, dst)
    return dst


def write_text(p: str, text: str) -> None:
    """Writes ``text`` to ``p`` whole: a local file through a rename, a remote object on finalise."""
    if is_remote(p):
        path(p).write_text(text)
        return
    with open(p + ".tmp", "w") as f:
        f.write(text)
    os.replace(p + ".tmp", p)
