"""NIfTI series -> validated, RAS-oriented, resampled, intensity-normalised arrays.

Geometry policy (recorded in the dataset card and every record):
- Orientation: RAS. ``nib.as_closest_canonical`` first (an exact axis permutation / flip);
  a remaining oblique rotation is resolved by resampling onto an axis-aligned RAS grid that
  covers the volume's bounding box.
- Spacing: ``target_spacing`` mm; trilinear for images, nearest for label maps, on the
  *same* output grid (the label map must share the image's grid on input).
- Study grid (``prep``'s ``studies="resample"``): every series of a study resampled onto the
  RAS grid of the study's first series (``process(grid=...)``), read from its header
  (:func:`header_geometry`), so that co-registered sequences share voxels.
- 4D: a singleton 4th axis is dropped; otherwise ``four_d`` = "first" (default, e.g. b0 or
  first frame), "mean" or "error".
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import math
import os
import stat
import zlib

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_prep import dicom
from data_prep.errors import BadInput  # noqa: F401 - volume.BadInput is the name callers use


@dataclasses.dataclass(frozen=True)
class VolumeConfig:
    target_spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    four_d: str = "first"
    min_size: int = 8  # voxels per axis, on input
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    foreground_only_stats: bool = True  # percentiles over voxels above the 10th percentile
    crop_foreground: bool = False
    crop_threshold: float = 0.05  # on the normalised [0, 1] scale
    crop_margin: int = 2
    max_affine_scale: float = 20.0  # mm per voxel beyond which an affine is not sane
    # Voxels (all axes) a file's header may claim; checked before any data is read, so a gzip bomb
    # or a corrupt dim[] is refused instead of exhausting memory (512**3 float32 is 512 MiB).
    max_voxels: int = 512**3


def check_file(path: str, what: str) -> None:
    """Refuses a path that is missing, a broken or looping symlink, or not a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(path, f"{what} file not found" + (" (broken symlink)" if os.path.islink(path) else "")) from None
    except OSError as e:
        raise BadInput(path, f"symlink loop in the {what} path" if e.errno == errno.ELOOP
                       else f"cannot access the {what} file ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block the worker or never end
        raise BadInput(path, f"{what} path is not a regular file")


MAX_EXTENSION_BYTES = 16 << 20  # NIfTI header extensions (AFNI, DICOM dumps) are kilobytes


def _stored_header(path: str, what: str):
    """The NIfTI header as stored, or None if the file is not NIfTI. Read before nibabel, which
    reads each header extension whole whatever size it claims (a gzip bomb), and "fixes" pixdim
    on load (0 -> 1 mm, negative -> positive)."""
    with nib.openers.ImageOpener(path) as f:
        head = f.read(544)
        klass = next((k for k in (nib.Nifti2Header, nib.Nifti1Header) if k.may_contain_header(head)), None)
        if klass is None:
            return None
        n = klass.template_dtype.itemsize
        hdr = klass(head[:n], check=False)
        if len(head) < n + 4 or head[n] == 0:  # no extensions
            return hdr
        size = float(hdr["vox_offset"]) - (n + 4)  # nibabel reads extensions up to vox_offset ...
        if size > MAX_EXTENSION_BYTES:
            raise BadInput(path, f"{what} header extensions claim {size:,.0f} bytes, over {MAX_EXTENSION_BYTES:,}")
        f.seek(n + 4)
        while size >= 16:  # ... but each one whole: walk them without reading their content
            ext = f.read(8)
            esize = int(np.frombuffer(ext, hdr.endianness + "i4", 1)[0]) if len(ext) == 8 else 0
            if not 8 <= esize <= size:
                raise BadInput(path, f"{what} header extension size {esize:,} does not fit before vox_offset")
            f.seek(esize - 8, 1)
            size -= esize
        return hdr


def _check_header(path: str, img, stored, cfg: VolumeConfig, what: str) -> None:
    """Header sanity, before any voxel is read or the affine is used (reorienting reads the data,
    and a NaN or singular affine makes its SVD fail)."""
    hdr = img.header
    shape = tuple(int(d) for d in hdr.get_data_shape())
    if not shape or min(shape) < 1:
        raise BadInput(path, f"{what} header has dimension sizes {shape}; each must be >= 1")
    n, dtype = math.prod(shape), hdr.get_data_dtype()
    if n > cfg.max_voxels:
        raise BadInput(path, f"{what} header claims shape {shape} ({n:,} voxels, {n * dtype.itemsize / 2**30:.1f} GiB "
                             f"uncompressed), over the voxel limit max_voxels={cfg.max_voxels:,}")
    if dtype.kind == "c" or dtype.fields:
        raise BadInput(path, f"{what} data type {hdr.get_value_label('datatype')} is not real scalar (complex or RGB)")
    need = int(hdr.get_data_offset()) + n * dtype.itemsize
    if path.endswith(".nii") and os.path.getsize(path) < need:  # a short memory map fails obscurely later
        raise BadInput(path, f"cannot read {what} (truncated or corrupt file: {os.path.getsize(path):,} bytes, "
                             f"the header claims {need:,})")
    # As stored: with no sform/qform, nibabel's fixed-up pixdim would become the affine.
    zooms = np.asarray((hdr if stored is None else stored)["pixdim"][1: 1 + min(len(shape), 3)], float)
    if not np.all(np.isfinite(zooms) & (zooms > 0)):
        raise BadInput(path, f"{what} header pixdim {zooms.tolist()}: voxel sizes must be finite and positive")
    _check_affine(path, img.affine, cfg)


def _check_affine(path: str, affine, cfg: VolumeConfig) -> None:
    affine = np.asarray(affine, dtype=np.float64)
    lin = affine[:3, :3]
    zooms = np.linalg.norm(lin, axis=0)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(lin)) < 1e-6 or zooms.max() > cfg.max_affine_scale:
        raise BadInput(path, f"affine is not sane (voxel sizes {np.round(zooms, 3).tolist()} mm)")


def load(path: str, cfg: VolumeConfig, *, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Loads and validates a NIfTI file: (float32 data in RAS, RAS affine), pre-resampling."""
    check_file(path, what)
    if os.path.getsize(path) == 0:
        raise BadInput(path, f"{what} file is empty (0 bytes)")
    try:
        if path.endswith(dicom.SERIES_SUFFIX):  # a DICOM volume that data_prep.dicom.scan found
            img = nib.Nifti1Image(*dicom.load_series(path, cfg.max_voxels))
            _check_affine(path, img.affine, cfg)
        else:
            stored = _stored_header(path, what)
            img = nib.load(path)
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise BadInput(path, f"not a NIfTI image ({type(img).__name__})")
            _check_header(path, img, stored, cfg, what)
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except BadInput:
        raise
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as e:
        raise BadInput(path, f"cannot read {what} (truncated or corrupt file: {e})") from e
    except Exception as e:  # nibabel raises several types for non-NIfTI content
        raise BadInput(path, f"not a readable NIfTI {what} ({type(e).__name__}: {e})") from e
    if data.ndim == 4:
        if data.shape[3] == 1:
            data = data[..., 0]
        elif cfg.four_d == "first":
            data = data[..., 0]
        elif cfg.four_d == "mean":
            data = data.mean(axis=3)
        else:
            raise BadInput(path, f"4D {what} with {data.shape[3]} volumes (four_d='error')")
    if data.ndim != 3:
        raise BadInput(path, f"{what} is {data.ndim}D with shape {data.shape}; a 3D volume is required")
    if min(data.shape) < cfg.min_size:
        raise BadInput(path, f"{what} shape {data.shape} is below the minimum size {cfg.min_size} per axis")
    affine = np.asarray(img.affine, dtype=np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        raise BadInput(path, f"{what} has no finite values (all NaN/inf)")
    if not finite.all():
        data = np.where(finite, data, 0.0).astype(np.float32)
    return data, affine


def label_dtype(labels: np.ndarray, path: str) -> type:
    """uint8 when the labels fit, else uint16 (FreeSurfer aseg goes to 2035); never wrapped."""
    lo, hi = float(labels.min()), float(labels.max())
    off = np.abs(labels - np.rint(labels)) > 1e-3  # float32 storage of integer ids is exact to far less
    if off.any():
        raise BadInput(path, f"label map has non-integer values (e.g. {labels[off].flat[0]:g}); labels are class ids")
    if lo < 0:
        raise BadInput(path, f"label map has negative values (min {lo:g}); labels must be >= 0")
    if hi > np.iinfo(np.uint16).max:
        raise BadInput(path, f"label map values up to {hi:g} do not fit uint16")
    return np.uint8 if hi <= np.iinfo(np.uint8).max else np.uint16


def is_axis_aligned(affine: np.ndarray, tol: float = 1e-4) -> bool:
    lin = affine[:3, :3]
    return bool(np.all(np.abs(lin - np.diag(np.diag(lin))) <= tol * np.abs(lin).max()))


def ras_grid(affine: np.ndarray, shape, spacing) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The axis-aligned RAS grid (affine, shape) at ``spacing`` covering the volume's voxel centres."""
    spacing = np.asarray(spacing, float)
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = world.min(0), world.max(0)
    out_shape = tuple(int(np.floor((hi[a] - lo[a]) / spacing[a] + 1e-6)) + 1 for a in range(3))
    out = np.eye(4)
    out[:3, :3] = np.diag(spacing)
    out[:3, 3] = lo
    return out, out_shape  # type: ignore[return-value]


def resample(data: np.ndarray, affine: np.ndarray, out_affine: np.ndarray, out_shape, order: int) -> np.ndarray:
    """Samples ``data`` at the voxel centres of the output grid (order 1: trilinear, 0: nearest)."""
    m = np.linalg.inv(affine) @ out_affine  # output voxel -> input voxel
    lin, off = m[:3, :3], m[:3, 3]
    if is_axis_aligned(m):  # the fast separable path of scipy
        lin = np.diag(lin)
    return ndimage.affine_transform(data, lin, offset=off, output_shape=tuple(out_shape), order=order,
                                    mode="constant", cval=0.0, prefilter=False)


def normalise(data: np.ndarray, cfg: VolumeConfig) -> tuple[np.ndarray, dict]:
    """Percentile clip then scale to [0, 1]; returns the statistics used."""
    flat = data.ravel()
    if cfg.foreground_only_stats:
        thr = np.percentile(flat, 10.0)
        fg = flat[flat > thr]
        flat = fg if fg.size > 100 else flat
    lo, hi = np.percentile(flat, cfg.clip_percentiles)
    if hi <= lo:
        hi = lo + 1.0
    out = (np.clip(data, lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32), {"clip_lo": float(lo), "clip_hi": float(hi)}


def foreground_box(data: np.ndarray, threshold: float, margin: int) -> tuple[slice, slice, slice]:
    idx = np.argwhere(data > threshold)
    if idx.size == 0:
        return tuple(slice(0, s) for s in data.shape)  # type: ignore[return-value]
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, data.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def header_geometry(path: str, cfg: VolumeConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(voxel-to-RAS affine, 3D shape) of an image from its header alone: no voxel is read. The
    checks are :func:`load`'s that precede the data (the file, the stored header, extension
    sizes, ``max_voxels``, pixdim, a sane affine; for a DICOM series file its frames' headers,
    slice order and spacing); :func:`ras_grid` of the result is the grid :func:`process` would
    resample the series onto (``prep``'s study grouping compares these). Raises
    :class:`BadInput`."""
    check_file(path, "image")
    if os.path.getsize(path) == 0:
        raise BadInput(path, "image file is empty (0 bytes)")
    try:
        if path.endswith(dicom.SERIES_SUFFIX):
            return _dicom_geometry(path, cfg)
        stored = _stored_header(path, "image")
        img = nib.load(path)  # lazy: the header only
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise BadInput(path, f"not a NIfTI image ({type(img).__name__})")
        _check_header(path, img, stored, cfg, "image")
    except BadInput:
        raise
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as e:
        raise BadInput(path, f"cannot read image header (truncated or corrupt file: {e})") from e
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for non-NIfTI content
        raise BadInput(path, f"not a readable NIfTI image ({type(e).__name__}: {e})") from e
    shape = tuple(int(d) for d in img.shape)
    if len(shape) < 3:
        raise BadInput(path, f"image is {len(shape)}D with shape {shape}; a 3D volume is required")
    return np.asarray(img.affine, dtype=np.float64), shape[:3]  # type: ignore[return-value]


def _dicom_geometry(path: str, cfg: VolumeConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """:func:`header_geometry` of a DICOM series file (:func:`data_prep.dicom.load_series`'s
    frames, read back as headers: their order, spacing and orientation, no pixel data)."""
    entries = dicom.series_entries(path)
    frames, spacing = dicom.order_and_check(dicom.frames_from_files(entries), path, 2)
    shape = (frames[0].cols, frames[0].rows, len(frames))
    if math.prod(shape) > cfg.max_voxels:
        raise BadInput(path, f"volume of {shape} voxels is over max_voxels={cfg.max_voxels:,}")
    affine = dicom.LPS_TO_RAS @ dicom.affine_lps(frames, spacing)
    _check_affine(path, affine, cfg)
    return affine, shape


def process(image_path: str, label_path: str | None, cfg: VolumeConfig, grid=None) -> dict:
    """The whole per-series geometry + intensity chain. Raises :class:`BadInput`.

    ``grid``: ``(affine, shape)`` of an axis-aligned RAS grid at ``cfg.target_spacing`` to
    resample onto (``prep``'s study grid, shared by the series of a study) instead of the
    series' own :func:`ras_grid`; the image trilinear and the label map nearest, as on its own
    grid. None: the series' own grid."""
    data, affine = load(image_path, cfg)
    if data.min() == data.max():  # nothing to learn from; normalising it would store zeros
        raise BadInput(image_path, f"image is constant (all voxels = {float(data.flat[0]):g})")
    orig_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    raw_stats = {"raw_p01": float(np.percentile(data, 1)), "raw_p99": float(np.percentile(data, 99))}
    if grid is None:
        out_affine, out_shape = ras_grid(affine, data.shape, cfg.target_spacing)
    else:
        out_affine, out_shape = np.asarray(grid[0], np.float64), tuple(int(n) for n in grid[1])
    vol = resample(data, affine, out_affine, out_shape, order=1)
    label = None
    if label_path:
        ldata, laff = load(label_path, cfg, what="label map")
        if ldata.shape != data.shape or not np.allclose(laff, affine, atol=1e-3):
            raise BadInput(label_path,
                           f"label map grid {ldata.shape} does not match image {image_path} grid {data.shape}")
        label = resample(np.rint(ldata), laff, out_affine, out_shape, order=0).astype(label_dtype(ldata, label_path))
    vol, norm_stats = normalise(vol, cfg)
    if cfg.crop_foreground:
        box = foreground_box(vol, cfg.crop_threshold, cfg.crop_margin)
        vol = vol[box]
        label = None if label is None else label[box]
        shift = np.array([s.start for s in box], float)
        out_affine = out_affine.copy()
        out_affine[:3, 3] += out_affine[:3, :3] @ shift
    return {
        "volume": vol, "label": label, "affine": out_affine.astype(np.float32),
        "spacing": np.asarray(cfg.target_spacing, np.float32), "orig_spacing": orig_spacing.astype(np.float32),
        "orig_shape": np.asarray(data.shape, np.int32), **norm_stats, **raw_stats,
    }
