"""Deterministic generator of synthetic MRI studies: real NIfTI files, masks and reports.

Anatomy is defined analytically in world (RAS, millimetre) coordinates as ellipsoids, so a
series sampled through any affine (anisotropic spacing, flipped axes, oblique rotation)
shows the same anatomy at the same world position. Four body regions, four sequences
(tissue contrasts), findings with ground-truth lesion masks, a missing organ, a smooth bias
field and Rician noise; radiology-style reports state the findings with varied wording and
negations. Several series of one study share one report (multiple positives in stage 2).

Age and sex show in the anatomy, so that probes for them measure something: the body is
about 6 % larger in men than in women (every region, with 2 % spread), and with age the
ventricles widen and the brain shrinks from the skull, and knee cartilage and spinal discs
thin (:func:`age_fraction`). Version 5 adds changes large enough to see at the evaluation's
32^3 outside the brain too (:func:`age_body`): muscle shrinks and fat infiltrates it, marrow
turns fatty, discs desiccate, each by a patient's ageing fraction (age plus a biological
spread, :func:`ageing`). The reports say so as a radiologist would: a history line with the
patient's age and sex, and the degree of the brain's atrophy, cartilage or disc thinning among
the findings (version 5's changes go unmentioned, as age-appropriate changes often do: with
sentences on them, stage 2 aligned to those instead of the findings; BENCHMARKS.md, "Age in
the image").

    manifest = generate_corpus("data/synthetic", n_patients=40, seed=0)

:func:`generate_multiparam_corpus` writes multi-parametric brain studies instead (issue 22): up
to four sequences per study, each acquired on its own grid, some missing, with findings that
no single sequence tells apart (a hyperacute infarct seen on DWI only, its timing only with
FLAIR or T2, a haematoma bright on T1 alone); prepare it with ``decipher prep --studies resample``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import nibabel as nib
import numpy as np

from data_prep import manifest as manifest_lib

SEQUENCES = ("T1", "T2", "FLAIR", "DWI")

# tissue -> intensity per sequence (T1, T2, FLAIR, DWI), roughly the real contrasts.
TISSUE = {
    "background": (0.0, 0.0, 0.0, 0.0),
    "fat": (0.9, 0.7, 0.6, 0.1),
    "skin": (0.6, 0.5, 0.4, 0.15),
    "bone": (0.15, 0.1, 0.1, 0.05),
    "marrow": (0.7, 0.5, 0.4, 0.1),
    "csf": (0.1, 0.95, 0.05, 0.05),
    "gm": (0.45, 0.6, 0.55, 0.35),
    "wm": (0.65, 0.45, 0.4, 0.3),
    "muscle": (0.4, 0.3, 0.3, 0.2),
    "cartilage": (0.35, 0.55, 0.5, 0.25),
    # Free water is suppressed on FLAIR, as CSF is (version 3: 0.3, level with muscle, so a knee
    # effusion did not show on FLAIR at all).
    "fluid": (0.15, 0.9, 0.05, 0.1),
    "ligament": (0.08, 0.08, 0.08, 0.05),
    "disc": (0.35, 0.7, 0.5, 0.25),
    "cord": (0.5, 0.5, 0.45, 0.3),
    "liver": (0.55, 0.35, 0.35, 0.3),
    "kidney": (0.22, 0.6, 0.55, 0.45),  # darker than muscle on T1 (version 1: 0.4, the same; 3: 0.28)
    "spleen": (0.45, 0.55, 0.5, 0.5),
    # findings
    "infarct": (0.3, 0.85, 0.9, 1.0),
    # A solid tumour: iso to grey matter on T2 / FLAIR and restricting diffusion, so its core
    # stands out of the bright oedema ring on three sequences (version 2: (0.3, 0.75, 0.7, 0.55),
    # a bright blob like an infarct on every sequence but DWI).
    "mass": (0.25, 0.5, 0.45, 0.75),
    "cyst": (0.1, 1.0, 0.2, 0.05),
    "cord_lesion": (0.4, 0.9, 0.85, 0.6),
    "edema": (0.38, 0.85, 0.8, 0.4),  # vasogenic (round a mass) or bone-bruise / torn-ligament oedema
    # A fractured vertebral body's marrow oedema: dark on T1, and on T2 and FLAIR brighter than
    # the paravertebral fat it sits in (the plain "edema" was level with that fat there).
    "marrow_edema": (0.2, 0.95, 0.95, 0.3),
    # The multi-parametric corpus (generate_multiparam_corpus). A hyperacute infarct (the first
    # hours): cytotoxic oedema restricts diffusion, but no free water has gathered yet, so it is
    # iso on T1 / T2 / FLAIR (between grey and white matter, nearer the white matter it mostly
    # lies in: within 0.1 of both) and bright on DWI only, as bright as an acute infarct: DWI alone
    # cannot time it, DWI with FLAIR or T2 can (the DWI-FLAIR mismatch).
    "hyperacute_infarct": (0.55, 0.5, 0.45, 1.0),
    # A subacute parenchymal haematoma (methaemoglobin): bright on T1, dark on T2 / FLAIR / DWI.
    "hemorrhage": (0.95, 0.2, 0.3, 0.15),
}

# region -> (field of view in mm (x, y, z), findings it can have)
REGIONS = {
    "brain": ((180.0, 210.0, 170.0), ("infarct", "mass")),
    "knee": ((150.0, 150.0, 170.0), ("effusion", "acl_tear")),
    "spine": ((120.0, 140.0, 260.0), ("fracture", "cord_lesion")),
    "abdomen": ((320.0, 240.0, 220.0), ("liver_lesion", "absent_kidney")),
}
FINDINGS = tuple(f for _, fs in REGIONS.values() for f in fs)
# The sequences each region's protocol acquires (a study draws 2-3 of them): a finding is then
# visible on every series it is labelled on (tests/test_synthetic.py). Version 3 drew any of
# the four everywhere, so a knee effusion was labelled on DWI series where fluid and muscle are
# both dark, and a spine series could be a DWI of nothing in particular.
PROTOCOLS = {"brain": SEQUENCES, "knee": ("T1", "T2", "FLAIR"), "spine": ("T1", "T2", "FLAIR"),
             "abdomen": ("T1", "T2", "DWI")}


@dataclasses.dataclass
class Ellipsoid:
    tissue: str
    center: np.ndarray  # mm, RAS
    radii: np.ndarray  # mm
    lesion: bool = False
    # A share of the tissue's signal replaced by another tissue's (``amount`` of ``toward``'s):
    # version 5's age-related changes, e.g. fatty infiltration of muscle (:func:`age_body`).
    toward: str = ""
    amount: float = 0.0

    def inside(self, xyz: np.ndarray) -> np.ndarray:
        d = (xyz - self.center) / self.radii
        return np.einsum("...i,...i->...", d, d) <= 1.0

    def intensity(self, col: int) -> float:
        """The part's signal in sequence column ``col`` of :data:`TISSUE`."""
        v = TISSUE[self.tissue][col]
        return (1.0 - self.amount) * v + self.amount * TISSUE[self.toward][col] if self.toward else v


def _e(tissue, c, r, lesion=False):
    return Ellipsoid(tissue, np.asarray(c, float), np.asarray(r, float), lesion)


def age_fraction(age) -> float:
    """0 at 18 years, 1 at 90: how far age-related changes have gone."""
    return float(np.clip((float(age) - 18.0) / 72.0, 0.0, 1.0))


def _brain_anatomy(r: np.random.Generator, age: float = 50) -> list[Ellipsoid]:
    """The normal head: scalp, skull, CSF, grey and white matter, then the two lateral ventricles
    (``parts[5:7]``). Two draws (head size, ventricle width), shared by :func:`_brain` and the
    multi-parametric corpus; factored out of ``_brain`` with its draws in the same order, so
    ``generate_corpus`` is byte-identical (tests/test_multiparam_data.py checks it against the
    generator before the factoring)."""
    a = age_fraction(age)
    s = r.uniform(0.92, 1.08)  # head size
    shrink = 1.0 - 0.08 * a  # atrophy: the brain pulls away from the skull, CSF fills the gap
    parts = [
        _e("skin", (0, 0, 0), np.array([78, 98, 75]) * s),
        _e("bone", (0, 0, 0), np.array([74, 94, 71]) * s),
        _e("csf", (0, 0, 0), np.array([70, 90, 67]) * s),
        _e("gm", (0, 0, 0), np.array([67, 87, 64]) * s * shrink),
        _e("wm", (0, 0, 2), np.array([55, 74, 50]) * s * shrink),
    ]
    vent = 0.8 + 0.6 * a + r.uniform(0.0, 0.2)  # ventricles widen with age (one draw, as before)
    parts += [_e("csf", (sx * 9, 5, 10), np.array([6, 25, 9]) * vent) for sx in (-1, 1)]
    return parts


def _efface_ventricle(parts: list[Ellipsoid], side) -> None:
    """A mass's effect: the lateral ventricle on its ``side`` (of ``parts[5:7]``) squeezed, in place."""
    for j, p in enumerate(parts[5:7]):
        if np.sign(p.center[0]) == side:
            parts[5 + j] = _e("csf", p.center - np.array([side * 4.0, 0, 0]), p.radii * np.array([0.35, 0.6, 0.6]))


def _brain(r: np.random.Generator, findings: set[str], facts: dict, age: float = 50) -> list[Ellipsoid]:
    parts = _brain_anatomy(r, age)
    # Sizes at the evaluation's scale (LESIONS): an infarct 24-44 mm, a mass 20-36 mm inside its
    # oedema (the reports' "surrounding edema"), 1.5x wider; both painted in the lesion mask.
    for f in ("infarct", "mass"):
        if f in findings:
            side = r.choice([-1, 1])
            y = r.uniform(-45, 45)
            rad = r.uniform(*LESIONS[f])
            # An infarct sits in a cortical territory, a mass (a glioma) deep in the white matter
            # beside the ventricle it compresses (version 3: both 22-34 mm from the midline, and
            # no mass effect, so on T2 and FLAIR a mass's oedema and an infarct looked alike).
            c = (side * r.uniform(*((22, 34) if f == "infarct" else (12, 22))), y, r.uniform(-5, 20))
            radii = np.array([rad, rad * r.uniform(0.8, 1.2), rad])
            if f == "mass":
                _efface_ventricle(parts, side)  # the lateral ventricle on the mass's side
                parts.append(_e("edema", c, radii * 1.5, True))
            parts.append(_e(f, c, radii, True))
            facts[f] = {"side": "right" if side > 0 else "left", "lobe": "frontal" if y > 15 else "parietal" if y > -20 else "occipital",
                        "size_mm": int(round(2 * rad))}
    return parts


def _knee(r, findings, facts, age=50):
    cart = 6.0 - 3.0 * age_fraction(age)  # cartilage thins with age
    parts = [
        _e("skin", (0, 0, 0), (62, 62, 90)), _e("fat", (0, 0, 0), (58, 58, 88)), _e("muscle", (0, 5, 0), (48, 48, 86)),
        _e("bone", (0, 0, 45), (32, 30, 48)), _e("marrow", (0, 0, 45), (28, 26, 44)),  # femur
        _e("bone", (0, 0, -45), (30, 28, 46)), _e("marrow", (0, 0, -45), (26, 24, 42)),  # tibia
        _e("cartilage", (0, 0, 0), (30, 28, cart)),
    ]
    if "effusion" in findings:  # the suprapatellar recess distended, by the size the report states
        size = str(r.choice(["small", "moderate", "large"]))
        k = {"small": 0.8, "moderate": 1.0, "large": 1.25}[size]
        parts.append(_e("fluid", (0, 30, 20), np.array([30, 12, 28]) * k, True))
        facts["effusion"] = {"size": size}
    if "acl_tear" not in findings:  # an intact ACL: a dark band through the notch, 10 x 32 x 10 mm
        parts.append(_e("ligament", (0, 0, 0), (5, 16, 5)))
    else:  # torn: the band is gone and oedema / haemorrhage fills the notch (bright on T2, FLAIR),
        # with the pivot-shift ("kissing") bone contusions of the lateral femoral condyle and the
        # posterior lateral tibial plateau that accompany most acute tears (version 2: the notch only).
        parts.append(_e("edema", (0, 0, 0), (7, 15, 7), True))
        side = 1.0  # lateral
        parts.append(_e("edema", (side * 14, -4, 16), (13, 15, 11), True))
        parts.append(_e("edema", (side * 14, -12, -14), (13, 11, 9), True))
        facts["acl_tear"] = {"kind": r.choice(["complete", "full-thickness"])}
    return parts


def _spine(r, findings, facts, age=50):
    disc = 6.0 - 3.0 * age_fraction(age)  # discs lose height with age
    parts = [_e("skin", (0, 0, 0), (58, 68, 140)), _e("fat", (0, 0, 0), (54, 64, 138)), _e("muscle", (0, -20, 0), (48, 40, 136))]
    levels = ["L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
    for i in range(5):
        z = -100 + i * 45
        parts += [_e("bone", (0, 20, z), (22, 18, 17)), _e("marrow", (0, 20, z), (19, 15, 14)), _e("disc", (0, 20, z + 22), (20, 16, disc))]
    parts += [_e("csf", (0, -8, 0), (9, 8, 130)), _e("cord", (0, -8, 20), (5, 5, 90))]
    if "fracture" in findings:  # an acute compression fracture: the body loses height, its marrow is oedema
        i = int(r.integers(0, 5))
        z = -100 + i * 45
        loss = float(r.uniform(*LESIONS["fracture"]))
        k = 1.0 - loss
        for j, p in enumerate(parts):
            if p.tissue in ("bone", "marrow") and p.center[2] == z:
                parts[j] = _e("marrow_edema" if p.tissue == "marrow" else "bone", p.center, p.radii * np.array([1.0, 1.0, k]),
                              lesion=p.tissue == "marrow")
        facts["fracture"] = {"level": f"L{i + 1}", "loss": int(round(100 * loss / 5) * 5)}
    if "cord_lesion" in findings:  # an expansile intramedullary lesion: wider than the 10 mm cord
        z = r.uniform(0, 70)
        rx, rz = LESIONS["cord_lesion"][0], r.uniform(*LESIONS["cord_lesion"][1:])
        parts.append(_e("cord_lesion", (0, -8, z), (rx, rx, rz), True))
        facts["cord_lesion"] = {"size_mm": int(round(2 * rz))}
    return parts


def _abdomen(r, findings, facts, age=50):
    parts = [_e("skin", (0, 0, 0), (150, 110, 105)), _e("fat", (0, 0, 0), (146, 106, 103)), _e("muscle", (0, 0, 0), (130, 92, 100)),
             _e("liver", (-55, 20, 35), (60, 48, 45)), _e("spleen", (70, -10, 40), (22, 28, 30)), _e("bone", (0, -60, 0), (14, 14, 100))]
    absent = None
    if "absent_kidney" in findings:
        absent = r.choice([-1, 1])
        facts["absent_kidney"] = {"side": "right" if absent > 0 else "left"}
    for sx in (-1, 1):  # about 11 x 5 x 4.5 cm (version 2: 6.4 x 3.6 x 3.2 cm, small for an adult)
        if sx != absent:
            parts.append(_e("kidney", (sx * 55, -42, -15), (25, 22, 55)))
    if "liver_lesion" in findings:
        rad = r.uniform(*LESIONS["liver_lesion"])
        parts.append(_e("cyst", (-55 + r.uniform(-20, 20), 20 + r.uniform(-15, 15), 35 + r.uniform(-15, 15)), (rad, rad, rad), True))
        facts["liver_lesion"] = {"size_mm": int(round(2 * rad)), "segment": r.choice(["right lobe", "left lobe"])}
    return parts


BUILDERS = {"brain": _brain, "knee": _knee, "spine": _spine, "abdomen": _abdomen}
# Lesion radii (mm): (low, high) of a uniform draw; herniation (x, y, z); cord lesion (width,
# low, high of its half-length). Chosen so that each finding shows at the evaluation's scale (a
# whole region resized to 32^3: ~5 mm voxels in the brain, 4 x 4 x 8 mm in the spine, 10 mm in
# the abdomen): tests/test_synthetic.py checks that every finding changes enough voxels there.
# Generator version 1 drew infarct and mass radii of 9-20 mm (no oedema), liver cyst radii of
# 8-18 mm, cord lesions 4 mm in radius (inside the 5 mm cord), herniations of 8 x 9 x 5 mm at
# the disc's back edge, an ACL 8 mm thick whose tear left no trace but its absence, and a bias
# field of up to 2x: on its demo corpus a ResNet-10 trained on the finding labels reached a
# mean test AUROC of 0.59 (BENCHMARKS.md, "A learnable world").
#
# Version 4 replaced the disc herniation with an acute vertebral compression fracture (the
# vertebral body's height loss, a fraction drawn from LESIONS["fracture"], and its marrow
# turned to oedema: dark on T1, bright on T2 and FLAIR). At 32^3 over the spine's 260 mm the
# canal is 5 x 4 voxels across, so the herniation's disc material displacing its CSF changed
# 12-14 voxels on three of the four sequences and no model learnt it (best test AUROC 0.55:
# the BatchNorm CNN; MONAI's ResNet-10 0.55, a voxel logistic regression 0.53).
LESIONS = {"infarct": (18.0, 28.0), "mass": (14.0, 22.0), "liver_lesion": (20.0, 32.0),
           "fracture": (0.15, 0.4), "cord_lesion": (7.5, 32.0, 50.0)}
# Version 5 added the age-related changes of AGEING (age_body) to the images; its corpus (the
# reports included) is version 4's otherwise (generate_corpus(version=4) still writes that one).
GENERATOR_VERSION = 5


def scale_body(parts: list[Ellipsoid], facts: dict, scale: float) -> list[Ellipsoid]:
    """The whole phantom scaled about the world origin (body size); lesion sizes in ``facts``
    follow, so the report states what the image shows."""
    for f in facts.values():
        if "size_mm" in f:
            f["size_mm"] = int(round(f["size_mm"] * scale))
    return [dataclasses.replace(p, center=p.center * scale, radii=p.radii * scale) for p in parts]


def body_scale(sex: str, seed: int, patient: int, stream: tuple[int, ...] = ()) -> float:
    """Men about 6 % larger than women, 2 % spread; its own random stream, so the rest of a
    patient's draws do not depend on it. ``stream``: entropy appended to that stream's key, so
    another corpus's patient ``patient`` is not the same size as this one's (``()``: the
    stream of ``generate_corpus``)."""
    r = np.random.default_rng([seed, patient, 1, *stream])
    return float((1.06 if sex == "M" else 0.94) * np.exp(0.02 * r.standard_normal()))


# Version 5's age-related changes outside the brain (:func:`age_body`), at the patient's ageing
# fraction g in [0, 1] (:func:`ageing`): tissue -> (the tissue its signal moves toward, the share
# moved at g = 1, the radius lost at g = 1). Sarcopenia: muscle shrinks and fat infiltrates it
# (thigh, paraspinal and abdominal wall muscle; the abdomen's "muscle" part is its whole interior,
# so there visceral fat grows); red-to-yellow conversion of the vertebral and long-bone marrow;
# disc desiccation (a degenerate disc turns fibrous, dark on T2). Version 4 changed only the
# cartilage and the discs' height with age, by 1-3 mm: at the evaluation's 32^3 (about 5 mm
# voxels in the knee, 8 mm along the spine) no model read age there (a ridge regression on the
# intensity histogram: knee and spine MAE at the training-mean floor, the brain 9.1 years
# against 16.2; BENCHMARKS.md, "Age in the image").
AGEING = {"muscle": ("fat", 0.55, 0.12), "marrow": ("fat", 0.6, 0.0), "disc": ("ligament", 0.6, 0.0)}
AGEING_SPREAD = 0.1  # the standard deviation of a patient's ageing fraction about age_fraction(age)


def ageing(seed: int, patient: int, age) -> float:
    """A patient's ageing fraction: :func:`age_fraction` plus a biological spread of
    ``AGEING_SPREAD`` (about 7 years), clipped to [0, 1]. Its own random stream (as
    :func:`body_scale`), so the rest of a patient's draws do not depend on it."""
    r = np.random.default_rng([seed, patient, 4])
    return float(np.clip(age_fraction(age) + AGEING_SPREAD * r.standard_normal(), 0.0, 1.0))


def age_body(parts: list[Ellipsoid], g: float) -> list[Ellipsoid]:
    """The parts with :data:`AGEING`'s changes at ageing fraction ``g``: each listed tissue's
    signal moved toward another's and its radii shrunk about its centre. Lesions and other
    tissues are unchanged (a fracture's marrow oedema stays oedema)."""
    out = []
    for p in parts:
        if p.tissue in AGEING and not p.lesion:
            toward, share, loss = AGEING[p.tissue]
            p = dataclasses.replace(p, radii=p.radii * (1.0 - loss * g), toward=toward, amount=share * g)
        out.append(p)
    return out


def render(parts: list[Ellipsoid], affine: np.ndarray, shape, sequence: str):
    """Samples the phantom at voxel centres: (intensity, lesion mask) in voxel space."""
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    col = SEQUENCES.index(sequence)
    img = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    for p in parts:  # later parts paint over earlier ones
        inside = p.inside(xyz)
        img[inside] = p.intensity(col)
        if p.lesion:
            mask[inside] = 1
    return img, mask, xyz


def random_affine(r: np.random.Generator, fov, shape) -> np.ndarray:
    """Anisotropic spacing, a random axis permutation with flips, and up to 12 deg obliquity."""
    spacing = np.array(fov) / np.array(shape)
    perm = r.permutation(3) if r.random() < 0.4 else np.arange(3)
    flips = np.where(r.random(3) < 0.35, -1.0, 1.0)
    base = np.zeros((3, 3))
    for vox_axis, world_axis in enumerate(perm):
        base[world_axis, vox_axis] = flips[vox_axis] * spacing[world_axis]
    angle = np.deg2rad(r.uniform(-12, 12)) if r.random() < 0.4 else 0.0
    ax = r.integers(0, 3)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.eye(3)
    i, j = [k for k in range(3) if k != ax]
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    lin = rot @ base
    aff = np.eye(4)
    aff[:3, :3] = lin
    vox_shape = np.array(shape)[perm]  # voxel axis k samples world axis perm[k]
    aff[:3, 3] = -lin @ ((vox_shape - 1) / 2.0)  # centre the volume on the world origin
    return aff, tuple(int(v) for v in vox_shape)


def bias_and_noise(r: np.random.Generator, img: np.ndarray, xyz: np.ndarray, noise: float) -> np.ndarray:
    scale = np.abs(xyz).max() + 1e-6
    # A smooth multiplicative bias field, about +-10-25 % across the field of view (version 1:
    # up to 2x, which buried every lesion's contrast in a global histogram).
    g = r.normal(0, 0.1, 3)
    field = np.exp((xyz / scale) @ g + 0.05 * r.normal() * ((xyz / scale) ** 2).sum(-1))
    a = img * field.astype(np.float32)
    n1, n2 = r.normal(0, noise, (2,) + img.shape).astype(np.float32)
    return np.sqrt((a + n1) ** 2 + n2**2)  # Rician magnitude noise


# ---------------------------------------------------------------------------------------------
# Reports

_POS = {
    "infarct": ["Restricted diffusion in the {side} {lobe} lobe consistent with an acute infarct.",
                "Acute ischemic infarct involving the {side} {lobe} lobe, measuring {size_mm} mm.",
                "There is an area of acute infarction in the {side} {lobe} region."],
    "mass": ["A {size_mm} mm mass in the {side} {lobe} lobe with surrounding edema.",
             "Heterogeneous intra-axial lesion in the {side} {lobe} lobe, suspicious for neoplasm.",
             "There is a space-occupying lesion of the {side} {lobe} lobe measuring {size_mm} mm."],
    "effusion": ["{size} joint effusion.", "There is a {size} knee joint effusion.", "Suprapatellar effusion, {size}."],
    "acl_tear": ["{kind} tear of the anterior cruciate ligament.", "The ACL is not visualized, compatible with a {kind} tear.",
                 "Anterior cruciate ligament rupture."],
    "fracture": ["Acute compression fracture of the {level} vertebral body with {loss}% height loss.",
                 "{level} compression deformity with marrow edema, consistent with an acute fracture.",
                 "There is an acute fracture of {level} with about {loss}% loss of vertebral body height."],
    "cord_lesion": ["T2 hyperintense lesion within the spinal cord, {size_mm} mm in length.",
                    "Intramedullary signal abnormality suggestive of myelitis.", "Focal cord lesion is present."],
    "liver_lesion": ["A {size_mm} mm cystic lesion in the {segment} of the liver.",
                     "Simple hepatic cyst in the {segment}, {size_mm} mm.", "There is a focal liver lesion, likely a cyst."],
    "absent_kidney": ["The {side} kidney is surgically absent.", "Status post {side} nephrectomy.",
                      "The {side} kidney is not visualized, consistent with prior nephrectomy."],
}
_NEG = {
    "infarct": ["No acute infarct.", "No evidence of restricted diffusion.", "There is no acute ischemic stroke."],
    "mass": ["No intracranial mass.", "No mass effect or midline shift.", "No space-occupying lesion is identified."],
    "effusion": ["No joint effusion.", "There is no effusion."],
    "acl_tear": ["The ACL is intact.", "Cruciate ligaments are intact.", "No ligament tear."],
    "fracture": ["Vertebral body heights are maintained.", "No fracture.", "No vertebral compression deformity."],
    "cord_lesion": ["The spinal cord is normal in signal.", "No cord lesion."],
    "liver_lesion": ["No focal liver lesion.", "The liver is unremarkable."],
    "absent_kidney": ["Both kidneys are present and normal in size.", "Kidneys are unremarkable."],
}
_NORMAL = {
    "brain": ["Gray-white matter differentiation is preserved."],
    "knee": ["The menisci are intact.", "Bone marrow signal is normal."],
    "spine": ["Normal lumbar lordosis.", "No spondylolisthesis."],
    "abdomen": ["The spleen is normal.", "No free fluid."],
}
_IMPRESSION_NORMAL = ["No acute abnormality.", "Normal study.", "Unremarkable examination."]
# What a radiologist writes about the age-related changes the phantoms show (``age_fraction``:
# atrophy, cartilage and disc thinning), by degree: below 0.35, up to 0.7, above.
_AGEING = {
    "brain": (["The ventricles are normal in size.", "Brain volume is normal."],
              ["Mild generalized volume loss.", "Mild prominence of the ventricles and sulci."],
              ["Moderate generalized cerebral atrophy with ventricular enlargement.",
               "Marked volume loss with enlarged ventricles."]),
    "knee": (["Articular cartilage is preserved."], ["Mild cartilage thinning."],
             ["Diffuse cartilage thinning, consistent with osteoarthritis."]),
    "spine": (["Disc heights are preserved."], ["Mild loss of disc height at multiple levels."],
              ["Multilevel degenerative disc disease with marked loss of disc height."]),
}
# The clinical-history line: the request's demographics and reason.
_WHY = {
    "brain": ["headache", "dizziness", "new neurological deficit", "follow-up"],
    "knee": ["knee pain", "twisting injury", "swelling", "follow-up"],
    "spine": ["low back pain", "radiculopathy", "leg weakness", "follow-up"],
    "abdomen": ["abdominal pain", "abnormal liver function tests", "flank pain", "follow-up"],
}
_HISTORY = ["HISTORY: {age}-year-old {noun} with {why}.", "INDICATION: {Why}. {age} year old {noun}.",
            "HISTORY: {Why} in a {age}-year-old {noun}."]


def write_report(r: np.random.Generator, region: str, sequences, findings: set[str], facts: dict,
                 age=None, sex: str | None = None) -> str:
    """A radiology report: examination, history (when ``age`` is given), technique, findings
    (the study's findings or their negations, the brain's age-related changes, normal
    statements) and the impression. Version 5's changes outside the brain (:func:`age_body`)
    go unmentioned, as age-appropriate changes often do: the history states the age."""
    lines = [f"EXAMINATION: MRI {region}."]
    if age is not None:
        noun = {"M": ["man", "male"], "F": ["woman", "female"]}.get(sex or "", ["patient"])
        why = str(r.choice(_WHY[region]))
        form = str(r.choice(_HISTORY))
        lines.append(form.format(age=int(age), noun=str(r.choice(noun)), why=why, Why=why[0].upper() + why[1:]))
    lines += [f"TECHNIQUE: {', '.join(sequences)} sequences.", "", "FINDINGS:"]
    sentences = []
    if age is not None and region in _AGEING:
        degree = int(np.searchsorted([0.35, 0.7], age_fraction(age)))
        sentences.append(str(r.choice(_AGEING[region][degree])))
    for f in REGIONS[region][1]:
        if f in findings:
            t = str(r.choice(_POS[f])).format(**facts.get(f, {}))
            sentences.append(t[0].upper() + t[1:])
        elif r.random() < 0.8:
            sentences.append(str(r.choice(_NEG[f])))
    sentences += [s for s in _NORMAL[region] if r.random() < 0.6]
    order = r.permutation(len(sentences))
    lines.append(" ".join(sentences[i] for i in order))
    lines += ["", "IMPRESSION:"]
    pos = [str(r.choice(_POS[f])).format(**facts.get(f, {})) for f in REGIONS[region][1] if f in findings]
    lines.append(" ".join(p[0].upper() + p[1:] for p in pos) if pos else str(r.choice(_IMPRESSION_NORMAL)))
    return "\n".join(lines) + "\n"


# Series descriptions as scanners write them (DICOM SeriesDescription): vendor conventions
# differ, so one sequence has several spellings; the plane follows the body region.
_PLANES = {"brain": ["AX", "AX", "SAG"], "knee": ["SAG", "COR"], "spine": ["SAG", "SAG", "AX"], "abdomen": ["AX", "COR"]}
_SIEMENS_PLANE = {"AX": "tra", "SAG": "sag", "COR": "cor"}
_DESCRIPTIONS = {
    "T1": ["{P} T1", "{P} T1 SE", "t1_se_{p}", "T1W_SE {P}", "{P} T1 FSE"],
    "T2": ["{P} T2", "{P} T2 FSE", "t2_tse_{p}", "T2W_TSE {P}", "{P} T2 FRFSE"],
    "FLAIR": ["{P} T2 FLAIR", "{P} FLAIR", "t2_tirm_{p}_dark-fluid FLAIR", "FLAIR_longTR {P}"],
    "DWI": ["{P} DWI B1000", "ep2d_diff_{p} DWI", "DWI_b1000 {P}", "{P} DIFFUSION"],
}


def series_description(r: np.random.Generator, region: str, sequence: str) -> str:
    """A scanner-style series description of one series, e.g. "AX T2 FLAIR" or "t2_tse_sag"."""
    plane = str(r.choice(_PLANES[region]))
    return str(r.choice(_DESCRIPTIONS[sequence])).format(P=plane, p=_SIEMENS_PLANE[plane])


# ---------------------------------------------------------------------------------------------
# Corpus

def acquire(r: np.random.Generator, parts, sequence: str, fov, matrix: int, noise: float, out_dir: str,
            series_id: str) -> tuple[str, str]:
    """One series of a phantom: a random acquisition grid (``matrix`` x ``matrix`` x 50-80 %, a
    random affine over ``fov``), rendered in ``sequence``'s contrast with bias field, Rician noise
    and an arbitrary scanner scale, written as ``<series_id>.nii.gz`` with its lesion mask
    ``<series_id>_mask.nii.gz``. Draws from ``r`` in a fixed order; returns the two paths."""
    shape = (matrix, matrix, max(16, int(matrix * r.uniform(0.5, 0.8))))
    aff, vox_shape = random_affine(r, fov, shape)
    img, mask, xyz = render(parts, aff, vox_shape, sequence)
    img = bias_and_noise(r, img, xyz, noise) * float(r.uniform(200, 3000))  # arbitrary scanner units
    ipath = os.path.join(out_dir, f"{series_id}.nii.gz")
    lpath = os.path.join(out_dir, f"{series_id}_mask.nii.gz")
    nib.save(nib.Nifti1Image(img.astype(np.float32), aff), ipath)
    nib.save(nib.Nifti1Image(mask, aff), lpath)
    return ipath, lpath


def generate_corpus(out_dir: str, n_patients: int = 40, seed: int = 0, matrix: int = 40,
                    studies_per_patient=(1, 2), noise: float = 0.03, version: int = GENERATOR_VERSION) -> str:
    """Writes NIfTI series, lesion masks and reports under ``out_dir``; returns the manifest CSV.

    Deterministic in ``seed``. Each patient has 1-2 studies; each study one region, 2-3
    sequences sharing one report; the findings of a study appear in all its series.
    ``version``: 5 (the default) or 4, which writes the corpus of generator version 4 byte for
    byte (without :func:`age_body`'s changes; the figures measured on it can be reproduced).
    Version 5 draws nothing more from the version-4 streams: its corpus has the same patients,
    studies, findings and acquisition grids.
    """
    if version not in (4, GENERATOR_VERSION):
        raise ValueError(f"generator version {version}: this generator writes versions 4 and {GENERATOR_VERSION}")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    root = np.random.default_rng(seed)
    regions = list(REGIONS)
    for p in range(n_patients):
        r = np.random.default_rng([seed, p])
        age = int(r.integers(18, 90))
        sex = str(r.choice(["M", "F"]))
        for s in range(int(r.integers(studies_per_patient[0], studies_per_patient[1] + 1))):
            region = regions[(p + s) % len(regions)] if s else str(r.choice(regions))
            fov, possible = REGIONS[region]
            findings = {f for f in possible if r.random() < 0.45}
            facts: dict = {}
            parts = scale_body(BUILDERS[region](r, findings, facts, age=age), facts, body_scale(sex, seed, p))
            if version >= 5:
                parts = age_body(parts, ageing(seed, p, age))
            findings = set(facts) | findings  # facts may be richer (e.g. sizes)
            seqs = sorted(r.choice(PROTOCOLS[region], size=int(r.integers(2, 4)), replace=False), key=SEQUENCES.index)
            study = f"P{p:04d}_S{s}"
            # The report draws from its own stream, so its wording never shifts the images'.
            report = write_report(np.random.default_rng([seed, p, 2, s]), region, seqs, findings, facts, age, sex)
            rep_file = os.path.join(out_dir, f"{study}_report.txt")
            with open(rep_file, "w") as f:
                f.write(report)
            # Descriptions draw from their own stream too (the corpus before them is unchanged).
            rd = np.random.default_rng([seed, p, 3, s])
            for seq in seqs:
                sid = f"{study}_{seq}"
                ipath, lpath = acquire(r, parts, seq, fov, matrix, noise, out_dir, sid)
                # Paths relative to the manifest's folder: the corpus folder can be moved.
                rel = lambda f: os.path.relpath(f, out_dir)  # noqa: E731
                rows.append({"series_id": sid, "study_id": study, "patient_id": f"P{p:04d}", "image": rel(ipath),
                             "label": rel(lpath), "report_file": rel(rep_file),
                             "series_description": series_description(rd, region, seq), "sequence": seq, "body_region": region,
                             "age": age, "sex": sex, "findings": ";".join(sorted(findings))})
    del root
    manifest = manifest_lib.write(os.path.join(out_dir, "manifest.csv"), rows)
    with open(os.path.join(out_dir, "generator.json"), "w") as f:
        json.dump({"seed": seed, "n_patients": n_patients, "matrix": matrix, "series": len(rows),
                   "version": version}, f, indent=1)
    return manifest


# ---------------------------------------------------------------------------------------------
# Multi-parametric brain studies (issue 22)
#
# One brain study per patient with up to four co-registered sequences, some missing, each
# acquired on its own grid (its own plane, obliquity and matrix), and findings designed so that
# no single sequence tells them all apart (TISSUE):
#
#   finding                  T1      T2      FLAIR   DWI
#   acute infarct            dark    bright  bright  bright
#   hyperacute infarct       iso     iso     iso     bright   (dwi_flair_mismatch)
#   subacute haemorrhage     bright  dark    dark    dark
#   mass (core in oedema)    dark    bright  bright  core bright, oedema grey
#
# DWI finds every infarct but cannot time it (acute and hyperacute are equally bright); FLAIR or
# T2 times it but misses the hyperacute half; T1 alone tells the haemorrhage, which is dark on
# the other three, from the rest. A study missing its DWI hides its hyperacute infarct: the
# label (the phantom's truth) stays, the report says what the acquired sequences can show.

MULTIPARAM_FINDINGS = ("infarct", "dwi_flair_mismatch", "hemorrhage", "mass")
# Prevalence of the drawn findings; ``dwi_flair_mismatch`` labels the hyperacute share of the infarcts.
MULTIPARAM_P = {"infarct": 0.5, "hemorrhage": 0.4, "mass": 0.4}
HYPERACUTE_P = 0.5
# Radii (mm): the infarct and the mass as generate_corpus draws them (LESIONS), a haematoma 24-40 mm
# across: at the evaluation's 32^3 over the brain's field of view (~5.6 mm voxels) at least ~40 voxels.
MULTIPARAM_LESIONS = {"infarct": LESIONS["infarct"], "mass": LESIONS["mass"], "hemorrhage": (12.0, 20.0)}
MULTIPARAM_VERSION = 1
_MP_STREAM = 22  # the first word of every random stream of this corpus: none is one of generate_corpus's
# Unit directions (the 26 neighbours' of a voxel) at which a lesion's outline is tested against the brain's.
_DIRS = np.array([d for d in np.ndindex(3, 3, 3) if d != (1, 1, 1)], float) - 1.0
_DIRS /= np.linalg.norm(_DIRS, axis=1, keepdims=True)


def _lobe(y: float) -> str:
    return "frontal" if y > 15 else "parietal" if y > -20 else "occipital"


def _draw_lesion(r: np.random.Generator, finding: str):
    """One candidate site of ``finding``: (side, centre, radii, outer radii: the oedema's for a mass).
    Five draws, whatever the finding. An infarct sits in a cortical territory, a mass deep beside
    the ventricle it effaces (as in ``_brain``), a haematoma lobar or deep (basal ganglia)."""
    side = int(r.choice([-1, 1]))
    rad = r.uniform(*MULTIPARAM_LESIONS[finding])
    x = {"infarct": (22, 34), "mass": (12, 22), "hemorrhage": (14, 36)}[finding]
    c = np.array([side * r.uniform(*x), r.uniform(-45, 45), r.uniform(-5, 20)])
    radii = np.array([rad, rad * r.uniform(0.8, 1.2), rad])
    return side, c, radii, radii * (1.5 if finding == "mass" else 1.0)


def _lesion_site(r: np.random.Generator, finding: str, brain: Ellipsoid, placed: list, tries: int = 24):
    """The first of up to ``tries`` candidate sites (:func:`_draw_lesion`) whose outline lies in
    the brain and clear of every lesion already ``placed`` ((centre, outer radius) pairs), else the
    candidate nearest to that: deterministic in the stream, and lesions do not paint over each
    other (so a haematoma is never read as part of an infarct's mask) in all but crowded brains."""
    best, best_score = None, -np.inf
    for _ in range(tries):
        cand = _draw_lesion(r, finding)
        _, c, _, outer = cand
        d = (c + _DIRS * outer - brain.center) / brain.radii
        score = min([1.0 / np.sqrt(np.einsum("ij,ij->i", d, d).max())]
                    + [np.linalg.norm(c - pc) / (outer.max() + po) for pc, po in placed])
        if score >= 1.0:
            return cand
        if score > best_score:
            best, best_score = cand, score
    return best


def multiparam_brain(r: np.random.Generator, age: float = 50) -> tuple[list[Ellipsoid], set[str], dict]:
    """A head with the multi-parametric findings: (parts, findings, facts). ``facts``: side,
    lobe and size_mm per finding (and the infarct's stage, "acute" or "hyperacute"). The
    findings are drawn first (a fixed number of draws), then the anatomy, then the sites, the
    largest lesion first."""
    has = {f: r.random() < p for f, p in MULTIPARAM_P.items()}
    hyperacute = r.random() < HYPERACUTE_P
    parts = _brain_anatomy(r, age)
    brain = parts[3]  # the grey matter's outline
    findings: set[str] = set()
    facts: dict = {}
    placed: list = []
    for f in ("mass", "infarct", "hemorrhage"):
        if not has[f]:
            continue
        side, c, radii, outer = _lesion_site(r, f, brain, placed)
        placed.append((c, outer.max()))
        if f == "mass":
            _efface_ventricle(parts, side)
            parts.append(_e("edema", c, outer, True))
        tissue = "hyperacute_infarct" if f == "infarct" and hyperacute else f
        parts.append(_e(tissue, c, radii, True))
        findings.add(f)
        facts[f] = {"side": "right" if side > 0 else "left", "lobe": _lobe(c[1]), "size_mm": int(round(2 * radii[0]))}
        if f == "infarct":
            facts[f]["stage"] = "hyperacute" if hyperacute else "acute"
            if hyperacute:
                findings.add("dwi_flair_mismatch")
                facts["dwi_flair_mismatch"] = dict(facts[f])  # a copy: scale_body scales each once
    return parts, findings, facts


def _acquired(r: np.random.Generator, p_complete: float) -> list[str]:
    """The study's sequences: all of SEQUENCES with probability ``p_complete``, else 1 or 2 of
    them missing, chosen at random (three draws either way)."""
    complete = r.random() < p_complete
    missing = set(r.choice(len(SEQUENCES), int(r.integers(1, 3)), replace=False).tolist())
    return [s for i, s in enumerate(SEQUENCES) if complete or i not in missing]


# Reports of the multi-parametric studies: what the acquired sequences show, in the words of a
# neuroradiologist (their own tables: _POS / _NEG word the single-contrast corpus).
_MP_WHY = ["sudden weakness", "acute speech disturbance", "sudden severe headache", "new confusion",
           "a first seizure", "follow-up"]
_MP_SIGNAL = {  # a finding's appearance per sequence, as the sentences name it
    "infarct": {"T1": "T1 hypointensity", "T2": "T2 hyperintensity", "FLAIR": "FLAIR hyperintensity",
                "DWI": "restricted diffusion"},
    "hemorrhage": {"T1": "T1 hyperintensity", "T2": "T2 hypointensity", "FLAIR": "low FLAIR signal",
                   "DWI": "low diffusion signal"},
}
_MP_POS = {
    "acute": ["{Signals} in the {side} {lobe} lobe, {size_mm} mm, consistent with an acute infarct.",
              "Acute ischemic infarct in the {side} {lobe} lobe ({signals}), measuring {size_mm} mm.",
              "There is {signals} in the {side} {lobe} territory, in keeping with acute infarction."],
    "mismatch": ["Restricted diffusion in the {side} {lobe} lobe without corresponding {fluid} signal change "
                 "(DWI-FLAIR mismatch), consistent with a hyperacute infarct.",
                 "Hyperacute infarct in the {side} {lobe} lobe, {size_mm} mm: restricted diffusion with no {fluid} "
                 "abnormality yet, suggesting onset within about 4.5 hours.",
                 "A {size_mm} mm focus of restricted diffusion in the {side} {lobe} lobe is not yet visible on {fluid} "
                 "(DWI-FLAIR mismatch): a hyperacute infarct."],
    "undated": ["Restricted diffusion in the {side} {lobe} lobe, {size_mm} mm, consistent with an acute infarct; "
                "without FLAIR or T2 its age cannot be assessed.",
                "Acute infarct of the {side} {lobe} lobe on diffusion imaging; no T2-weighted sequence was acquired "
                "to time it."],
    "hemorrhage": ["A {size_mm} mm parenchymal hematoma in the {side} {lobe} lobe ({signals}), consistent with "
                   "subacute hemorrhage.",
                   "Subacute intraparenchymal hemorrhage in the {side} {lobe} lobe measuring {size_mm} mm.",
                   "There is a {size_mm} mm hematoma of the {side} {lobe} lobe with {signals}."],
    "mass": ["A {size_mm} mm mass in the {side} {lobe} lobe with surrounding edema, effacing the {side} lateral "
             "ventricle.",
             "Heterogeneous intra-axial lesion in the {side} {lobe} lobe with vasogenic edema and mass effect on the "
             "{side} lateral ventricle, suspicious for neoplasm.",
             "There is a space-occupying lesion of the {side} {lobe} lobe measuring {size_mm} mm with perilesional "
             "edema."],
}
_MP_NEG = {
    "infarct": ["No restricted diffusion to suggest acute infarct.", "No acute infarct.",
                "There is no acute ischemic stroke."],
    # Without DWI a hyperacute infarct is not seen: the same words as no infarct, so that the
    # report says nothing the images do not.
    "infarct_no_dwi": ["No established infarct.", "No signal abnormality to suggest an established infarct."],
    "hemorrhage": ["No intracranial hemorrhage.", "No evidence of hemorrhage.", "No blood products."],
    "mass": ["No intracranial mass.", "No mass effect or midline shift.", "No space-occupying lesion is identified."],
}
_MP_NO_DWI = ["Diffusion-weighted imaging was not acquired; a hyperacute infarct cannot be excluded.",
              "No DWI in this study: an early infarct would not be seen."]
_MP_NORMAL = ["No extra-axial collection.", "The major intracranial flow voids are preserved."]
_MP_IMPRESSION = {
    "acute": "Acute {side} {lobe} infarct.", "mismatch": "Hyperacute {side} {lobe} infarct with DWI-FLAIR mismatch.",
    "undated": "Acute {side} {lobe} infarct, age indeterminate.",
    "hemorrhage": "Subacute {side} {lobe} parenchymal hemorrhage.",
    "mass": "{side} {lobe} mass with edema, suspicious for neoplasm.",
}
_MP_IMPRESSION_NORMAL = ["No acute intracranial abnormality.", "Normal study.", "Unremarkable examination."]


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def write_multiparam_report(r: np.random.Generator, sequences, findings: set[str], facts: dict, age, sex: str) -> str:
    """A multi-parametric brain report: examination, history, technique (the acquired sequences),
    findings and impression, stating each finding as the acquired sequences show it. An infarct
    that none of them shows (a hyperacute one without DWI) is worded as no infarct; its timing is
    stated only when DWI and FLAIR or T2 were acquired; a study without DWI says that an early
    infarct cannot be excluded."""
    seqs = [s for s in SEQUENCES if s in sequences]
    noun = {"M": ["man", "male"], "F": ["woman", "female"]}.get(sex, ["patient"])
    why = str(r.choice(_MP_WHY))
    form = str(r.choice(_HISTORY))
    history = form.format(age=int(age), noun=str(r.choice(noun)), why=why, Why=why[0].upper() + why[1:])
    lines = ["EXAMINATION: MRI brain.", history,
             f"TECHNIQUE: {', '.join(seqs)} sequences.", "", "FINDINGS:"]
    sentences = [str(r.choice(_AGEING["brain"][int(np.searchsorted([0.35, 0.7], age_fraction(age)))]))]
    shown = []  # (kind, facts) of what the report states, for the impression
    dwi, fluid = "DWI" in seqs, [s for s in ("FLAIR", "T2") if s in seqs]
    if "infarct" in findings and (facts["infarct"]["stage"] == "acute" or dwi):
        if facts["infarct"]["stage"] == "acute":
            kind = "acute"
        else:
            kind = "mismatch" if fluid else "undated"
        shown.append((kind, facts["infarct"]))
    elif r.random() < 0.8:
        sentences.append(str(r.choice(_MP_NEG["infarct" if dwi else "infarct_no_dwi"])))
    if not dwi:
        sentences.append(str(r.choice(_MP_NO_DWI)))
    for f in ("hemorrhage", "mass"):
        if f in findings:
            shown.append((f, facts[f]))
        elif r.random() < 0.8:
            sentences.append(str(r.choice(_MP_NEG[f])))
    for kind, fx in shown:
        signals = _and([_MP_SIGNAL["hemorrhage" if kind == "hemorrhage" else "infarct"][s] for s in seqs])
        t = str(r.choice(_MP_POS[kind])).format(signals=signals, Signals=signals[0].upper() + signals[1:],
                                                fluid=fluid[0] if fluid else "", **fx)
        sentences.append(t[0].upper() + t[1:])
    sentences += [s for s in _MP_NORMAL if r.random() < 0.6]
    order = r.permutation(len(sentences))
    lines += [" ".join(sentences[i] for i in order), "", "IMPRESSION:"]
    imp = [_MP_IMPRESSION[k].format(**fx) for k, fx in shown]
    lines.append(" ".join(t[0].upper() + t[1:] for t in imp) if imp else str(r.choice(_MP_IMPRESSION_NORMAL)))
    return "\n".join(lines) + "\n"


def generate_multiparam_corpus(out_dir: str, n_patients: int = 60, seed: int = 0, matrix: int = 40,
                               p_complete: float = 0.5, noise: float = 0.03) -> str:
    """Writes multi-parametric brain studies under ``out_dir``; returns the manifest CSV.

    One study per patient (``M{p:04d}_S0``), findings of :data:`MULTIPARAM_FINDINGS` (see the
    table above) with a lesion mask per series. All four sequences with probability
    ``p_complete``, else two or three. Each series is its own acquisition: its own random
    orientation, obliquity and matrix (``random_affine``, the shape rule of ``generate_corpus``),
    so the series of a study share the anatomy's world coordinates but not a voxel grid;
    ``decipher prep --studies resample`` puts them on one. Bias field, Rician noise and scanner
    scale as ``generate_corpus``. Manifest rows and paths as ``generate_corpus`` writes them,
    and ``multiparam.json`` beside the manifest.

    Deterministic in ``seed``, and independent of ``generate_corpus``'s streams (every stream
    here starts with 22). Per patient: ``[22, seed, p]`` draws the patient, the findings, the
    anatomy and the sequences; ``[.., 1]`` the report; ``[.., 2]`` the series descriptions;
    ``[.., 3, k]`` the geometry and noise of sequence ``SEQUENCES[k]``, so a series is the same
    whichever other series its study has (e.g. for another ``p_complete``).
    """
    if not 0.0 <= p_complete <= 1.0:
        raise ValueError(f"generate_multiparam_corpus: p_complete={p_complete} is not a probability in [0, 1]")
    os.makedirs(out_dir, exist_ok=True)
    fov = REGIONS["brain"][0]
    rows, complete = [], 0
    rel = lambda f: os.path.relpath(f, out_dir)  # noqa: E731 - the corpus folder can be moved
    for p in range(n_patients):
        key = [_MP_STREAM, seed, p]
        r = np.random.default_rng(key)
        age = int(r.integers(18, 90))
        sex = str(r.choice(["M", "F"]))
        parts, findings, facts = multiparam_brain(r, age)
        parts = scale_body(parts, facts, body_scale(sex, seed, p, stream=(_MP_STREAM,)))
        seqs = _acquired(r, p_complete)
        complete += len(seqs) == len(SEQUENCES)
        study, patient = f"M{p:04d}_S0", f"M{p:04d}"
        report = write_multiparam_report(np.random.default_rng(key + [1]), seqs, findings, facts, age, sex)
        rep_file = os.path.join(out_dir, f"{study}_report.txt")
        with open(rep_file, "w") as f:
            f.write(report)
        rd = np.random.default_rng(key + [2])
        for seq in seqs:
            rs = np.random.default_rng(key + [3, SEQUENCES.index(seq)])
            sid = f"{study}_{seq}"
            ipath, lpath = acquire(rs, parts, seq, fov, matrix, noise, out_dir, sid)
            rows.append({"series_id": sid, "study_id": study, "patient_id": patient, "image": rel(ipath),
                         "label": rel(lpath), "report_file": rel(rep_file),
                         "series_description": series_description(rd, "brain", seq), "sequence": seq,
                         "body_region": "brain", "age": age, "sex": sex, "findings": ";".join(sorted(findings))})
    manifest = manifest_lib.write(os.path.join(out_dir, "manifest.csv"), rows)
    with open(os.path.join(out_dir, "multiparam.json"), "w") as f:
        json.dump({"seed": seed, "n_patients": n_patients, "matrix": matrix, "p_complete": p_complete, "noise": noise,
                   "series": len(rows), "complete_studies": complete, "findings": list(MULTIPARAM_FINDINGS),
                   "version": MULTIPARAM_VERSION}, f, indent=1)
    return manifest
