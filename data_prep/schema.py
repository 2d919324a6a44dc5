"""The prepared-dataset format, spelled out once: the manifest's columns, the fields of a record
and the part of a record the decoder hands on. The manifest parser and writer, the TFDS
features, the decoder and the evaluations' metadata all derive from these tables, so a field
added here reaches every one of them. Imports nothing of the project: ``prep``, the TFDS
builder and the loaders share it without importing each other."""

from __future__ import annotations

import dataclasses

import numpy as np

DATASET_NAME = "decipher_mri"
# 1.1: series_description; 1.2: uint16 label maps (label ids above 255 kept); 1.3: role; 1.4: modality,
# field_strength (read from DICOM)
FORMAT_VERSION = "1.4.0"
LABEL_DTYPE = np.uint16  # FreeSurfer aseg ids go to 2035; prep refuses labels that do not fit

# -- the manifest ------------------------------------------------------------------------------

TEMPLATE = "template"
# "": a patient's series. "template": an atlas or template volume, whose label map holds tissue
# classes rather than lesions (the lesion task leaves it out).
ROLES = ("", TEMPLATE)

_PATH = {"path": True}  # a file, relative to the manifest's folder unless absolute


@dataclasses.dataclass(frozen=True)
class SeriesRow:
    """One manifest row as the parser returns it (paths absolute, ``age`` in years). The fields are
    the manifest's columns, in the order the corpus writers write them; those without a default
    are required."""

    series_id: str
    study_id: str
    patient_id: str
    image: str = dataclasses.field(metadata=_PATH)
    label: str = dataclasses.field(default="", metadata=_PATH)  # a label map on the image's grid
    report: str = ""  # the report's text, or else
    report_file: str = dataclasses.field(default="", metadata=_PATH)  # a UTF-8 file holding it
    series_description: str = ""  # DICOM SeriesDescription as the scanner wrote it ("AX T2 FLAIR")
    sequence: str = ""
    body_region: str = ""
    age: float = float("nan")  # years; the manifest may give a DICOM age string (045Y, 006M)
    sex: str = ""
    findings: str = ""  # ";"-separated labels
    role: str = ""  # one of ROLES
    modality: str = ""  # DICOM Modality ("MR", "CT")
    field_strength: str = ""  # tesla, as DICOM MagneticFieldStrength gives it ("1.5", "3")


MANIFEST_COLUMNS = tuple(f.name for f in dataclasses.fields(SeriesRow))
REQUIRED = tuple(f.name for f in dataclasses.fields(SeriesRow) if f.default is dataclasses.MISSING)
PATHS = tuple(f.name for f in dataclasses.fields(SeriesRow) if f.metadata.get("path"))
# Columns prep turns into other fields (the volume, the label map, the report text); every other
# column is copied into the record as it is.
PREP_INPUTS = ("image", "label", "report", "report_file")
METADATA = tuple(c for c in MANIFEST_COLUMNS if c not in PREP_INPUTS)

# -- the record --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a record. ``kind``: "volume" (a 3D array of any size), "tensor" (of ``shape``),
    "scalar" or "text"."""

    name: str
    kind: str
    dtype: type = str
    shape: tuple = ()


RECORD = (
    Field("volume", "volume", np.float16),  # RAS voxel order, intensities scaled to [0, 1]
    Field("label", "volume", LABEL_DTYPE),  # without a label map, 2^3 zeros (prep.process_row says why)
    Field("has_label", "scalar", np.bool_),
    Field("has_report", "scalar", np.bool_),
    Field("affine", "tensor", np.float32, (4, 4)),
    Field("spacing", "tensor", np.float32, (3,)),
    Field("orig_spacing", "tensor", np.float32, (3,)),
    Field("report", "text"),  # findings + impression, normalised; "" without a report
    Field("report_full", "text"),  # the whole report, normalised
    *(Field(c, "scalar", np.float32) if c == "age" else Field(c, "text") for c in METADATA),
)
FIELDS = {f.name: f for f in RECORD}

# What the decoder returns with the image (and the label map): the series' metadata and the
# clinical report; the evaluations keep the same fields per row.
DECODED = METADATA + ("report",)
