"""The embedded default corpus: synthetic studies plus real template volumes from packages.

- Synthetic: :mod:`decipher_jax.data.synthetic` (NIfTI + masks + reports, deterministic).
- Real, PyPI: nilearn's MNI152 2009 T1 template with a label map from its grey / white
  matter probability maps (0 background, 1 grey, 2 white matter).
- Real, Debian ``mricron-data`` (when installed): Colin27 ``ch2bet`` T1 with the 116-label
  AAL atlas on the same grid.

Everything goes into one manifest consumed by ``decipher prep``, exactly as real data would; the
real volumes' rows have the role ``template`` (their label maps are tissue classes, not lesions).
"""

from __future__ import annotations

import csv
import os

import nibabel as nib
import numpy as np

from data_prep import manifest as manifest_lib
from data_prep import schema
from decipher_jax.data import synthetic

MRICRON = "/usr/share/mricron/templates"
REAL_REPORT = ("EXAMINATION: MRI brain.\nTECHNIQUE: T1 sequence.\n\nFINDINGS:\nNormal adult brain template. "
               "The ventricles are normal in size. No acute infarct. No intracranial mass.\n\nIMPRESSION:\nNormal study.\n")


def real_volumes(out_dir: str) -> list[dict]:
    """Writes the packaged real volumes (with label maps) and returns manifest rows."""
    rows = []
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)  # packaged volumes are referenced by absolute path
    rep = os.path.join(out_dir, "template_report.txt")
    with open(rep, "w") as f:
        f.write(REAL_REPORT)
    try:
        from nilearn import datasets

        t1 = datasets.load_mni152_template(resolution=1)
        gm = datasets.load_mni152_gm_template(resolution=1).get_fdata()
        wm = datasets.load_mni152_wm_template(resolution=1).get_fdata()
        lab = np.where((gm > 0.5) & (gm >= wm), 1, np.where(wm > 0.5, 2, 0)).astype(np.uint8)
        ip, lp = os.path.join(out_dir, "mni152_T1.nii.gz"), os.path.join(out_dir, "mni152_gmwm.nii.gz")
        nib.save(nib.Nifti1Image(t1.get_fdata().astype(np.float32), t1.affine), ip)
        nib.save(nib.Nifti1Image(lab, t1.affine), lp)
        rows.append(_row("MNI152_T1", ip, lp, rep))
    except ImportError:
        pass
    ch2, aal = os.path.join(MRICRON, "ch2bet.nii.gz"), os.path.join(MRICRON, "aal.nii.gz")
    if os.path.exists(ch2) and os.path.exists(aal):
        rows.append(_row("COLIN27_T1", ch2, aal, rep))
    return rows


def _row(name, image, label, report):
    return {"series_id": name, "study_id": f"{name}_study", "patient_id": f"template_{name}", "image": image,
            "label": label, "report_file": report, "sequence": "T1", "body_region": "brain", "role": schema.TEMPLATE}


def build(out_dir: str, n_patients: int = 40, seed: int = 0, matrix: int = 40, real: bool = True,
          version: int = synthetic.GENERATOR_VERSION) -> str:
    """Generates the corpus under ``out_dir`` and returns the combined manifest path.
    ``version``: the synthetic generator's (:func:`synthetic.generate_corpus`)."""
    synth_dir = os.path.join(out_dir, "synthetic")
    synth_manifest = synthetic.generate_corpus(synth_dir, n_patients=n_patients, seed=seed, matrix=matrix,
                                               version=version)
    with open(synth_manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    # Re-base the synthetic manifest's relative paths onto this manifest's folder.
    for r in rows:
        for k in schema.PATHS:
            if r[k] and not os.path.isabs(r[k]):
                r[k] = os.path.relpath(os.path.join(synth_dir, r[k]), out_dir)
    if real:
        rows += real_volumes(os.path.join(out_dir, "real"))
    return manifest_lib.write(os.path.join(out_dir, "manifest.csv"), rows)
