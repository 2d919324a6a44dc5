"""DICOM in: our reader against dcm2niix on the same DICOM tree, and ``decipher prep --dicom``
against dcm2niix followed by ``decipher prep --manifest``.

    python benchmarks/dicom_prep.py [--patients 40] [--matrix 64]

The tree is the synthetic corpus written as DICOM (one 16-bit file per slice, the corpus's
oblique and flipped orientations kept), so every series is a real multi-slice volume. Reports:
series/s and slices/s of each reader (one process each), the agreement of the two outputs
(voxels and affines, after both are put in RAS), and the wall time of the two routes to records.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
from common import PeakRSS, machine, table  # noqa: E402


def build_tree(workdir: str, patients: int, matrix: int) -> tuple[str, str, str]:
    """(DICOM root, reports CSV, NIfTI manifest) of the synthetic corpus written as DICOM."""
    import csv

    import nibabel as nib

    from data_prep import dicom
    from data_prep import manifest as manifest_lib
    from decipher_jax.data import synthetic

    root, raw = os.path.join(workdir, "dicom"), os.path.join(workdir, "raw")
    manifest = os.path.join(raw, "manifest.csv")
    if not os.path.exists(manifest):
        manifest = synthetic.generate_corpus(raw, n_patients=patients, seed=0, matrix=matrix)
    rows = manifest_lib.read(manifest)
    reports = os.path.join(workdir, "reports.csv")
    if not os.path.isdir(root):
        study_uid = {s: f"1.2.826.0.1.99.{k}" for k, s in enumerate(dict.fromkeys(r.study_id for r in rows))}
        for i, r in enumerate(rows):
            img = nib.load(r.image)
            dicom.write_series(np.asarray(img.dataobj, np.float32), img.affine,
                               os.path.join(root + ".staging", r.patient_id, r.study_id, r.series_id),
                               patient_id=r.patient_id, study_uid=study_uid[r.study_id],
                               series_uid=f"1.2.826.0.1.99.7.{i}", series_description=r.series_description,
                               body_part=r.body_region.upper(), sex=r.sex, age=f"{int(r.age):03d}Y", accession=r.study_id,
                               series_number=i + 1)
        os.replace(root + ".staging", root)
        with open(reports, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["accession_number", "report_file", "findings"])
            for r in {r.study_id: r for r in rows}.values():
                w.writerow([r.study_id, r.report_file, r.findings])
    return root, reports, manifest


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/decipher_bench_dicom")
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--matrix", type=int, default=64)
    args = p.parse_args(argv)
    if shutil.which("dcm2niix") is None:
        sys.exit("dcm2niix is not installed (Debian package dcm2niix; `make system-deps`)")
    import nibabel as nib

    from data_prep import dicom, prep, volume

    root, reports, manifest = build_tree(args.workdir, args.patients, args.matrix)
    n_files = len(glob.glob(os.path.join(root, "**", "*.dcm"), recursive=True))

    # 1. Readers: ours (header scan + voxels + RAS affine, in memory) vs dcm2niix (to .nii files).
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        res = dicom.scan(root)
        t_scan = time.perf_counter() - t0
        ours = {v.series_id: dicom.read_volume(v.frames) for v in res.volumes}
        t_ours = time.perf_counter() - t0
    rss_ours = rss.peak
    out = tempfile.mkdtemp(prefix="d2n-")
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "%j", "-o", out, root], check=True, capture_output=True)
        t_d2n = time.perf_counter() - t0
    rss_d2n = rss.peak
    # Agreement, after both are put in RAS.
    worst_vox, worst_aff, equal = 0.0, 0.0, 0
    for sid, (data, aff) in ours.items():
        a = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
        b = nib.as_closest_canonical(nib.load(os.path.join(out, f"{sid}.nii")))
        va, vb = np.asarray(a.dataobj, np.float32), np.asarray(b.get_fdata(), np.float32)
        dv = float(np.abs(va - vb).max() / max(1.0, np.abs(vb).max()))
        da = float(np.abs(a.affine - b.affine).max())
        worst_vox, worst_aff = max(worst_vox, dv), max(worst_aff, da)
        equal += dv < 1e-6 and da < 1e-3
    shutil.rmtree(out)
    n = len(ours)
    print(f"# {machine()}; {n} series, {n_files} DICOM files ({args.patients} patients, matrix {args.matrix})")
    print(table(["reader", "series/s", "slices/s", "peak RSS MiB"], [
        ["decipher_jax: header scan + voxels + RAS affine (in memory)", f"{n / t_ours:.1f}", f"{n_files / t_ours:.0f}",
         f"{rss_ours / 2**20:.0f}"],
        ["  of which the header scan", f"{n / t_scan:.1f}", f"{n_files / t_scan:.0f}", ""],
        ["dcm2niix -z n (writes .nii)", f"{n / t_d2n:.1f}", f"{n_files / t_d2n:.0f}", f"{rss_d2n / 2**20:.0f}"],
    ]))
    print(f"agreement: {equal}/{n} series equal (voxels rel. 1e-6, affine 1e-3 mm); worst voxel rel. diff "
          f"{worst_vox:.2e}, worst affine diff {worst_aff:.2e} mm")

    # 2. Routes to records: prep --dicom vs dcm2niix then prep --manifest (two workers each).
    cfg = prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(2.0,) * 3), workers=2,
                          dicom=prep.DicomOptions(reports=reports))
    work = tempfile.mkdtemp(prefix="dprep-")
    t0 = time.perf_counter()
    r1 = prep.run(root, os.path.join(work, "a"), cfg, progress=False)
    t_route_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(["dcm2niix", "-z", "y", "-b", "n", "-f", "%j", "-o", work, root], check=True, capture_output=True)
    t_conv = time.perf_counter() - t0
    r2 = prep.run(manifest, os.path.join(work, "b"), cfg, progress=False)  # the corpus's own NIfTI manifest
    t_route_d2n = time.perf_counter() - t0
    shutil.rmtree(work)
    print(table(["route to records (2 workers)", "seconds", "series"], [
        ["decipher prep --dicom (scan, read, resample, records)", f"{t_route_ours:.1f}", str(r1.processed)],
        ["dcm2niix -z y, then decipher prep --manifest (of the same series as NIfTI)",
         f"{t_route_d2n:.1f} ({t_conv:.1f} converting)",
         str(r2.processed)],
    ]))


if __name__ == "__main__":
    main()
