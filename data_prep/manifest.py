"""Reading and writing the prep manifest (CSV or JSONL), one row per series.

Required: ``series_id, study_id, patient_id, image``. Optional: ``label`` (label-map path),
``report`` (text) or ``report_file`` (path), ``series_description`` (the DICOM
SeriesDescription as the scanner wrote it, e.g. "AX T2 FLAIR"; stage 2 can pair each series with
it and its study's report), ``sequence``, ``body_region``, ``age``, ``sex``, ``findings``
(``;``-separated labels), ``role`` (empty for a patient's series, ``template`` for an atlas or
template volume: its label map holds tissue classes, so the lesion task leaves it out). Relative
paths are relative to the manifest's folder; the manifest and its paths may be in object storage
(``gs://``: :mod:`data_prep.storage`, read by ``--runner beam``). UTF-8 (a BOM is fine); ``age``
is in years or a DICOM age string (``045Y``, ``006M``, ``003W``, ``010D``). The columns are
:data:`data_prep.schema.MANIFEST_COLUMNS`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re

from data_prep import reports, storage
from data_prep.schema import MANIFEST_COLUMNS, PATHS, REQUIRED, ROLES, SeriesRow


class ManifestError(ValueError):
    """A manifest problem, naming the file and, for one row, its line and field."""

    def __init__(self, path: str, reason: str, line: int | None = None, field: str = "", series_id: str = ""):
        super().__init__(path, reason, line, field, series_id)  # all in args: it pickles
        self.path, self.reason, self.line, self.field, self.series_id = path, reason, line, field, series_id

    def __str__(self) -> str:
        line = f": line {self.line}" if self.line else ""
        return f"{self.path}{line}{f': field {self.field!r}' if self.field else ''}: {self.reason}"


MAX_ID_BYTES = 200  # the id names a cache file (plus ".npz.tmp.npz"); file systems allow 255 bytes


def id_problem(series_id: str) -> str | None:
    """Why ``series_id`` cannot be used as a file name inside the cache, or None. Dots are fine
    (DICOM UIDs), but not a leading one or ``..``."""
    if not series_id:
        return "is empty"
    if "/" in series_id or "\\" in series_id:
        return "contains a path separator"
    if series_id.startswith(".") or ".." in series_id:
        return "starts with a dot or contains '..'"
    if any(ord(c) < 32 or ord(c) == 127 for c in series_id):
        return "contains a control character"
    try:
        if len(series_id.encode()) > MAX_ID_BYTES:
            return f"is longer than {MAX_ID_BYTES} bytes"
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return "is not valid Unicode"
    return None


_DICOM_AGE = re.compile(r"(\d+)([DWMY])", re.IGNORECASE)  # DICOM AS: 045Y, 006M, 003W, 010D
_DAYS_PER_YEAR = 365.25


def parse_age(text: str) -> float:
    """Years from a number or a DICOM age string; NaN when blank. Raises ValueError."""
    text = text.strip()
    if text in ("", "nan", "NaN", "None"):
        return float("nan")
    if m := _DICOM_AGE.fullmatch(text):
        n, unit = int(m[1]), m[2].upper()
        return {"D": n / _DAYS_PER_YEAR, "W": n * 7 / _DAYS_PER_YEAR, "M": n / 12, "Y": float(n)}[unit]
    try:
        age = float(text)
    except ValueError:
        age = float("nan")
    if not (math.isfinite(age) and age >= 0):
        raise ValueError(f"cannot read {text!r} as an age (years, or DICOM AS such as 045Y / 006M)")
    return age


def read(path: str, errors: list[ManifestError] | None = None) -> list[SeriesRow]:
    """The manifest's rows. A problem with the file (unreadable, not UTF-8, malformed JSON or CSV,
    no rows, a required column absent, a duplicated series_id) raises :class:`ManifestError`. A
    problem with one row (a required value empty, an unparseable age, a series_id unsafe as a file
    name) skips that row and is appended to ``errors`` (a batch job records it and goes on), or
    raised when ``errors`` is None."""
    try:
        with (storage.path(path).open("rb") if storage.is_remote(path) else open(path, "rb")) as f:
            text = reports.decode_utf8(f.read(), "manifest")  # a BOM (Excel "CSV UTF-8") is dropped
    except OSError as e:
        raise ManifestError(path, f"cannot read the manifest ({e.strerror or e})") from None
    except ValueError as e:
        raise ManifestError(path, str(e)) from None
    base = path.rsplit("/", 1)[0] if storage.is_remote(path) else os.path.dirname(os.path.abspath(path))
    raw: list[tuple[int, dict]] = []
    if path.endswith((".jsonl", ".json")):
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is valid inside JSON strings
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(path, f"malformed JSON ({e.msg} at column {e.colno})", n) from None
            if not isinstance(r, dict):
                raise ManifestError(path, f"expected a JSON object, found {type(r).__name__}", n)
            raw.append((n, r))
        columns = set().union(*(r for _, r in raw))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            raw = [(reader.line_num, r) for r in reader]
        except csv.Error as e:
            raise ManifestError(path, f"malformed CSV ({e})", reader.line_num) from None
        columns = set(reader.fieldnames or ())
    if not raw:
        raise ManifestError(path, "the manifest has no rows")
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ManifestError(path, f"missing required column(s) {missing}; have {sorted(columns)}")
    first: dict[str, int] = {}
    for n, r in raw:
        sid = "" if r.get("series_id") is None else str(r["series_id"])
        if sid in first and sid:
            raise ManifestError(path, f"series_id {sid!r} is duplicated (first on line {first[sid]})", n, "series_id")
        first.setdefault(sid, n)
    rows = []
    for n, r in raw:
        try:
            rows.append(_row(r, base, path, n))
        except ManifestError as e:
            if errors is None:
                raise
            errors.append(e)
    return rows


def _row(r: dict, base: str, path: str, line: int) -> SeriesRow:
    kw = {k: ("" if v is None else str(v)) for k, v in r.items() if k in MANIFEST_COLUMNS}
    sid = kw.get("series_id", "")
    for k in REQUIRED:
        if not kw.get(k, "").strip():
            raise ManifestError(path, "required value is missing or empty", line, k, sid)
    if problem := id_problem(sid):
        raise ManifestError(path, f"series_id {sid!r} {problem}; it names a cache file", line, "series_id", sid)
    if kw.get("role", "") not in ROLES:
        raise ManifestError(path, f"unknown role {kw['role']!r}; expected one of {ROLES}", line, "role", sid)
    for k in PATHS:
        if kw.get(k):
            kw[k] = storage.resolve(base, kw[k])
    try:
        age = parse_age(kw.pop("age", ""))
    except ValueError as e:
        raise ManifestError(path, str(e), line, "age", sid) from None
    return SeriesRow(**kw, age=age)


def write(path: str, rows: list[dict]) -> str:
    """Writes ``rows`` (dicts keyed by column; a missing column is left empty) as a CSV manifest
    with every column of the schema; returns ``path``."""
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)  # a reader never sees half a manifest
    return path


ROWS_PER_FILE = 1000  # rows per file handed to the workers (a 203k-series manifest: 204 files)


def write_row_files(rows, folder: str, name: str) -> list[str]:
    """Parsed ``rows`` as JSON-lines files ``<name>-NNNNN.jsonl`` under ``folder`` (local or
    remote), :data:`ROWS_PER_FILE` each; returns their paths. The Beam pipelines read them on the
    workers, so a job's graph carries file names rather than the whole manifest (Dataflow caps the
    size of a job's request)."""
    paths = []
    for i in range(0, max(len(rows), 1), ROWS_PER_FILE):
        p = storage.resolve(folder, f"{name}-{i // ROWS_PER_FILE:05d}.jsonl")
        storage.write_text(p, "".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in rows[i: i + ROWS_PER_FILE]))
        paths.append(p)
    return paths


def read_row_file(path: str):
    """The rows of one file of :func:`write_row_files`."""
    with storage.path(path).open("r") as f:
        for line in f:
            if line.strip():
                yield SeriesRow(**json.loads(line))
