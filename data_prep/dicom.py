"""DICOM in: a folder tree (or a DICOMDIR) -> volumes, one per series, with their tags.

:func:`scan` reads every file's header once (never its pixels), groups the images into volumes
and writes, for each usable volume, a small series file (``<id>.dcmseries.json``: the frames in
slice order) that :func:`load_series` turns into voxels and an affine. ``decipher prep`` does
this when it is given a DICOM folder instead of a manifest; ``decipher embed`` does the same for
new files, so a scan is read by exactly the code that prepared the training data.

Geometry follows the standard (PS3.3 C.7.6.2; dcm2niix is the converter the tests compare to):
``ImageOrientationPatient`` holds the row direction X (along increasing column index) then the
column direction Y, in LPS; ``PixelSpacing`` is (between rows, between columns); voxel
(column i, row j, slice k) sits at ``IPP_0 + i*dc*X + j*dr*Y + k*ds*N`` with ``N = X x Y``,
slices sorted by ``IPP . N`` and ``ds`` measured between consecutive positions
(``SliceThickness`` is not the spacing). RAS = diag(-1, -1, 1) LPS. Pixel values go through
``RescaleSlope`` / ``RescaleIntercept`` (per frame for enhanced objects).

A DICOM series may hold several volumes: frames are split by orientation, matrix and spacing,
echo time, diffusion b-value and temporal position, and, where positions still repeat, by
acquisition number. A volume whose slices are unevenly spaced (a gap, missing files) or sheared
(gantry tilt) is refused and reported, not guessed. Non-image objects (SR, RTSTRUCT,
presentation states), projection images without patient geometry, localisers and volumes with
too few slices are skipped, each with its reason.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
import json
import math
import os
import re
from collections import defaultdict

import numpy as np
from pydicom.multival import MultiValue

from data_prep import reports as reports_lib
from data_prep.errors import BadInput

SERIES_SUFFIX = ".dcmseries.json"  # a DICOM volume's frames in slice order, which data_prep.volume.load reads
SERIES_FORMAT = "decipher-dicom-series/1"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOL = 1e-3  # direction cosines that differ by less are the same orientation
SPACING_TOL = 0.01  # relative spread of slice gaps beyond which spacing is not uniform
TILT_TOL_DEG = 0.2  # slice offsets this far off the slice normal are a sheared (tilted) stack
MAX_HEADER_BYTES = 1 << 20  # element values above this are left unread in the header scan

# SOP classes of objects that carry no image (the volume scan skips them by name).
_NON_IMAGE = ("Structured Report", " SR ", "SR Storage", "RT Structure Set", "Presentation State", "Raw Data",
              "Key Object Selection", "Encapsulated", "Waveform", "Spectroscopy", "Segmentation",
              "Registration", "Media Storage Directory", "Surface", "Measurement", "Real World Value",
              "Plan Storage", "Treatment")


def _sop_name(ds) -> str:
    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    return getattr(uid, "name", str(uid or "unknown SOP class"))


@dataclasses.dataclass(frozen=True)
class Frame:
    """One 2D image of a volume: a single-frame file (``frame`` None) or one frame of a multi-frame
    object, with its geometry and pixel value mapping."""

    file: str
    frame: int | None
    ipp: tuple[float, float, float]
    iop: tuple[float, ...]
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    cols: int
    slope: float = 1.0
    intercept: float = 0.0
    echo: float | None = None
    bvalue: float | None = None
    temporal: int | None = None
    acquisition: int | None = None
    instance: int = 0


@dataclasses.dataclass
class Volume:
    """The frames of one volume in slice order, and the tags it goes into the manifest with."""

    key: tuple
    frames: list[Frame]
    tags: dict
    series_id: str = ""


@dataclasses.dataclass(frozen=True)
class ScanOptions:
    min_slices: int = 8
    max_voxels: int = 512**3
    pseudonymise: bool = False
    salt: str = ""


# -- reading headers --------------------------------------------------------------------------

def _floats(v, n: int) -> tuple[float, ...] | None:
    """``n`` finite floats from a DICOM value (a multi-value or one number), else None."""
    if v is None:
        return None
    try:
        out = tuple(float(x) for x in (v if isinstance(v, (list, tuple, MultiValue)) else [v]))
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(x) for x in out) else None


def _num(v, cast=float):
    try:
        return None if v is None or v == "" else cast(v)
    except (TypeError, ValueError):
        return None


def _item(ds, seq: str):
    s = ds.get(seq)
    return s[0] if s is not None and len(s) else None


def _fg(per, shared, seq: str, attr: str):
    """An attribute of a functional group, per frame first, then shared."""
    for group in (per, shared):
        if group is not None and (item := _item(group, seq)) is not None and attr in item:
            return item.get(attr)
    return None


def _frames_of(path: str, ds) -> list[Frame]:
    """The frames of one image object, with their geometry. Raises :class:`BadInput` naming
    what is missing."""
    rows, cols = _num(ds.get("Rows"), int), _num(ds.get("Columns"), int)
    if not rows or not cols or rows < 1 or cols < 1:
        raise BadInput(path, f"image matrix Rows={ds.get('Rows')!r} Columns={ds.get('Columns')!r} is not usable")
    n = _num(ds.get("NumberOfFrames"), int) or 1
    if n < 1:
        raise BadInput(path, f"NumberOfFrames={ds.get('NumberOfFrames')!r} is not usable")
    common = dict(rows=rows, cols=cols, acquisition=_num(ds.get("AcquisitionNumber"), int),
                  instance=_num(ds.get("InstanceNumber"), int) or 0)
    per_seq, shared_seq = ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")
    if per_seq is not None:  # enhanced multi-frame: geometry per frame, in functional groups
        if len(per_seq) != n:
            raise BadInput(path, f"PerFrameFunctionalGroupsSequence has {len(per_seq)} items for {n} frames")
        shared = shared_seq[0] if shared_seq is not None and len(shared_seq) else None
        out = []
        for f, per in enumerate(per_seq):
            ipp = _floats(_fg(per, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
            iop = _floats(_fg(per, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
            sp = _floats(_fg(per, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
            if ipp is None or iop is None or sp is None:
                raise BadInput(path, f"frame {f + 1}: no plane position, orientation or pixel spacing in the "
                                     "functional groups (no patient geometry)")
            slope = _num(_fg(per, shared, "PixelValueTransformationSequence", "RescaleSlope"))
            intercept = _num(_fg(per, shared, "PixelValueTransformationSequence", "RescaleIntercept"))
            content = _item(per, "FrameContentSequence")
            out.append(Frame(path, f, ipp, iop, sp, slope=1.0 if slope is None else slope,
                             intercept=intercept or 0.0,
                             echo=_num(_fg(per, shared, "MREchoSequence", "EffectiveEchoTime")),
                             bvalue=_num(_fg(per, shared, "MRDiffusionSequence", "DiffusionBValue")),
                             temporal=_num(content.get("TemporalPositionIndex"), int) if content is not None else None,
                             **common))
        return out
    ipp, iop = _floats(ds.get("ImagePositionPatient"), 3), _floats(ds.get("ImageOrientationPatient"), 6)
    sp = _floats(ds.get("PixelSpacing"), 2)
    if (ipp is None or iop is None) and n > 1 and "Enhanced" in _sop_name(ds):
        raise BadInput(path, f"an enhanced multi-frame object ({n} frames) without functional groups: no per-frame "
                             "position or orientation (no patient geometry)")
    if ipp is None or iop is None or sp is None:
        what = [k for k, v in (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop),
                               ("PixelSpacing", sp)) if v is None]
        raise BadInput(path, f"no patient geometry ({', '.join(what)} missing): a {ds.get('Modality', '?')} "
                             f"{_sop_name(ds)} object is not a cross-sectional image")
    if n > 1:
        raise BadInput(path, f"a multi-frame {_sop_name(ds)} object with {n} frames and no per-frame geometry")
    slope, intercept = _num(ds.get("RescaleSlope")), _num(ds.get("RescaleIntercept"))
    bval = _num(ds.get("DiffusionBValue"))
    return [Frame(path, None, ipp, iop, sp, slope=1.0 if slope is None else slope, intercept=intercept or 0.0,
                  echo=_num(ds.get("EchoTime")), bvalue=bval,
                  temporal=_num(ds.get("TemporalPositionIdentifier"), int), **common)]


_REGIONS = {  # BodyPartExamined (CS, upper case) -> the corpus's body regions
    "HEAD": "brain", "BRAIN": "brain", "SKULL": "brain", "HEADNECK": "brain",
    "KNEE": "knee", "LEG": "knee",
    "SPINE": "spine", "CSPINE": "spine", "TSPINE": "spine", "LSPINE": "spine", "CTSPINE": "spine",
    "TLSPINE": "spine", "LSSPINE": "spine", "SSPINE": "spine", "NECK": "spine",
    "ABDOMEN": "abdomen", "LIVER": "abdomen", "KIDNEY": "abdomen", "ABDOMENPELVIS": "abdomen",
}


def body_region(body_part: str) -> str:
    """The corpus's region name for a BodyPartExamined value; other values lower-cased as they are."""
    key = re.sub(r"[^A-Z]", "", body_part.upper())
    return _REGIONS.get(key, body_part.strip().lower())


# (pattern over the description and sequence names, sequence), first match wins: diffusion, then
# an explicit T1 token ("T1 FLAIR" and Siemens "t1_tse" are T1-weighted), FLAIR, an explicit T2
# token, and only then the readout names that usually go with a contrast.
_SEQ_HINTS = (
    (r"dwi|diff|ep2d_diff|trace|\badc\b|b ?1000", "DWI"),
    (r"(?<![a-z0-9])t1(?![0-9])", "T1"),
    (r"flair|dark[-_ ]?fluid|tirm", "FLAIR"),
    (r"(?<![a-z0-9])t2(?![0-9])", "T2"),
    (r"mprage|spgr|tfe|\bvibe\b|\bbravo\b", "T1"),
    (r"tse|fse|frfse|\bhaste\b", "T2"),
)


def sequence_hint(ds) -> str:
    """T1 / T2 / FLAIR / DWI from the series description, the sequence name and the contrast tags,
    or "" when nothing says."""
    text = " ".join(str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName", "SequenceName",
                                                      "PulseSequenceName", "AcquisitionContrast")).lower()
    if _num(ds.get("DiffusionBValue")) or "MRDiffusionSequence" in ds:
        return "DWI"
    for pattern, seq in _SEQ_HINTS:
        if re.search(pattern, text):
            return seq
    return ""


def _tags(ds) -> dict:
    fs = _num(ds.get("MagneticFieldStrength"))
    return {
        "patient_id": str(ds.get("PatientID", "") or ""), "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""), "accession": str(ds.get("AccessionNumber", "") or ""),
        "series_description": str(ds.get("SeriesDescription", "") or "").strip(),
        "modality": str(ds.get("Modality", "") or ""), "body_part": str(ds.get("BodyPartExamined", "") or ""),
        "age": str(ds.get("PatientAge", "") or "").strip(), "sex": str(ds.get("PatientSex", "") or "").strip().upper(),
        "field_strength": "" if fs is None else f"{fs:g}", "sequence": sequence_hint(ds),
        "series_number": str(ds.get("SeriesNumber", "") or ""),
    }


def _read_header(path: str):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, defer_size=MAX_HEADER_BYTES)
    except InvalidDicomError:
        pass
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file is that file's problem
        raise BadInput(path, f"cannot read the DICOM header ({type(e).__name__}: {e})") from None
    # No preamble / "DICM" prefix: older files (and some exports) start with the data set itself.
    # Forced parsing reads anything as elements, so keep it only if it names a SOP class.
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=MAX_HEADER_BYTES, force=True)
        return ds if "SOPClassUID" in ds and str(ds.SOPClassUID).startswith("1.2.840.10008.") else None
    except Exception:  # noqa: BLE001 - not DICOM after all
        return None


def dicomdir_files(path: str) -> list[str]:
    """The image files a DICOMDIR references, as paths."""
    from pydicom.fileset import FileSet

    try:
        fs = FileSet(path)
    except Exception as e:  # noqa: BLE001
        raise BadInput(path, f"cannot read the DICOMDIR ({type(e).__name__}: {e})") from None
    return sorted(str(inst.path) for inst in fs)


def is_dicom_source(path: str) -> bool:
    """A folder (scanned for DICOM files) or a DICOMDIR file, rather than a manifest."""
    return os.path.isdir(path) or os.path.basename(path).upper() == "DICOMDIR"


def list_files(root: str) -> list[str]:
    """Every regular, non-hidden file under ``root`` (or those a DICOMDIR names), sorted."""
    if os.path.isfile(root):
        return dicomdir_files(root) if os.path.basename(root).upper() == "DICOMDIR" else [root]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [os.path.join(d, f) for f in sorted(files) if not f.startswith(".")]
    return out


# -- grouping ---------------------------------------------------------------------------------

def _close(a, b, tol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = (np.atleast_1d(np.asarray(v, float)) for v in (a, b))
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= tol))


def _same_volume(f: Frame, rep: Frame) -> bool:
    """Whether ``f`` belongs with the group whose first frame is ``rep``: the same matrix and
    temporal position, and orientation, pixel spacing, echo time and b-value within tolerance
    of it (never fixed bins, whose edges split values a rounding error apart)."""
    return (f.rows, f.cols, f.temporal) == (rep.rows, rep.cols, rep.temporal) and _close(f.iop, rep.iop, ORIENTATION_TOL) \
        and _close(f.pixel_spacing, rep.pixel_spacing, 1e-4) and _close(f.echo, rep.echo, 1e-3) \
        and _close(f.bvalue, rep.bvalue, 1e-3)


def _normal(iop) -> np.ndarray:
    x, y = np.asarray(iop[:3]), np.asarray(iop[3:])
    return np.cross(x, y)


def _split(frames: list[Frame]) -> list[list[Frame]]:
    """Frames of one series -> volumes: by orientation, matrix, spacing, echo, b-value and
    temporal position; then by acquisition number where positions repeat."""
    groups: list[list[Frame]] = []
    for f in frames:
        g = next((g for g in groups if _same_volume(f, g[0])), None)
        if g is None:
            groups.append([f])
        else:
            g.append(f)
    groups.sort(key=lambda g: (g[0].echo or 0.0, g[0].bvalue or 0.0, g[0].temporal or 0, g[0].rows, g[0].cols,
                               tuple(round(v, 3) for v in g[0].iop)))
    out = []
    for g in groups:
        pos = [round(float(np.dot(f.ipp, _normal(f.iop))), 3) for f in g]
        if len(set(pos)) < len(pos) and len({f.acquisition for f in g}) > 1:
            by_acq: dict = defaultdict(list)
            for f in g:
                by_acq[f.acquisition].append(f)
            out += [by_acq[a] for a in sorted(by_acq, key=lambda a: (a is None, a or 0))]
        else:
            out.append(g)
    return out


def order_and_check(frames: list[Frame], path_hint: str, min_slices: int) -> tuple[list[Frame], float]:
    """The frames sorted along the slice normal and the slice spacing (mm; 0 for one slice). Raises
    :class:`BadInput` for too few slices, repeated positions, uneven spacing or sheared slices."""
    n = len(frames)
    if n < min_slices:
        raise BadInput(path_hint, f"{n} slice{'s' * (n != 1)} (a localiser or a single image); a volume needs at least "
                                  f"{min_slices}")
    if n == 1:
        return list(frames), 0.0  # no spacing to measure: read_volume takes the slice's thickness
    normal = _normal(frames[0].iop)
    frames = sorted(frames, key=lambda f: (float(np.dot(f.ipp, normal)), f.instance))
    ipp = np.array([f.ipp for f in frames])
    d = ipp @ normal
    gaps = np.diff(d)
    if np.any(gaps < 1e-3):
        k = int(np.argmin(gaps))
        raise BadInput(path_hint, f"slices {k + 1} and {k + 2} share the position {d[k]:.3f} mm along the slice "
                                  "normal (repeated slices, or several volumes in one series)")
    med = float(np.median(gaps))
    if gaps.max() - gaps.min() > SPACING_TOL * med + 1e-3:
        k = int(np.argmax(np.abs(gaps - med)))
        raise BadInput(path_hint, f"slice spacing is not uniform ({gaps.min():.3f} to {gaps.max():.3f} mm, median "
                                  f"{med:.3f}; gap of {gaps[k]:.3f} mm after slice {k + 1}): missing slices or a gap")
    off = ipp[-1] - ipp[0]
    along = float(np.dot(off, normal))
    perp = float(np.linalg.norm(off - along * normal))
    tilt = math.degrees(math.atan2(perp, abs(along)))
    if tilt > TILT_TOL_DEG:
        raise BadInput(path_hint, f"slices are sheared by {tilt:.1f} degrees off the slice normal (gantry tilt); "
                                  "tilt-corrected resampling is not done, so the series is skipped")
    return frames, med


def affine_lps(frames: list[Frame], spacing: float) -> np.ndarray:
    """The voxel (column, row, slice) -> LPS mm affine of frames in slice order."""
    f0 = frames[0]
    x, y = np.asarray(f0.iop[:3]), np.asarray(f0.iop[3:])
    dr, dc = f0.pixel_spacing
    a = np.eye(4)
    a[:3, 0], a[:3, 1], a[:3, 2], a[:3, 3] = x * dc, y * dr, _normal(f0.iop) * spacing, f0.ipp
    return a


# -- scanning a tree --------------------------------------------------------------------------

def pseudonym(value: str, salt: str) -> str:
    """A stable pseudonym of an identifier under ``salt`` (HMAC-SHA256, 20 hex digits); "" stays ""."""
    if not value:
        return ""
    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()[:20]


@dataclasses.dataclass
class ScanResult:
    volumes: list[Volume]
    skipped: list[dict]  # {"file", "reason", "series_uid"?, "copy_of"?}
    paths: list[str]  # every file scanned, in scan order


def scan(root: str, opts: ScanOptions = ScanOptions(), progress: bool = False) -> ScanResult:
    """Every volume under ``root``; what cannot be a volume is in ``skipped`` with its reason."""
    files = list_files(os.path.abspath(root))
    skipped: list[dict] = []
    by_series: dict[str, list[Frame]] = defaultdict(list)
    tags: dict[str, dict] = {}
    first_of: dict[str, str] = {}  # SOPInstanceUID -> the file that carried it first
    from tqdm import tqdm

    for path in tqdm(files, desc="dicom scan", unit="file", disable=not progress):
        try:
            ds = _read_header(path)
            if ds is None:
                skipped.append({"file": path, "reason": "not a DICOM file"})
                continue
            sop = _sop_name(ds)
            if "Directory" in sop:
                skipped.append({"file": path, "reason": "a DICOMDIR (the files it lists are scanned as files)"})
                continue
            non_image = any(s in f" {sop} " for s in _NON_IMAGE)
            if non_image or "Rows" not in ds:
                why = f"not an image ({sop})" if non_image else f"no image matrix (Rows / Columns absent; {sop})"
                skipped.append({"file": path, "reason": why, "series_uid": str(ds.get("SeriesInstanceUID", ""))})
                continue
            image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
            if "LOCALIZER" in image_type or "SCOUT" in image_type:
                skipped.append({"file": path, "reason": f"a localiser (ImageType {'/'.join(image_type)})",
                                "series_uid": str(ds.get("SeriesInstanceUID", ""))})
                continue
            if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
                skipped.append({"file": path, "reason": f"colour image ({ds.get('PhotometricInterpretation', '?')}); "
                                                        "MR volumes are greyscale"})
                continue
            sop_uid = str(ds.get("SOPInstanceUID", "") or "")
            if sop_uid and sop_uid in first_of:  # the same image twice (a CD's copies, a re-export)
                skipped.append({"file": path, "reason": "a copy of another file (the same SOPInstanceUID)",
                                "copy_of": first_of[sop_uid], "series_uid": str(ds.get("SeriesInstanceUID", ""))})
                continue
            frames = _frames_of(path, ds)
        except BadInput as e:
            skipped.append({"file": e.path, "reason": e.reason})
            continue
        except Exception as e:  # noqa: BLE001 - an odd header is that file's problem, never the scan's
            skipped.append({"file": path, "reason": f"cannot use the header ({type(e).__name__}: {e})"})
            continue
        if sop_uid:
            first_of[sop_uid] = path
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            skipped.append({"file": path, "reason": "no SeriesInstanceUID"})
            continue
        by_series[uid] += frames
        if uid not in tags:
            tags[uid] = _tags(ds)
    volumes: list[Volume] = []
    for uid in sorted(by_series):
        parts = _split(by_series[uid])
        for k, part in enumerate(parts):
            sid = uid if len(parts) == 1 else f"{uid}_{k + 1}"
            hint = part[0].file
            try:
                n_vox = len(part) * part[0].rows * part[0].cols
                if n_vox > opts.max_voxels:
                    raise BadInput(hint, f"series {sid} claims {len(part)} x {part[0].rows} x {part[0].cols} voxels "
                                         f"({n_vox:,}), over max_voxels={opts.max_voxels:,}")
                ordered, _ = order_and_check(part, hint, opts.min_slices)
            except BadInput as e:
                skipped.append({"file": e.path, "reason": f"series {sid}: {e.reason}", "series_uid": uid,
                                "files": len({f.file for f in part})})
                continue
            volumes.append(Volume((uid, k), ordered, tags[uid], sid))
    return ScanResult(volumes, skipped, files)


# -- a volume's voxels ------------------------------------------------------------------------

def _digest(vol: Volume) -> str:
    """What a volume is made of (its frames, each file's size and modification time): a cached
    preparation of the volume is reused only while this is unchanged."""
    h = hashlib.sha256()
    for f in vol.frames:
        st = os.stat(f.file)
        h.update(f"{f.file}\0{f.frame}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def write_series_file(path: str, vol: Volume, series_id: str, index: dict[str, int] | None = None) -> str:
    """The frames of ``vol`` in slice order, under ``series_id`` (pseudonymised where asked).
    With ``index`` (file path -> number), files are stored by number, resolved through the
    ``SOURCE.json`` beside the series folder: nothing in the series file names where the
    originals live (PACS exports name folders after patients)."""
    files = [[index[f.file] if index is not None else f.file, f.frame] for f in vol.frames]
    blob = {"format": SERIES_FORMAT, "series_id": series_id, "digest": _digest(vol), "indexed": index is not None,
            "frames": files}
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(blob, fh)
    os.replace(tmp, path)
    return path


# Beside series/ when pseudonymised: the DICOM folder and its files by number, the one file that
# names the originals (keep it on site; the series files and errors.jsonl refer to it by number).
SOURCE_FILE = "SOURCE.json"


def series_digest(path: str) -> str:
    """The ``digest`` of a series file ("" if it has none or cannot be read)."""
    try:
        with open(path) as fh:
            return str(json.load(fh).get("digest", ""))
    except (OSError, ValueError):
        return ""


def frames_from_files(entries: list[tuple[str, int | None]]) -> list[Frame]:
    """Reads the headers of ``(file, frame)`` entries back into frames."""
    cache: dict[str, list[Frame]] = {}
    out = []
    for file, frame in entries:
        if file not in cache:
            ds = _read_header(file)
            if ds is None:
                raise BadInput(file, "not a DICOM file (has it changed since the scan?)")
            cache[file] = _frames_of(file, ds)
        fr = cache[file]
        idx = 0 if frame is None else int(frame)
        if idx >= len(fr):
            raise BadInput(file, f"frame {idx + 1} requested, the file has {len(fr)}")
        out.append(fr[idx])
    return out


def read_volume(frames: list[Frame], max_voxels: int = 512**3, min_slices: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(float32 voxels indexed (column, row, slice), RAS affine) of one volume's frames, with the
    rescale applied. The frames are sorted and checked first (:func:`order_and_check`)."""
    if not frames:
        raise BadInput("", "a volume needs at least one frame")
    frames, spacing = order_and_check(list(frames), frames[0].file, min_slices)
    if len(frames) == 1:  # a single image: its own thickness, as dcm2niix does
        spacing = 1.0
        ds = _read_header(frames[0].file)
        if ds is None:
            raise BadInput(frames[0].file, "not a DICOM file (has it changed since the scan?)")
        for k in ("SpacingBetweenSlices", "SliceThickness"):
            if (v := _num(ds.get(k))) and v > 0:
                spacing = v
                break
    f0 = frames[0]
    n_vox = len(frames) * f0.rows * f0.cols
    if n_vox > max_voxels:
        raise BadInput(f0.file, f"volume of {len(frames)} x {f0.rows} x {f0.cols} voxels is over max_voxels={max_voxels:,}")
    from pydicom.pixels import pixel_array

    out = np.empty((f0.cols, f0.rows, len(frames)), np.float32)
    for k, f in enumerate(frames):
        try:  # one frame at a time: a 4D object is never decoded whole
            img = np.asarray(pixel_array(f.file) if f.frame is None else pixel_array(f.file, index=f.frame))
        except Exception as e:  # noqa: BLE001 - an undecodable transfer syntax, corrupt or vanished pixel data
            ts = getattr(getattr(_read_header(f.file) if os.path.exists(f.file) else None, "file_meta", None),
                         "TransferSyntaxUID", None)
            raise BadInput(f.file, f"cannot decode the pixel data ({getattr(ts, 'name', ts) or '?'}: "
                                   f"{type(e).__name__}: {e})") from None
        if img.shape != (f0.rows, f0.cols):
            raise BadInput(f.file, f"pixel matrix {img.shape} differs from the volume's {(f0.rows, f0.cols)}")
        out[:, :, k] = (img.astype(np.float32) * f.slope + f.intercept).T
    return out, LPS_TO_RAS @ affine_lps(frames, spacing)


def series_entries(path: str) -> list:
    """The ``(file, frame)`` entries of a series file written by :func:`scan`, numbered files
    resolved through the ``SOURCE.json`` beside the series folder; :class:`BadInput` naming the
    file when it is unreadable, not a series file, empty, or its source index is damaged."""
    try:
        with open(path) as fh:
            blob = json.load(fh)
    except (OSError, ValueError) as e:
        raise BadInput(path, f"cannot read the DICOM series file ({e})") from None
    if blob.get("format") != SERIES_FORMAT:
        raise BadInput(path, f"not a DICOM series file (format {blob.get('format')!r}, expected {SERIES_FORMAT!r})")
    if not blob.get("frames"):
        raise BadInput(path, "the DICOM series file lists no frames")
    entries = [(f, fr) for f, fr in blob["frames"]]
    if blob.get("indexed"):
        src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), SOURCE_FILE)
        try:
            with open(src) as fh:
                source = json.load(fh)
            entries = [(os.path.join(source["root"], source["files"][int(i)]), fr) for i, fr in entries]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise BadInput(path, f"its frames are numbered files of {src}, which is missing or damaged ({e})") from None
    return entries


def load_series(path: str, max_voxels: int = 512**3) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and RAS affine of a series file written by :func:`scan`."""
    return read_volume(frames_from_files(series_entries(path)), max_voxels)


# -- the manifest -----------------------------------------------------------------------------

def _norm_col(c: str) -> str:
    return re.sub(r"[^a-z]", "", c.lower())


def read_reports(path: str) -> dict[str, dict]:
    """A reports CSV -> {key: {"report" | "report_file", "findings"}}: keyed by
    ``study_instance_uid`` (or ``StudyInstanceUID``) and by ``accession_number`` where given."""
    from data_prep.manifest import ManifestError

    try:
        with open(path, "rb") as f:
            text = reports_lib.decode_utf8(f.read(), "reports")
    except OSError as e:
        raise ManifestError(path, f"cannot read the reports file ({e.strerror or e})") from None
    except ValueError as e:
        raise ManifestError(path, str(e)) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = {_norm_col(c): c for c in reader.fieldnames or ()}
    keys = [cols[k] for k in ("studyinstanceuid", "studyuid", "accessionnumber", "accession") if k in cols]
    body = [cols[k] for k in ("report", "reportfile") if k in cols]
    if not keys or not body:
        raise ManifestError(path, f"a reports CSV needs a study_instance_uid or accession_number column and a report or "
                                  f"report_file column; have {reader.fieldnames}")
    base = os.path.dirname(os.path.abspath(path))
    out: dict[str, dict] = {}
    for r in reader:
        entry = {"findings": (r.get(cols.get("findings", ""), "") or "").strip()}
        if "report" in cols and (r.get(cols["report"]) or "").strip():
            entry["report"] = r[cols["report"]]
        elif "reportfile" in cols and (r.get(cols["reportfile"]) or "").strip():
            p = r[cols["reportfile"]]
            entry["report_file"] = p if os.path.isabs(p) else os.path.join(base, p)
        for k in keys:
            kind = "accession" if _norm_col(k).startswith("accession") else "study"
            if (v := (r.get(k) or "").strip()):
                out[f"{kind}:{v}"] = entry
    return out


IDENTIFIERS = ("patient_id", "study_id", "series_id")


def manifest_rows(scan_result: ScanResult, series_dir: str, opts: ScanOptions,
                  reports: dict[str, dict] | None = None, root: str = "",
                  index: dict[str, int] | None = None) -> list[dict]:
    """The manifest rows of the scanned volumes; writes their series files into ``series_dir``.
    With ``opts.pseudonymise`` the series files name their files by number (``index``, from
    :func:`source_index`), written with ``root`` (the DICOM folder) to ``SOURCE.json``."""
    os.makedirs(series_dir, exist_ok=True)
    if not opts.pseudonymise:
        index = None
    else:
        index = index if index is not None else source_index(scan_result)
        base = _base(root)
        src = os.path.join(os.path.dirname(os.path.abspath(series_dir)), SOURCE_FILE)
        with open(src + ".tmp", "w") as fh:
            json.dump({"root": base, "files": [os.path.relpath(p, base) for p in scan_result.paths]}, fh)
        os.replace(src + ".tmp", src)
    rows = []
    for vol in scan_result.volumes:
        t = vol.tags
        rep = (reports or {}).get(f"study:{t['study_uid']}") or (reports or {}).get(f"accession:{t['accession']}") or {}
        ids = {"patient_id": t["patient_id"] or f"unknown-{t['study_uid']}", "study_id": t["study_uid"],
               "series_id": vol.series_id}
        if opts.pseudonymise:
            ids = {k: pseudonym(v, opts.salt) for k, v in ids.items()}
        fname = ids["series_id"] + SERIES_SUFFIX
        write_series_file(os.path.join(series_dir, fname), vol, ids["series_id"], index)
        rows.append({
            **ids, "image": os.path.join(series_dir, fname),
            "report": rep.get("report", ""), "report_file": rep.get("report_file", ""),
            "series_description": t["series_description"], "sequence": t["sequence"],
            "body_region": body_region(t["body_part"]), "age": t["age"], "sex": t["sex"],
            "findings": rep.get("findings", ""), "modality": t["modality"], "field_strength": t["field_strength"],
        })
    return rows


def to_manifest(root: str, out_dir: str, opts: ScanOptions, reports_csv: str = "",
                progress: bool = False) -> tuple[str, list[dict], dict, dict[str, int]]:
    """Scans ``root`` and writes ``out_dir/manifest.csv`` (with its series files under
    ``out_dir/series``). Returns (manifest path, skipped items, a summary for the dataset card,
    each scanned file's number in ``SOURCE.json``)."""
    from data_prep import manifest as manifest_lib

    if opts.pseudonymise and not opts.salt:
        raise ValueError("pseudonymise needs a salt (a secret kept apart from the data)")
    out_dir = os.path.abspath(out_dir)
    res = scan(root, opts, progress)
    reports = read_reports(reports_csv) if reports_csv else None
    series_dir = os.path.join(out_dir, "series")
    index = source_index(res)
    rows = manifest_rows(res, series_dir, opts, reports, root, index)
    os.makedirs(out_dir, exist_ok=True)
    path = manifest_lib.write(os.path.join(out_dir, "manifest.csv"), rows)
    skipped = [pseudonymise_item(s, index, opts) for s in res.skipped] if opts.pseudonymise else res.skipped
    summary = {
        # Pseudonymised: the source folder (which can name a patient) only in dicom/SOURCE.json.
        "source": f"(see {SOURCE_FILE})" if opts.pseudonymise else os.path.abspath(root),
        "files": len(res.paths), "volumes": len(res.volumes), "skipped": len(res.skipped),
        "reports": os.path.abspath(reports_csv) if reports_csv else "",
        "reports_joined": sum(bool(r["report"] or r["report_file"]) for r in rows),
        "pseudonymised": ({"method": "HMAC-SHA256 under a salt, 20 hex digits", "fields": list(IDENTIFIERS)}
                          if opts.pseudonymise else False),
    }
    if not rows:
        raise manifest_lib.ManifestError(root, f"no usable DICOM volume among {len(res.paths)} files "
                                               f"({len(res.skipped)} skipped; first: "
                                               f"{res.skipped[0]['reason'] if res.skipped else 'none'})")
    return path, skipped, summary, index


def _base(root: str) -> str:
    return os.path.abspath(root if os.path.isdir(root) else os.path.dirname(root))


def source_index(res: ScanResult) -> dict[str, int]:
    """Each scanned file's number (its line in ``SOURCE.json``)."""
    return {p: i for i, p in enumerate(res.paths)}


def pseudonymise_item(item: dict, index: dict[str, int], opts: ScanOptions) -> dict:
    """A skipped or failed item without identifiers: its series UID pseudonymised (in the reason
    too), and its files (``file``, ``copy_of``) by number in ``SOURCE.json``."""
    out = dict(item)
    uid = out.get("series_uid", "")
    if uid:
        out["series_uid"] = pseudonym(uid, opts.salt)
        out["reason"] = out["reason"].replace(uid, out["series_uid"])
    for k in ("file", "copy_of"):
        f = out.get(k)
        if f in index:
            tag = f"file #{index[f]} of {SOURCE_FILE}"
            out["reason"] = out["reason"].replace(f, tag)
            out[k] = tag
    return out


# -- writing (tests, benchmarks, and users who need a DICOM copy of a NIfTI volume) -------------

def write_series(data: np.ndarray, affine_ras: np.ndarray, out_dir: str, *, patient_id: str = "ANON",
                 study_uid: str = "", series_uid: str = "", series_description: str = "", modality: str = "MR",
                 body_part: str = "", age: str = "", sex: str = "", field_strength: float | None = None,
                 accession: str = "", series_number: int = 1, seed: str = "") -> list[str]:
    """Writes ``data`` (voxel axes (column, row, slice), any orientation, oblique included) as a
    single-frame MR (or CT) series of 16-bit slices with a rescale, one file per slice; returns
    the paths. The affine's third column must be normal to the slice plane (DICOM has no sheared
    stacks)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    a = LPS_TO_RAS @ np.asarray(affine_ras, float)  # RAS -> LPS (the flip is its own inverse)
    dc, dr, ds_ = (float(np.linalg.norm(a[:3, i])) for i in range(3))
    x, y, step = a[:3, 0] / dc, a[:3, 1] / dr, a[:3, 2] / ds_
    normal = np.cross(x, y)
    if abs(abs(float(np.dot(step, normal))) - 1.0) > 1e-6:
        raise ValueError("the affine's slice axis is not normal to its rows and columns (a sheared stack)")
    data = np.asarray(data, np.float64)
    lo, hi = float(data.min()), float(data.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.clip(np.rint((data - lo) / slope), 0, 65535).astype(np.uint16)
    # Deterministic in ``seed`` when one is given (tests, benchmarks); else fresh UIDs per call.
    uid = lambda what: generate_uid(entropy_srcs=[seed, patient_id, series_uid, what] if seed else None)  # noqa: E731
    study_uid = study_uid or uid("study")
    series_uid = series_uid or uid("series")
    frame_uid = uid("frame")
    sop_class = "1.2.840.10008.5.1.4.1.1.4" if modality == "MR" else "1.2.840.10008.5.1.4.1.1.2"
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = sop_class, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = uid(f"sop{k}")
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientID, ds.PatientSex, ds.PatientAge, ds.AccessionNumber = patient_id, sex, age, accession
        ds.Modality, ds.SeriesDescription, ds.BodyPartExamined = modality, series_description, body_part
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        if field_strength is not None:
            ds.MagneticFieldStrength = f"{field_strength:g}"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*x, *y)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in a[:3, 3] + k * a[:3, 2]]
        ds.PixelSpacing = [f"{dr:.8f}", f"{dc:.8f}"]
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{ds_:.8f}"
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{lo:.10g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = os.path.join(out_dir, f"IM{k + 1:05d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
