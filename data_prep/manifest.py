"""Reading the prep manifest (CSV or JSONL), one row per series.

Required: ``series_id, study_id, patient_id, image``. Optional: ``label`` (label-map path),
``report`` (text) or ``report_file`` (path), ``series_description`` (the DICOM
SeriesDescription as the scanner wrote it, e.g. "AX T2 FLAIR"; stage 2 can pair each series with
it and its study's report), ``sequence``, ``body_region``, ``age``, ``sex``, ``findings``
(``;``-separated labels). Relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

REQUIRED = ("series_id", "study_id", "patient_id", "image")


@dataclasses.dataclass(frozen=True)
class SeriesRow:
    series_id: str
    study_id: str
    patient_id: str
    image: str
    label: str = ""
    report: str = ""
    report_file: str = ""
    series_description: str = ""
    sequence: str = ""
    body_region: str = ""
    age: float = float("nan")
    sex: str = ""
    findings: str = ""


def read(path: str) -> list[SeriesRow]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    if path.endswith((".jsonl", ".json")):
        with open(path) as f:
            raw = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path, newline="") as f:
            raw = list(csv.DictReader(f))
    if not raw:
        raise ValueError(f"{path}: the manifest has no rows")
    missing = [c for c in REQUIRED if c not in raw[0]]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; have {sorted(raw[0])}")
    fields = {f.name for f in dataclasses.fields(SeriesRow)}
    rows, seen = [], set()
    for i, r in enumerate(raw):
        kw = {k: ("" if v is None else v) for k, v in r.items() if k in fields}
        for k in ("image", "label", "report_file"):
            if kw.get(k) and not os.path.isabs(kw[k]):
                kw[k] = os.path.join(base, kw[k])
        age = str(kw.get("age", "")).strip()
        kw["age"] = float(age) if age not in ("", "nan", "NaN", "None") else float("nan")
        kw = {k: (v if k == "age" else str(v)) for k, v in kw.items()}
        row = SeriesRow(**kw)
        if not row.series_id or row.series_id in seen:
            raise ValueError(f"{path}: row {i + 2}: series_id {row.series_id!r} is empty or duplicated")
        seen.add(row.series_id)
        rows.append(row)
    return rows
