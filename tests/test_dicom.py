"""DICOM in: volumes equal dcm2niix's on the real DICOM that pydicom and pydicom-data ship, the
oblique round trip through ``decipher prep``, skipped objects with reasons, splits of mixed
series, reports joined by study and accession, pseudonymisation."""

import csv
import glob
import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from data_prep import dicom, prep, volume  # noqa: E402
from decipher_jax import cli  # noqa: E402

TEST_FILES = os.path.dirname(get_testdata_file("MR_small.dcm"))  # shipped inside pydicom
DIRTESTS = os.path.join(TEST_FILES, "dicomdirtests")


def _data_store(name: str) -> str:
    """A file of the pydicom-data package (a test dependency); skips where it is absent."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} comes with the pydicom-data package, which is not installed")
    return path


def _dcm2niix(files, tmp_path):
    """dcm2niix's NIfTI of ``files`` (alone in a folder), put in RAS: (voxels, affine)."""
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix is not installed (Debian package dcm2niix; make system-deps installs it)")
    src, out = tmp_path / "d2n_in", tmp_path / "d2n_out"
    shutil.rmtree(src, ignore_errors=True), shutil.rmtree(out, ignore_errors=True)
    src.mkdir(), out.mkdir()
    for i, f in enumerate(sorted(files)):
        shutil.copy(f, src / f"{i:05d}.dcm")
    proc = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "v", "-o", str(out), str(src)],
                          capture_output=True, text=True, check=False)
    # One volume ("v.nii"); dcm2niix writes an image's overlay planes beside it (v_ROI1.nii).
    assert [os.path.basename(f) for f in glob.glob(str(out / "*.nii")) if "_ROI" not in f] == ["v.nii"], proc.stdout
    img = nib.as_closest_canonical(nib.load(out / "v.nii"))
    return np.asarray(img.get_fdata(), np.float32).squeeze(), img.affine


def _ours(frames):
    data, affine = dicom.read_volume(frames)
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(img.dataobj, np.float32).squeeze(), img.affine


def _volumes(path):
    return dicom.scan(path, dicom.ScanOptions(min_slices=1)).volumes


REAL = {  # name -> (path, how many volumes the scan must find there)
    "dicomdirtests": (DIRTESTS, 18),  # a CT stack, single MR slices, mixed-orientation series split
    "MR_small": (os.path.join(TEST_FILES, "MR_small.dcm"), 1),
    "CT_small": (os.path.join(TEST_FILES, "CT_small.dcm"), 1),
}
DATA_STORE = {"siemens_mr": "MR-SIEMENS-DICOM-WithOverlays.dcm", "enhanced_ct": "eCT_Supplemental.dcm",
              "mr_1024": "MR2_UNCR.dcm"}


@pytest.mark.parametrize("name", [*REAL, *DATA_STORE])
def test_volumes_equal_dcm2niix(name, tmp_path):
    path, n_expected = REAL[name] if name in REAL else (_data_store(DATA_STORE[name]), 1)
    vols = _volumes(path)
    assert len(vols) == n_expected
    for vol in vols:
        ours, aff = _ours(vol.frames)
        ref, ref_aff = _dcm2niix({f.file for f in vol.frames}, tmp_path)
        assert ours.shape == ref.shape, vol.series_id
        # dcm2niix stores the rescale as float32 scl_slope; our float32 voxels agree to that precision.
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(ref).max())),
                                   err_msg=vol.series_id)
        np.testing.assert_allclose(aff, ref_aff, atol=1e-3, err_msg=vol.series_id)


def test_multi_slice_and_enhanced_volumes_are_found():
    """The dicomdirtests CT stack has 5 slices over two acquisition numbers (one volume, as dcm2niix
    makes it); the enhanced CT's 2 frames come from its per-frame functional groups."""
    ct = [v for v in _volumes(DIRTESTS) if len(v.frames) > 1]
    assert [len(v.frames) for v in ct] == [5]
    assert len({f.acquisition for f in ct[0].frames}) == 2
    (enh,) = _volumes(_data_store("eCT_Supplemental.dcm"))
    assert sorted(f.frame for f in enh.frames) == [0, 1] and len({f.ipp for f in enh.frames}) == 2


@pytest.mark.parametrize("variant", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                                     "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_compressed_and_big_endian_pixels_decode_like_the_uncompressed_file(variant):
    ref, ref_aff = _ours(_volumes(os.path.join(TEST_FILES, "MR_small.dcm"))[0].frames)
    out, aff = _ours(_volumes(os.path.join(TEST_FILES, variant))[0].frames)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_allclose(aff, ref_aff, atol=1e-6)


def _sr(path):
    """A Basic Text SR document (no pixels)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = "1.2.840.10008.5.1.4.1.1.88.11", ExplicitVRLittleEndian
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "SR", generate_uid(), generate_uid()
    ds.save_as(path, enforce_file_format=True)


def write_enhanced_mr(data, affine_ras, path, frame_order):
    """``data`` as one Enhanced MR object: frames in ``frame_order`` (slice indices), geometry in
    per-frame (position) and shared (orientation, spacing, rescale) functional groups."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    a = dicom.LPS_TO_RAS @ affine_ras
    dc, dr, dz = (float(np.linalg.norm(a[:3, i])) for i in range(3))
    lo, hi = float(data.min()), float(data.max())
    slope = (hi - lo) / 65535
    stored = np.rint((data - lo) / slope).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = "1.2.840.10008.5.1.4.1.1.4.1", ExplicitVRLittleEndian
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.ImageType = "MR", "E1", ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(frame_order), data.shape[1], data.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    pm, po, pv = Dataset(), Dataset(), Dataset()
    pm.PixelSpacing, pm.SliceThickness = [f"{dr:.8f}", f"{dc:.8f}"], f"{dz:.8f}"
    po.ImageOrientationPatient = [f"{v:.8f}" for v in (*(a[:3, 0] / dc), *(a[:3, 1] / dr))]
    pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = f"{slope:.10g}", f"{lo:.10g}", "US"
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([pm]), Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pv])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for k in frame_order:
        f, pp, fc = Dataset(), Dataset(), Dataset()
        pp.ImagePositionPatient = [f"{v:.6f}" for v in a[:3, 3] + k * a[:3, 2]]
        fc.InStackPositionNumber, fc.StackID, fc.DimensionIndexValues = int(k) + 1, "1", [1, int(k) + 1]
        f.PlanePositionSequence, f.FrameContentSequence = Sequence([pp]), Sequence([fc])
        per.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.ascontiguousarray(np.stack([stored[:, :, k].T for k in frame_order])).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_mr_frames_in_any_order_equal_the_volume_and_dcm2niix(tmp_path):
    rng = np.random.default_rng(3)
    data = (rng.random((20, 24, 10)) * 1000).astype(np.float32)
    aff = _oblique_affine()
    (tmp_path / "in").mkdir()
    write_enhanced_mr(data, aff, str(tmp_path / "in" / "e.dcm"), rng.permutation(10))
    (vol,) = dicom.scan(str(tmp_path / "in")).volumes
    ours, our_aff = _ours(vol.frames)
    truth = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
    np.testing.assert_allclose(our_aff, truth.affine, atol=1e-4)
    np.testing.assert_allclose(ours, np.asarray(truth.dataobj), atol=1000 / 65535)  # 16-bit storage
    ref, ref_aff = _dcm2niix([str(tmp_path / "in" / "e.dcm")], tmp_path)
    np.testing.assert_allclose(ours, ref, atol=1e-3)  # dcm2niix keeps the rescale as float32
    np.testing.assert_allclose(our_aff, ref_aff, atol=1e-3)


def test_scan_skips_what_is_not_a_volume_with_its_reason(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(DIRTESTS, tree / "dirtests")
    shutil.copy(_data_store("emri_small.dcm"), tree / "emri_small.dcm")
    shutil.copy(os.path.join(TEST_FILES, "rtstruct.dcm"), tree / "rtstruct.dcm")  # no preamble: read forced
    _sr(str(tree / "report.sr.dcm"))
    res = dicom.scan(str(tree), dicom.ScanOptions(min_slices=3))
    reason = {os.path.relpath(s["file"], tree): s["reason"] for s in res.skipped}
    assert reason["report.sr.dcm"] == "not an image (Basic Text SR Storage)"
    assert reason["rtstruct.dcm"] == "not an image (RT Structure Set Storage)"
    assert "no patient geometry" in reason["dirtests/77654033/CR1/6154"]  # a radiograph
    assert reason["dirtests/98892001/CT2N/6293"].startswith("a localiser")
    assert "not uniform" in reason["dirtests/77654033/CT2/17106"] and "gap of 202.500 mm" in reason[
        "dirtests/77654033/CT2/17106"]  # four slices, one far from the others
    assert "without functional groups" in reason["emri_small.dcm"]  # enhanced MR with no frame geometry
    assert reason["dirtests/README.txt"] == "not a DICOM file"
    assert any("1 slice (a localiser or a single image)" in r for r in reason.values())
    assert [len(v.frames) for v in res.volumes] == [5]  # only the CT stack has >= 3 slices


def _oblique_affine():
    th, ph = np.deg2rad(20.0), np.deg2rad(12.0)
    rz = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(ph), -np.sin(ph)], [0, np.sin(ph), np.cos(ph)]])
    a = np.eye(4)
    a[:3, :3] = rz @ rx @ np.diag([1.2, 1.0, 2.5])
    a[:3, 3] = [-20.0, 15.0, 5.0]
    return a


def test_sheared_stacks_are_refused_and_repeated_positions_split_by_acquisition(tmp_path):
    rng = np.random.default_rng(0)
    paths = dicom.write_series(rng.random((12, 12, 9)), np.diag([1.0, 1.0, 2.0, 1.0]), str(tmp_path / "tilt"))
    for k, p in enumerate(paths):  # shift each slice along x: a gantry tilt of atan(0.5 / 2) = 14 degrees
        ds = pydicom.dcmread(p)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0] + 0.5 * k, ipp[1], ipp[2]]
        ds.save_as(p)
    res = dicom.scan(str(tmp_path / "tilt"))
    assert not res.volumes and "sheared by 14.0 degrees" in res.skipped[0]["reason"]
    # Two acquisitions of the same slab in one series: two volumes, by acquisition number.
    for acq in (1, 2):
        for p in dicom.write_series(rng.random((12, 12, 9)), np.diag([1.0, 1.0, 2.0, 1.0]), str(tmp_path / f"rep{acq}"),
                                    series_uid="1.2.3.4", seed=str(acq)):
            ds = pydicom.dcmread(p)
            ds.AcquisitionNumber = acq
            ds.save_as(p)
    res = dicom.scan(str(tmp_path), dicom.ScanOptions(min_slices=8))
    ids = sorted(v.series_id for v in res.volumes)
    assert ids == ["1.2.3.4_1", "1.2.3.4_2"]
    assert all(len(v.frames) == 9 and len({f.acquisition for f in v.frames}) == 1 for v in res.volumes)


def test_echoes_of_one_series_are_separate_volumes(tmp_path):
    rng = np.random.default_rng(1)
    for te in (10.0, 80.0):
        for p in dicom.write_series(rng.random((10, 10, 8)), np.eye(4), str(tmp_path / f"te{te:g}"),
                                    series_uid="1.2.9", seed=str(te)):
            ds = pydicom.dcmread(p)
            ds.EchoTime = te
            ds.save_as(p)
    vols = dicom.scan(str(tmp_path)).volumes
    assert sorted(v.frames[0].echo for v in vols) == [10.0, 80.0] and all(len(v.frames) == 8 for v in vols)


def test_header_voxel_claims_are_bounded_before_pixels_are_read(tmp_path):
    dicom.write_series(np.ones((16, 16, 10)) * np.arange(10), np.eye(4), str(tmp_path / "s"))
    res = dicom.scan(str(tmp_path / "s"), dicom.ScanOptions(max_voxels=1000))
    assert not res.volumes and "over max_voxels=1,000" in res.skipped[0]["reason"]


def _tree(tmp_path, with_junk=True):
    """Two patients' DICOM studies (one oblique T2 per study) beside the NIfTI they came from, and
    a reports CSV joined by study UID for one and accession number for the other."""
    rng = np.random.default_rng(2)
    yy, xx, zz = np.mgrid[:24, :28, :14]
    rows = []
    for p in range(3):
        data = (np.exp(-((yy - 12) ** 2 + (xx - 14) ** 2 + (zz - 7) ** 2) / 60.0) * 800 + 50
                + rng.random((24, 28, 14)) * 20).astype(np.float32)
        aff = _oblique_affine()
        nib.save(nib.Nifti1Image(data, aff), tmp_path / f"p{p}.nii.gz")
        dicom.write_series(data, aff, str(tmp_path / "tree" / f"P{p}"), patient_id=f"MRN{p:03d}",
                           study_uid=f"1.2.840.99.{p}", series_uid=f"1.2.840.99.{p}.1", series_description="AX T2 FSE",
                           body_part="HEAD", age="045Y", sex="MF"[p % 2], field_strength=3.0, accession=f"ACC{p}")
        rows.append({"series_id": f"1.2.840.99.{p}.1", "study_id": f"1.2.840.99.{p}", "patient_id": f"MRN{p:03d}",
                     "image": str(tmp_path / f"p{p}.nii.gz")})
    if with_junk:
        _sr(str(tmp_path / "tree" / "P0" / "sr.dcm"))
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", "AccessionNumber", "report", "findings"])
        w.writerow(["1.2.840.99.0", "", "FINDINGS: An acute infarct.\nIMPRESSION: Infarct.", "infarct"])
        w.writerow(["", "ACC1", "FINDINGS: Normal brain.\nIMPRESSION: Normal.", ""])
    return rows


def test_oblique_series_comes_back_through_prep_with_the_same_world_coordinates(tmp_path):
    rows = _tree(tmp_path)
    from data_prep import manifest as manifest_lib

    cfg = prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(2.0, 2.0, 2.0)), workers=1,
                          dicom=prep.DicomOptions(reports=str(tmp_path / "reports.csv")))
    res = prep.run(str(tmp_path / "tree"), str(tmp_path / "from_dicom"), cfg, progress=False)
    assert res.processed == 3 and not res.errors
    assert [s["reason"] for s in res.skipped] == ["not an image (Basic Text SR Storage)"]
    ref = prep.run(manifest_lib.write(str(tmp_path / "nifti.csv"), rows), str(tmp_path / "from_nifti"), cfg,
                   progress=False)
    for r in rows:
        a = np.load(glob.glob(str(tmp_path / "from_dicom" / "cache" / "*" / f"{r['series_id']}.npz"))[0])
        b = np.load(glob.glob(str(tmp_path / "from_nifti" / "cache" / "*" / f"{r['series_id']}.npz"))[0])
        np.testing.assert_allclose(a["affine"], b["affine"], atol=1e-3)  # the same RAS grid in world mm
        assert a["volume"].shape == b["volume"].shape
        # 16-bit storage quantises by (max - min) / 65535; float16 records round to ~1e-3 on [0, 1].
        np.testing.assert_allclose(a["volume"].astype(np.float32), b["volume"].astype(np.float32), atol=3e-3)
    assert ref.processed == 3
    man = list(csv.DictReader(open(tmp_path / "from_dicom" / "dicom" / "manifest.csv")))
    by = {m["study_id"]: m for m in man}
    assert by["1.2.840.99.0"]["findings"] == "infarct" and "acute infarct" in by["1.2.840.99.0"]["report"]
    assert "Normal brain" in by["1.2.840.99.1"]["report"]  # joined by accession number
    assert by["1.2.840.99.2"]["report"] == ""  # no report: kept, without one
    m = by["1.2.840.99.1"]
    assert (m["patient_id"], m["series_description"], m["sequence"], m["body_region"], m["age"], m["sex"],
            m["modality"], m["field_strength"]) == ("MRN001", "AX T2 FSE", "T2", "brain", "045Y", "F", "MR", "3")
    errors = [json.loads(line) for line in open(tmp_path / "from_dicom" / "errors.jsonl")]
    assert [(e["status"], e["reason"]) for e in errors] == [("skipped", "not an image (Basic Text SR Storage)")]
    card = json.load(open(tmp_path / "from_dicom" / "dataset_card.json"))
    assert card["dicom"]["volumes"] == 3 and card["dicom"]["reports_joined"] == 2
    assert card["dicom"]["pseudonymised"] is False


def test_pseudonymisation_is_deterministic_under_a_salt_and_absent_without(tmp_path):
    _tree(tmp_path, with_junk=False)
    # PACS exports name folders after patients; a 3-slice series is skipped (its UID in the reason).
    os.rename(tmp_path / "tree" / "P0", tmp_path / "tree" / "MRN000_DOE^JOHN")
    dicom.write_series(np.random.default_rng(0).random((12, 12, 3)), np.eye(4),
                       str(tmp_path / "tree" / "MRN000_DOE^JOHN" / "short"), patient_id="MRN000",
                       series_uid="1.2.840.99.0.7", study_uid="1.2.840.99.0")

    def ids(salt, pseudo=True, out="o"):
        out = str(tmp_path / out)
        argv = ["prep", "--dicom", str(tmp_path / "tree"), "--out", out, "--workers", "1", "--quiet"]
        assert cli.main(argv + (["--pseudonymise", "--salt", salt] if pseudo else [])) == 0
        man = list(csv.DictReader(open(os.path.join(out, "dicom", "manifest.csv"))))
        card = json.load(open(os.path.join(out, "dataset_card.json")))
        return [(m["patient_id"], m["study_id"], m["series_id"]) for m in man], card, out

    a, card, out = ids("s3cret", out="a")
    b, _, _ = ids("s3cret", out="b")
    c, _, _ = ids("other", out="c")
    raw, raw_card, _ = ids("", pseudo=False, out="raw")
    assert a == b and a != c and len({x for row in a for x in row}) == 9  # stable, salt-dependent, no collisions
    assert cli.main(["prep", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "y"), "--pseudonymise",
                     "--salt", "x"]) == 2  # only a DICOM source is pseudonymised
    assert sorted(p for p, _, _ in raw) == ["MRN000", "MRN001", "MRN002"] and raw_card["dicom"]["pseudonymised"] is False
    assert card["dicom"]["pseudonymised"]["fields"] == ["patient_id", "study_id", "series_id"]
    text = "".join(open(f, errors="replace").read() for f in glob.glob(out + "/**/*", recursive=True)
                   if os.path.isfile(f) and not f.endswith(".npz") and "tfds" not in f and os.path.basename(f) != "SOURCE.json")
    assert "series" in text and "skipped" in text  # the series files and errors.jsonl were read
    assert "MRN00" not in text and "DOE" not in text and "1.2.840.99" not in text and "s3cret" not in text
    errors = [json.loads(line) for line in open(os.path.join(out, "errors.jsonl"))]
    assert [e["status"] for e in errors] == ["skipped"] and "3 slices" in errors[0]["reason"]
    source = json.load(open(os.path.join(out, "dicom", "SOURCE.json")))  # the one file naming the originals
    assert source["root"] == str(tmp_path / "tree") and "MRN000_DOE^JOHN/short/IM00001.dcm" in source["files"]
    assert errors[0]["file"].startswith("file #") and errors[0]["file"].endswith("of SOURCE.json")
    assert cli.main(["prep", "--dicom", str(tmp_path / "tree"), "--out", str(tmp_path / "x"), "--pseudonymise"]) == 2


def test_relative_out_copies_rounding_and_bad_headers(tmp_path, monkeypatch):
    """A relative --out; the same files twice; orientation cosines a rounding error apart; a file
    whose Rows is empty: one volume, the rest skipped with reasons, and the scan goes on."""
    rng = np.random.default_rng(4)
    paths = dicom.write_series(rng.random((12, 12, 9)) * 100, np.diag([1.0, 1.0, 2.0, 1.0]), str(tmp_path / "src" / "a"),
                               series_uid="1.2.5", seed="a")
    for k, p in enumerate(paths):  # 0.0005 +- 1e-7: either side of a 1e-3 bin edge
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = [1.0, 0.0005 + (1e-7 if k % 2 else -1e-7), 0.0, 0.0, 1.0, 0.0]
        ds.save_as(p)
    shutil.copytree(tmp_path / "src" / "a", tmp_path / "src" / "copy")
    bad = pydicom.dcmread(paths[0])
    bad.SOPInstanceUID, bad.SeriesInstanceUID, bad.Rows = "1.2.5.99", "1.2.6", None
    bad.save_as(str(tmp_path / "src" / "bad.dcm"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prep", "--dicom", "src", "--out", "rel", "--workers", "1", "--quiet"]) == 0
    card = json.load(open(tmp_path / "rel" / "dataset_card.json"))
    assert card["dicom"]["volumes"] == 1 and sum(v["series"] for v in card["counts"].values()) == 1
    reasons = [json.loads(line)["reason"] for line in open(tmp_path / "rel" / "errors.jsonl")]
    assert sum(r.startswith("a copy of") for r in reasons) == 9
    assert any("image matrix Rows=None" in r for r in reasons)


def test_sequence_hints():
    def hint(**tags):
        ds = pydicom.Dataset()
        for k, v in tags.items():
            setattr(ds, k, v)
        return dicom.sequence_hint(ds)

    assert hint(SeriesDescription="t1_tse_sag", SequenceName="*tse2d1_3") == "T1"  # Siemens T1 TSE
    assert hint(SeriesDescription="T1 FLAIR AX") == "T1"
    assert hint(SeriesDescription="t2_tirm_tra_dark-fluid") == "FLAIR"
    assert hint(SeriesDescription="AX T2 FRFSE") == "T2"
    assert hint(SeriesDescription="sag tse") == "T2"
    assert hint(SeriesDescription="ep2d_diff_tra") == "DWI"
    assert hint(SeriesDescription="Ax MPRAGE") == "T1"
    assert hint(SeriesDescription="SURVEY") == ""


def test_a_rerun_redoes_a_dicom_volume_whose_files_changed(tmp_path):
    rng = np.random.default_rng(5)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    dicom.write_series(rng.random((12, 12, 9)) * 100, aff, str(tmp_path / "src"), series_uid="1.2.7", seed="x")
    cfg = prep.PrepConfig(workers=1)
    first = prep.run(str(tmp_path / "src"), str(tmp_path / "out"), cfg, progress=False)
    again = prep.run(str(tmp_path / "src"), str(tmp_path / "out"), cfg, progress=False)
    assert (first.processed, again.reused) == (1, 1)
    dicom.write_series(rng.random((12, 12, 9)) * 100, aff, str(tmp_path / "src"), series_uid="1.2.7", seed="x")
    third = prep.run(str(tmp_path / "src"), str(tmp_path / "out"), cfg, progress=False)
    assert third.processed == 1  # the same series id, other pixels: not the stale cache entry
