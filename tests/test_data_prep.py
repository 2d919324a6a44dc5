"""decipher prep: geometry against nilearn on a real volume, label alignment, bad inputs, resume, splits."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest

from data_prep import manifest as manifest_lib
from data_prep import prep, reports, volume
from decipher_jax import cli
from decipher_jax.data import synthetic
from helpers import bad_rows

nilearn_datasets = pytest.importorskip("nilearn.datasets")
from nilearn.image import resample_img  # noqa: E402

CFG = volume.VolumeConfig(target_spacing=(3.0, 3.0, 3.0))


@pytest.fixture(scope="module")
def mni(tmp_path_factory):
    """The real MNI152 T1 template (2 mm, shipped by nilearn) saved as NIfTI."""
    img = nilearn_datasets.load_mni152_template(resolution=2)
    img = nib.Nifti1Image(img.get_fdata().astype(np.float32), img.affine)
    return img


def _save(tmp_path, name, data, affine):
    p = str(tmp_path / name)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), p)
    return p


def _world_to_value(data, affine, xyz):
    """Trilinear value of ``data`` at world points ``xyz`` (N, 3)."""
    from scipy import ndimage

    ijk = (np.linalg.inv(affine) @ np.c_[xyz, np.ones(len(xyz))].T)[:3]
    return ndimage.map_coordinates(data, ijk, order=1)


def test_flipped_affine_lands_in_ras_identically(mni, tmp_path):
    data = mni.get_fdata().astype(np.float32)
    ref = volume.process(_save(tmp_path, "ras.nii.gz", data, mni.affine), None, CFG)
    # The same image stored with x and z flipped (LAI voxel order): identical after prep.
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[0, 3], flip[2, 3] = data.shape[0] - 1, data.shape[2] - 1
    flipped = _save(tmp_path, "flipped.nii.gz", data[::-1, :, ::-1], mni.affine @ flip)
    out = volume.process(flipped, None, CFG)
    np.testing.assert_allclose(out["affine"], ref["affine"], atol=1e-4)
    np.testing.assert_allclose(out["volume"], ref["volume"], atol=1e-6)
    aff = out["affine"]
    assert np.all(np.diag(aff)[:3] > 0) and np.allclose(aff[:3, :3], np.diag(np.diag(aff)[:3]))  # RAS, 3 mm


def test_oblique_affine_matches_nilearn_resampling(mni, tmp_path):
    data = mni.get_fdata().astype(np.float32)
    # An oblique acquisition: voxel axes permuted (k, i, j), then rotated 15 deg about the centre.
    pm = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)  # old ijk = pm @ new ijk
    a_perm = mni.affine @ pm
    shape = (data.shape[2], data.shape[0], data.shape[1])
    centre = mni.affine @ np.append((np.array(data.shape) - 1) / 2, 1.0)
    th = np.deg2rad(15)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
    move, back = np.eye(4), np.eye(4)
    move[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    obl_aff = back @ rot @ move @ a_perm
    oblique = resample_img(mni, target_affine=obl_aff, target_shape=shape,
                           interpolation="linear", force_resample=True, copy_header=True)
    path = _save(tmp_path, "oblique.nii.gz", oblique.get_fdata().astype(np.float32), oblique.affine)
    out = volume.process(path, None, volume.VolumeConfig(target_spacing=(3.0, 3.0, 3.0), clip_percentiles=(0.0, 100.0),
                                                        foreground_only_stats=False))
    # nilearn resampling of the oblique file onto our output grid is the reference.
    ref = resample_img(oblique, target_affine=out["affine"].astype(float), target_shape=out["volume"].shape,
                       interpolation="linear", force_resample=True, copy_header=True).get_fdata()
    ref = (ref - out["clip_lo"]) / (out["clip_hi"] - out["clip_lo"])
    inner = tuple(slice(4, -4) for _ in range(3))
    assert np.abs(out["volume"][inner] - ref[inner]).max() < 2e-3
    # And the right voxel at the right world coordinate, against the *original* RAS template.
    orig = (data - out["clip_lo"]) / (out["clip_hi"] - out["clip_lo"])
    rng = np.random.default_rng(0)
    xs = rng.uniform([-50, -70, -30], [50, 50, 50], (200, 3))
    ours = _world_to_value(out["volume"], out["affine"].astype(float), xs)
    theirs = _world_to_value(orig, mni.affine, xs)
    shifted = _world_to_value(orig, mni.affine, xs + [0, 6, 0])  # what a 6 mm registration error looks like
    good, bad = np.corrcoef(ours, theirs)[0, 1], np.corrcoef(ours, shifted)[0, 1]
    assert good > 0.97 and good - bad > 0.1, (good, bad)


def test_label_map_stays_aligned_through_oblique_resampling(tmp_path):
    r = np.random.default_rng(3)
    parts = synthetic.BUILDERS["brain"](r, {"infarct"}, {})
    aff, shape = synthetic.random_affine(np.random.default_rng(11), (180, 210, 170), (40, 44, 30))
    img, mask, _ = synthetic.render(parts, aff, shape, "DWI")  # the infarct is the brightest tissue
    ip = _save(tmp_path, "img.nii.gz", img, aff)
    lp = _save(tmp_path, "lab.nii.gz", mask, aff)
    full_range = volume.VolumeConfig(target_spacing=(3.0, 3.0, 3.0), clip_percentiles=(0.0, 100.0))
    out = volume.process(ip, lp, full_range)
    lab, vol = out["label"], out["volume"]
    assert lab.shape == vol.shape and lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1}
    # Lesion (DWI 1.0) vs surrounding brain (~0.3): the partial-volume boundary is the midpoint.
    bright = vol > 0.65 * vol.max()
    les = lab == 1
    dice = 2 * (bright & les).sum() / (bright.sum() + les.sum())
    shifted = np.roll(les, 5, axis=1)  # a third of the lesion's diameter (generator v3: 36-56 mm at 3 mm)
    dice_shifted = 2 * (bright & shifted).sum() / (bright.sum() + shifted.sum())
    assert dice > 0.8 and dice - dice_shifted > 0.3, (dice, dice_shifted)
    centroid = lambda m: np.argwhere(m).mean(0)  # noqa: E731
    assert np.abs(centroid(bright) - centroid(les)).max() < 0.5  # voxels


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    m = synthetic.generate_corpus(str(d), n_patients=8, seed=1, matrix=20)
    with open(m, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # the generator writes paths relative to its manifest; these rows move to other manifests
        for k in ("image", "label", "report_file"):
            r[k] = os.path.join(str(d), r[k])
    return str(d), rows


def test_bad_inputs_are_recorded_and_the_rest_processed_then_resumed(small_corpus, tmp_path):
    d, good = small_corpus
    bad = bad_rows(d, good[0])
    rows = good + list(bad.values())
    m = manifest_lib.write(str(tmp_path / "manifest.csv"), rows)
    out = str(tmp_path / "prep")
    cfg = prep.PrepConfig(volume=CFG, workers=1)
    res = prep.run(m, out, cfg, progress=False)
    with open(os.path.join(out, "errors.jsonl")) as f:
        errs = {e["series_id"]: e for e in map(json.loads, f)}
    assert set(errs) == {f"bad_{k}" for k in bad}
    expect = {"truncated": "truncated or corrupt", "not_nifti": "not a readable NIfTI", "twod": "2D",
              "nan": "no finite values", "zero_size": "empty (0 bytes)", "label_grid": "does not match",
              "missing": "not found", "empty_report": "report is empty"}
    for k, words in expect.items():
        e = errs[f"bad_{k}"]
        assert words in e["reason"], e
        named = bad[k]["label"] if k == "label_grid" else bad[k]["report_file"] if k == "empty_report" else bad[k]["image"]
        assert e["file"] == named
    assert res.processed == len(good) and sum(c["series"] for c in res.counts.values()) == len(good)
    # Rerun: finished series are reused, bad ones retried (and still recorded).
    res2 = prep.run(m, out, cfg, progress=False)
    assert res2.processed == 0 and res2.reused == len(good) and len(res2.errors) == len(bad)
    # A crash mid-way: one cache entry lost, a stray temp file left behind -> only that one is redone.
    cache = os.path.join(out, "cache", cfg.cache_key())
    os.remove(os.path.join(cache, good[0]["series_id"] + ".npz"))
    open(os.path.join(cache, good[1]["series_id"] + ".npz.tmp.npz"), "wb").close()
    res3 = prep.run(m, out, cfg, progress=False)
    assert res3.processed == 1 and res3.reused == len(good) - 1
    # The CLI exits non-zero with a summary naming the files.
    assert cli.main(["prep", "--manifest", m, "--out", out, "--spacing", "3", "3", "3", "--workers", "2", "--quiet"]) == 1


def test_patient_level_splits_and_card(small_corpus, tmp_path):
    d, good = small_corpus
    import tensorflow_datasets as tfds

    out = str(tmp_path / "prep")
    res = prep.run(manifest_lib.write(str(tmp_path / "m.csv"), good), out, prep.PrepConfig(volume=CFG, workers=1),
                   progress=False)
    owners = {}
    for split in prep.SPLITS:
        src = tfds.builder_from_directory(res.tfds_dir).as_data_source(split)
        for i in range(len(src)):
            ex = src[i]
            owners.setdefault(ex["patient_id"], set()).add(split)
            assert ex["volume"].dtype == np.float16 and ex["affine"].shape == (4, 4)
    assert all(len(s) == 1 for s in owners.values())  # no patient in two splits
    # Shards are uncompressed ArrayRecord chunks (reads are copies); a rewrite keeps every record.
    from array_record.python import array_record_module as arm

    from data_prep.tfds_builder import rewrite_records

    shards = [os.path.join(res.tfds_dir, f) for f in os.listdir(res.tfds_dir) if ".array_record-" in f]
    assert shards
    for f in shards:
        r = arm.ArrayRecordReader(f)
        assert "uncompressed" in r.writer_options_string(), r.writer_options_string()
        r.close()
    before = arm.ArrayRecordReader(shards[0]).read_all()
    rewrite_records(shards[0], "group_size:1,zstd:3", chunk=3)
    r = arm.ArrayRecordReader(shards[0])
    assert "zstd:3" in r.writer_options_string() and r.read_all() == before
    assert len(owners) == 8 and {s for v in owners.values() for s in v} == set(prep.SPLITS)
    with open(os.path.join(out, "dataset_card.json")) as f:
        card = json.load(f)
    assert sum(c["series"] for c in card["counts"].values()) == len(good)
    assert card["preprocessing"]["target_spacing_mm"] == [3.0, 3.0, 3.0]
    assert 0 < card["statistics"]["stored_intensity"]["mean"] < 1
    # Splits are a deterministic function of the seed.
    a = prep.assign_splits([f"p{i}" for i in range(50)], (0.7, 0.15, 0.15), seed=0)
    assert a == prep.assign_splits([f"p{i}" for i in reversed(range(50))], (0.7, 0.15, 0.15), seed=0)
    assert a != prep.assign_splits([f"p{i}" for i in range(50)], (0.7, 0.15, 0.15), seed=1)


def test_four_d_policy(tmp_path):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.stack([np.full((12, 12, 12), v, np.float32) for v in (1.0, 3.0)], -1)
    p = _save(tmp_path, "4d.nii.gz", data, aff)
    first, _ = volume.load(p, volume.VolumeConfig(four_d="first"))
    mean, _ = volume.load(p, volume.VolumeConfig(four_d="mean"))
    assert first.mean() == 1.0 and mean.mean() == 2.0
    with pytest.raises(volume.BadInput, match="4D image with 2 volumes"):
        volume.load(p, volume.VolumeConfig(four_d="error"))


def test_report_sections_and_normalisation():
    text = "EXAMINATION: MRI brain.\nFINDINGS:\n  No acute\u00a0infarct \u2014 normal.\n\nIMPRESSION:\n\u201cNormal\u201d study.\n"
    s = reports.sections(text)
    assert s["findings"] == "No acute infarct - normal." and s["impression"] == '"Normal" study.'
    assert reports.clinical_text(text) == 'No acute infarct - normal. "Normal" study.'
    assert reports.clinical_text("free text  only") == "free text only"
    # History and indication come first (age, sex, reason); examination and technique are dropped;
    # a report with neither findings nor impression is kept whole.
    text = ("EXAMINATION: MRI knee.\nHISTORY: 79-year-old woman with knee pain.\nTECHNIQUE: T2 sequences.\n"
            "FINDINGS:\nSmall effusion.\nIMPRESSION:\nEffusion.\n")
    assert reports.clinical_text(text) == "79-year-old woman with knee pain. Small effusion. Effusion."
    assert reports.clinical_text(text, keep=("findings",)) == "Small effusion."
    assert reports.clinical_text("HISTORY: pain.\nTECHNIQUE: T1.") == "HISTORY: pain. TECHNIQUE: T1."


def test_manifest_errors(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("series_id,image\nA,a.nii\n")
    with pytest.raises(ValueError, match="missing required column"):
        manifest_lib.read(str(p))
    p.write_text("series_id,study_id,patient_id,image\nA,s,p,a.nii\nA,s,p,b.nii\n")
    with pytest.raises(ValueError, match="duplicated"):
        manifest_lib.read(str(p))
    j = tmp_path / "m.jsonl"
    j.write_text(json.dumps({"series_id": "A", "study_id": "s", "patient_id": "p", "image": "x.nii", "age": 40}) + "\n")
    (row,) = manifest_lib.read(str(j))
    assert row.image == str(tmp_path / "x.nii") and row.age == 40.0


def test_relative_corpus_paths_resolve_from_any_working_directory(tmp_path, monkeypatch):
    """Regression: a corpus written under a relative folder is prepared from another cwd."""
    from decipher_jax.data import corpus

    monkeypatch.chdir(tmp_path)
    manifest = corpus.build("rel/raw", n_patients=2, seed=3, matrix=16, real=False)
    assert os.path.isabs(manifest_lib.read(manifest)[0].image)  # resolved to absolute on read
    with open(manifest, newline="") as f:
        assert not os.path.isabs(next(csv.DictReader(f))["image"])  # stored relative: the folder can move
    os.makedirs("elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = prep.run(os.path.join("..", manifest), "../rel/prep", prep.PrepConfig(volume=CFG, workers=1), progress=False)
    assert res.ok and sum(c["series"] for c in res.counts.values()) == len(manifest_lib.read(os.path.join("..", manifest)))


def test_synthetic_anatomy_shows_sex_and_age():
    """Men's phantoms are larger (every region), and with age the brain's CSF grows (ventricles,
    atrophy) while knee cartilage thins; the rest of a patient's draws do not change."""
    m = [synthetic.body_scale("M", 0, p) for p in range(40)]
    f = [synthetic.body_scale("F", 0, p) for p in range(40)]
    assert min(m) > 1.0 > max(f) and 0.08 < np.mean(m) - np.mean(f) < 0.16

    aff, shape = np.diag([3.0, 3.0, 3.0, 1.0]), (60, 70, 57)
    aff[:3, 3] = -np.array([(s - 1) * 1.5 for s in shape])

    def volume_of(region, tissue, age):
        parts = synthetic.BUILDERS[region](np.random.default_rng(4), set(), {}, age=age)
        seq = "T2" if tissue == "csf" else "T1"
        img, _, _ = synthetic.render(parts, aff, shape, seq)
        return np.sum(np.isclose(img, synthetic.TISSUE[tissue][synthetic.SEQUENCES.index(seq)]))

    assert volume_of("brain", "csf", 85) > 1.3 * volume_of("brain", "csf", 20)
    assert volume_of("knee", "cartilage", 85) < 0.8 * volume_of("knee", "cartilage", 20)
    scaled = synthetic.scale_body(synthetic.BUILDERS["brain"](np.random.default_rng(4), {"mass"}, facts := {}), facts, 1.1)
    assert abs(facts["mass"]["size_mm"] - 2 * scaled[-1].radii[0]) <= 1  # the report states the scaled size


def test_synthetic_reports_state_history_and_age_changes():
    """A report's history gives the patient's age and sex, its findings the degree of the
    age-related change its phantom shows."""
    young = synthetic.write_report(np.random.default_rng(0), "brain", ["T1"], set(), {}, age=20, sex="F")
    old = synthetic.write_report(np.random.default_rng(0), "brain", ["T1"], set(), {}, age=88, sex="M")
    assert "20" in young and ("woman" in young or "female" in young)
    assert "88" in old and (" man" in old or "male" in old)
    assert any(t in reports.sections(young)["findings"] for t in synthetic._AGEING["brain"][0])
    assert any(t in reports.sections(old)["findings"] for t in synthetic._AGEING["brain"][2])
    assert "88" in reports.clinical_text(old)  # what the encoders learn from keeps the history
    plain = synthetic.write_report(np.random.default_rng(0), "abdomen", ["T1"], set(), {})
    assert "HISTORY" not in plain and "INDICATION" not in plain


def test_tune_malloc_applies_to_this_process_and_workers(monkeypatch):
    from decipher_jax.data import pipelines as P

    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(256 << 20))  # a user's own setting wins
    assert P.tune_malloc() is True  # glibc (Linux CI)
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(64 << 20)
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == str(256 << 20)
