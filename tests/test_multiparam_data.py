"""Multi-parametric MRI data (issue 22): the synthetic corpus of co-registered sequences, some
missing, each on its own grid; ``decipher prep --studies`` putting a study's series on one grid
(or refusing those off it); and the study loader stacking them as channels."""

import csv
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_prep import manifest as manifest_lib
from data_prep import prep
from data_prep.volume import VolumeConfig
from decipher_jax import cli
from decipher_jax.data import pipelines as P
from decipher_jax.data import synthetic

SEQ = synthetic.SEQUENCES
FINDINGS = synthetic.MULTIPARAM_FINDINGS
VCFG = VolumeConfig(target_spacing=(6.0,) * 3)
# Seed 4's ten patients: four complete studies, four of three sequences, two of two; acute and
# hyperacute infarcts, haemorrhages and masses (M0000: a hyperacute infarct alone, with FLAIR and DWI).
SEED, PATIENTS = 4, 10
# The last commit of synthetic.py before the multi-parametric corpus: generate_corpus must match it.
REFERENCE_COMMIT = "7b603d03f72ca5ee062877b1f730fdb4a8322cbf"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prep(manifest, out, studies, workers=1):
    cfg = prep.PrepConfig(volume=VCFG, studies=studies, workers=workers, split_fractions=(1.0, 0.0, 0.0))
    return prep.run(manifest, out, cfg, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus (10 patients, matrix 24), prepared at 6 mm with studies="resample" and with
    each series on its own grid (studies=""), all in one 'train' split."""
    d = tmp_path_factory.mktemp("multiparam")
    m = synthetic.generate_multiparam_corpus(str(d / "raw"), n_patients=PATIENTS, seed=SEED, matrix=24)
    rows = manifest_lib.read(m)
    studies = {}
    for r in rows:
        s = studies.setdefault(r.study_id, {"sequences": [], "findings": set(r.findings.split(";")) - {""}, "rows": []})
        s["sequences"].append(r.sequence)
        s["rows"].append(r)
    return SimpleNamespace(dir=d, manifest=m, rows=rows, studies=studies,
                           resample=_prep(m, str(d / "prep_resample"), "resample"),
                           own=_prep(m, str(d / "prep_own"), ""))


def _records(tfds_dir):
    """The prepared 'train' split and its record index by series id."""
    src = P.data_source(tfds_dir, "train")
    return src, {P._text(src[i]["series_id"]): i for i in range(len(src))}


# -- the generator -----------------------------------------------------------------------------


def test_generate_corpus_is_unchanged(tmp_path, monkeypatch):
    """``generate_corpus`` (and ``_brain``, whose normal anatomy the new corpus shares) draws and
    writes exactly what it did before the multi-parametric corpus: the reference is the
    generator's source at REFERENCE_COMMIT, run side by side. Since version 5, its ``version=4``
    corpus is that one."""
    try:
        src = subprocess.run(["git", "-C", REPO, "show", f"{REFERENCE_COMMIT}:decipher_jax/data/synthetic.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git history with {REFERENCE_COMMIT} unavailable (shallow clone?)")
    path = tmp_path / "synthetic_reference.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("synthetic_reference", path)
    old = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, old)  # its dataclasses look their module up
    spec.loader.exec_module(old)
    assert old.GENERATOR_VERSION == 4 and synthetic.GENERATOR_VERSION == 5  # version 5: generate_corpus(version=4)
    for seed in range(12):
        for fs in (set(), {"infarct"}, {"mass"}, {"infarct", "mass"}):
            ra, rb = np.random.default_rng(seed), np.random.default_rng(seed)
            fa, fb = {}, {}
            a = old._brain(ra, set(fs), fa, age=20 + 6 * seed)
            b = synthetic._brain(rb, set(fs), fb, age=20 + 6 * seed)
            assert fa == fb and ra.bit_generator.state == rb.bit_generator.state  # the same draws
            assert [(p.tissue, p.center.tolist(), p.radii.tolist(), p.lesion) for p in a] == \
                   [(p.tissue, p.center.tolist(), p.radii.tolist(), p.lesion) for p in b]
    ma = old.generate_corpus(str(tmp_path / "old"), n_patients=6, seed=3, matrix=16)
    mb = synthetic.generate_corpus(str(tmp_path / "new"), n_patients=6, seed=3, matrix=16, version=4)
    files = sorted(os.listdir(tmp_path / "old"))
    assert files == sorted(os.listdir(tmp_path / "new"))
    with open(ma) as f:
        assert "brain" in f.read()
    for f in files:
        a, b = os.path.join(tmp_path / "old", f), os.path.join(tmp_path / "new", f)
        if f.endswith(".nii.gz"):  # the gzip header holds a time; the contents must be equal
            ia, ib = nib.load(a), nib.load(b)
            np.testing.assert_array_equal(ia.affine, ib.affine)
            np.testing.assert_array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))
        else:
            with open(a, "rb") as fa_, open(b, "rb") as fb_:
                assert fa_.read() == fb_.read(), f
    assert os.path.basename(mb) == "manifest.csv"


def test_corpus_is_deterministic_and_its_series_independent(tmp_path):
    """The same seed writes the same corpus, another seed another; each series has its own
    stream, so a series is the same whichever other sequences its study acquired."""
    def read(d, **kw):
        m = synthetic.generate_multiparam_corpus(str(tmp_path / d), n_patients=4, matrix=16, **kw)
        with open(m, newline="") as f:
            rows = list(csv.DictReader(f))
        return rows, {r["series_id"]: np.asarray(nib.load(str(tmp_path / d / r["image"])).dataobj) for r in rows}

    rows_a, img_a = read("a", seed=1)
    rows_b, img_b = read("b", seed=1)
    assert rows_a == rows_b and all(np.array_equal(img_a[k], img_b[k]) for k in img_a)
    rows_c, img_c = read("c", seed=2)
    assert [r["findings"] for r in rows_c] != [r["findings"] for r in rows_a] or \
        not all(np.array_equal(img_a[k], img_c.get(k)) for k in img_a if k in img_c)
    full, img_full = read("full", seed=1, p_complete=1.0)
    part, img_part = read("part", seed=1, p_complete=0.0)
    assert all(len([r for r in full if r["study_id"] == s]) == 4 for s in {r["study_id"] for r in full})
    assert {len([r for r in part if r["study_id"] == s]) for s in {r["study_id"] for r in part}} <= {2, 3}
    assert all(np.array_equal(img_part[k], img_full[k]) for k in img_part)
    with open(tmp_path / "a" / "multiparam.json") as f:
        info = json.load(f)
    assert info["version"] == synthetic.MULTIPARAM_VERSION and info["series"] == len(rows_a)
    r0 = rows_a[0]
    assert r0["study_id"] == "M0000_S0" and r0["patient_id"] == "M0000" and r0["body_region"] == "brain"
    assert r0["series_id"] == f"M0000_S0_{r0['sequence']}" and not os.path.isabs(r0["image"])
    with pytest.raises(ValueError, match="p_complete"):
        synthetic.generate_multiparam_corpus(str(tmp_path / "x"), n_patients=1, p_complete=1.5)


def _grid32():
    sp = np.asarray(synthetic.REGIONS["brain"][0]) / 32
    aff = np.eye(4)
    aff[:3, :3] = np.diag(sp)
    aff[:3, 3] = -sp * 31 / 2
    return aff


def test_each_sequence_shows_what_it_was_designed_to():
    """At the evaluation's 32^3 over the brain: a lesion's mean against the brain in a 2-voxel ring
    around it (no other lesion in the ring). A hyperacute infarct is bright on DWI and within 0.1
    of its surroundings on T1 / T2 / FLAIR; an acute one bright on T2 / FLAIR / DWI, dark on T1;
    DWI alone cannot tell the two apart; a haemorrhage is brighter than the brain on T1 and
    darker on T2, FLAIR and DWI. All lesions are big enough to count (>= 40 voxels)."""
    t = synthetic.TISSUE
    assert t["hyperacute_infarct"][3] == t["infarct"][3]  # DWI cannot time an infarct: the mismatch needs FLAIR / T2
    aff, seen = _grid32(), set()
    for seed in range(30):
        parts, findings, facts = synthetic.multiparam_brain(np.random.default_rng([5, seed]), age=50)
        assert set(findings) <= set(FINDINGS) and set(facts) == findings
        _, _, xyz = synthetic.render(parts[:1], aff, (32,) * 3, "T1")
        brain = parts[3].inside(xyz)
        lesions = [p for p in parts if p.lesion]
        any_lesion = np.any([p.inside(xyz) for p in lesions], axis=0)
        imgs = {s: synthetic.render(parts, aff, (32,) * 3, s)[0] for s in SEQ}
        for p in lesions:
            if p.tissue not in ("hyperacute_infarct", "infarct", "hemorrhage"):
                continue
            m = p.inside(xyz)
            ring = ndimage.binary_dilation(m, iterations=2) & ~any_lesion & brain
            d = {s: float(imgs[s][m].mean() - imgs[s][ring].mean()) for s in SEQ}
            assert m.sum() >= 40 and ring.sum() >= 40, (seed, p.tissue)
            seen.add(p.tissue)
            if p.tissue == "hyperacute_infarct":
                assert d["DWI"] > 0.5 and max(abs(d[s]) for s in ("T1", "T2", "FLAIR")) < 0.1, d
                assert "dwi_flair_mismatch" in findings and facts["infarct"]["stage"] == "hyperacute"
            elif p.tissue == "infarct":
                assert d["DWI"] > 0.5 and d["FLAIR"] > 0.3 and d["T2"] > 0.2 and d["T1"] < -0.2, d
                assert "dwi_flair_mismatch" not in findings
            else:
                assert d["T1"] > 0.2 and d["T2"] < -0.2 and d["FLAIR"] < -0.05 and d["DWI"] < -0.1, d
    assert seen == {"hyperacute_infarct", "infarct", "hemorrhage"}


def test_reports_say_what_the_acquired_sequences_show():
    facts = {"infarct": {"side": "left", "lobe": "frontal", "size_mm": 40, "stage": "hyperacute"}}
    facts["dwi_flair_mismatch"] = dict(facts["infarct"])
    found = {"infarct", "dwi_flair_mismatch"}
    r = synthetic.write_multiparam_report(np.random.default_rng(0), ["T1", "FLAIR", "DWI"], found, facts, 70, "F")
    assert "TECHNIQUE: T1, FLAIR, DWI sequences." in r and "mismatch" in r.lower() and "70" in r
    # Without DWI a hyperacute infarct is invisible: the report does not state it, and says why.
    r = synthetic.write_multiparam_report(np.random.default_rng(0), ["T1", "T2", "FLAIR"], found, facts, 70, "F")
    assert "infarct" not in r.split("IMPRESSION:")[1].lower() and "mismatch" not in r.lower()
    assert any(t in r for t in synthetic._MP_NO_DWI)
    facts = {"hemorrhage": {"side": "right", "lobe": "occipital", "size_mm": 30}}
    r = synthetic.write_multiparam_report(np.random.default_rng(1), ["T1", "T2"], {"hemorrhage"}, facts, 50, "M")
    assert "right occipital" in r and "hemorrhage" in r.lower()


# -- prep --------------------------------------------------------------------------------------


def test_resample_puts_a_studys_series_on_one_grid(corpus):
    """studies="resample": every series of a study has the shape and affine of the study's first
    series, and their lesion masks (each rendered through its own acquisition's affine) overlap;
    with studies="" the series keep their own grids."""
    src, at = _records(corpus.resample.tfds_dir)
    own, own_at = _records(corpus.own.tfds_dir)
    assert corpus.resample.ok and len(at) == len(corpus.rows)
    ious, differ = [], 0
    for study, s in corpus.studies.items():
        recs = [src[at[r.series_id]] for r in s["rows"]]
        for ex in recs[1:]:
            assert ex["volume"].shape == recs[0]["volume"].shape, study
            np.testing.assert_allclose(ex["affine"], recs[0]["affine"], atol=1e-4)
        labels = [np.asarray(ex["label"]) > 0 for ex in recs]
        if labels[0].sum() > 20:
            for a in labels[1:]:
                ious.append((a & labels[0]).sum() / (a | labels[0]).sum())
                shifted = np.roll(a, 3, axis=1)  # 18 mm: what a missing co-registration would look like
                ious.append(-((shifted & labels[0]).sum() / (shifted | labels[0]).sum()))
        own_recs = [own[own_at[r.series_id]] for r in s["rows"]]
        differ += any(ex["volume"].shape != own_recs[0]["volume"].shape
                      or not np.allclose(ex["affine"], own_recs[0]["affine"], atol=1e-3) for ex in own_recs[1:])
    aligned, shifted = np.array([i for i in ious if i >= 0]), -np.array([i for i in ious if i < 0])
    assert len(aligned) >= 10 and aligned.mean() > 0.6 and aligned.min() > 0.4, aligned
    assert aligned.mean() > shifted.mean() + 0.25, (aligned.mean(), shifted.mean())
    assert differ >= len(corpus.studies) - 2  # own grids: almost every study's series differ


def test_a_prepared_hyperacute_infarct_shows_on_dwi_not_flair(corpus):
    """End to end (generator, its own acquisitions, prep onto the study grid at 6 mm): study
    M0000's hyperacute infarct, its only lesion, against the brain in a ring around its mask, on
    the prepared [0, 1] intensities: bright on DWI, barely anything on FLAIR or T2."""
    assert corpus.studies["M0000_S0"]["findings"] == {"infarct", "dwi_flair_mismatch"}
    src = P.data_source(corpus.resample.tfds_dir, "train")
    studies = P.StudySource(src, SEQ)
    ex = next(studies[i] for i in range(len(studies)) if studies.index[i][0] == "M0000_S0")
    lesion = ex["label"] > 0
    core = ndimage.binary_erosion(lesion)
    brain = ex["image"][..., ex["present"]].astype(np.float32).mean(-1) > 0.15
    ring = ndimage.binary_dilation(lesion, iterations=2) & ~ndimage.binary_dilation(lesion) & brain
    assert core.sum() >= 10 and ring.sum() >= 50
    img = ex["image"].astype(np.float32)
    c = {q: float(img[..., k][core].mean() - img[..., k][ring].mean()) for k, q in enumerate(SEQ) if ex["present"][k]}
    assert set(c) == {"T2", "FLAIR", "DWI"}
    assert c["DWI"] > 0.3 and c["DWI"] > 2.5 * max(abs(c["FLAIR"]), abs(c["T2"])), c


def test_check_records_the_series_off_their_studys_grid(corpus, tmp_path):
    """studies="check": a series whose RAS grid differs from its study's first series' is an
    error naming its file and the way out, and is not prepared; the first series never is one.
    Which ones differ is read independently here, from the records prepared on their own grids."""
    res = _prep(corpus.manifest, str(tmp_path / "prep"), "check")
    own, own_at = _records(corpus.own.tfds_dir)
    expect = set()
    for s in corpus.studies.values():
        first = own[own_at[s["rows"][0].series_id]]
        for r in s["rows"][1:]:
            ex = own[own_at[r.series_id]]
            if ex["volume"].shape != first["volume"].shape or not np.allclose(ex["affine"], first["affine"], atol=1e-3):
                expect.add(r.series_id)
    assert expect and {e["series_id"] for e in res.errors} == expect
    image = {r.series_id: r.image for r in corpus.rows}
    for e in res.errors:
        assert e["file"] == image[e["series_id"]] and "studies='resample'" in e["reason"] and e["file"] in e["reason"]
    with open(tmp_path / "prep" / "errors.jsonl") as f:
        assert {json.loads(line)["series_id"] for line in f} == expect
    assert res.processed == len(corpus.rows) - len(expect)
    assert sum(c["series"] for c in res.counts.values()) == len(corpus.rows) - len(expect)


def test_cache_key_card_and_refusals(corpus):
    """The cache key is today's for studies="" (existing caches stay valid) and "check" (the same
    series), another for "resample"; the card states the grouping and counts the studies by
    their number of sequences; cropping with a study grid, an unknown mode and the Beam runner
    are refused."""
    blob = json.dumps(dataclasses.asdict(VCFG), sort_keys=True)
    today = hashlib.sha256(blob.encode()).hexdigest()[:12]
    assert prep.PrepConfig(volume=VCFG).cache_key() == today
    assert prep.PrepConfig(volume=VCFG, studies="check").cache_key() == today
    assert prep.PrepConfig(volume=VCFG, studies="resample").cache_key() != today
    with open(os.path.join(corpus.resample.out_dir, "dataset_card.json")) as f:
        card = json.load(f)
    grouping = card["preprocessing"]["studies"]
    assert grouping["mode"] == "resample" and "reference grid" in grouping["grid"]
    by_n = {}
    for s in corpus.studies.values():
        by_n[str(len(s["sequences"]))] = by_n.get(str(len(s["sequences"])), 0) + 1
    assert card["counts"]["train"]["studies_by_sequences"] == by_n == {"2": 2, "3": 4, "4": 4}
    with open(os.path.join(corpus.own.out_dir, "dataset_card.json")) as f:
        assert json.load(f)["preprocessing"]["studies"]["mode"] == "none"
    with pytest.raises(ValueError, match="crop_foreground"):
        prep.PrepConfig(volume=VolumeConfig(crop_foreground=True), studies="resample")
    with pytest.raises(ValueError, match="unknown study grouping"):
        prep.PrepConfig(studies="stack")
    assert cli.main(["prep", "--manifest", corpus.manifest, "--out", str(corpus.dir / "x"), "--studies", "resample",
                     "--crop-foreground", "--quiet"]) == 2
    assert cli.main(["prep", "--manifest", corpus.manifest, "--out", str(corpus.dir / "x"), "--studies", "check",
                     "--runner", "beam", "--quiet"]) == 2
    beam_prep = pytest.importorskip("data_prep.beam_prep")
    with pytest.raises(ValueError, match="local runner"):
        beam_prep.run(corpus.manifest, str(corpus.dir / "x"), prep.PrepConfig(studies="resample"), progress=False)


def test_resampled_cache_follows_the_study_grid(corpus, tmp_path):
    """A rerun reuses every series (the CLI's process pool too, which gets each series' grid); a
    manifest whose studies list another series first moves their reference grid, and the series
    resampled onto the old one are redone."""
    out = str(tmp_path / "prep")
    shutil.copytree(corpus.resample.out_dir, out)
    assert cli.main(["prep", "--manifest", corpus.manifest, "--out", out, "--spacing", "6", "6", "6", "--studies",
                     "resample", "--splits", "1", "0", "0", "--workers", "2", "--quiet"]) == 0
    res = _prep(corpus.manifest, out, "resample")
    assert res.processed == 0 and res.reused == len(corpus.rows)
    with open(corpus.manifest, newline="") as f:
        rows = list(csv.DictReader(f))[::-1]
    m = manifest_lib.write(os.path.join(os.path.dirname(corpus.manifest), "reversed.csv"), rows)
    res = _prep(m, out, "resample")
    assert res.ok and res.processed > 0
    src, at = _records(res.tfds_dir)
    for s in corpus.studies.values():
        recs = [src[at[r.series_id]] for r in s["rows"]]
        last = recs[-1]  # now the study's first series
        assert all(ex["volume"].shape == last["volume"].shape and np.allclose(ex["affine"], last["affine"], atol=1e-4)
                   for ex in recs)


# -- the loader --------------------------------------------------------------------------------


def test_study_index_and_source(corpus):
    src = P.data_source(corpus.resample.tfds_dir, "train")
    index = P.study_index(src, SEQ)
    assert {s for s, _ in index} == set(corpus.studies)
    for study, members in index:
        assert list(members) == corpus.studies[study]["sequences"]  # SEQUENCES order, as the corpus writes them
    assert all(set(m) <= {"T1", "DWI"} for _, m in P.study_index(src, ("T1", "DWI")))
    fake = [{"study_id": b"s", "sequence": b"T2"}, {"study_id": "s", "sequence": "T1"},
            {"study_id": "s", "sequence": "T2"}, {"study_id": "t", "sequence": "PD"}]
    assert P.study_index(fake, SEQ) == [("s", {"T1": 1, "T2": 0})]  # the first T2 kept; PD ignored

    studies = P.StudySource(src, SEQ)
    assert len(studies) == len(corpus.studies)
    for i in range(len(studies)):
        ex = studies[i]
        s = corpus.studies[ex["study_id"]]
        assert ex["image"].dtype == np.float16 and ex["image"].shape[-1] == len(SEQ)
        assert ex["present"].tolist() == [q in s["sequences"] for q in SEQ]
        assert np.all(ex["image"][..., ~ex["present"]] == 0)
        assert np.all(ex["image"][..., ex["present"]].max((0, 1, 2)) > 0)
        union = np.zeros(ex["label"].shape, bool)
        for _, members in [x for x in index if x[0] == ex["study_id"]]:
            for j in members.values():
                union |= np.asarray(src[j]["label"]) > 0
        assert ex["label"].dtype == np.uint8 and np.array_equal(ex["label"] > 0, union)
        assert set(ex["findings"].split(";")) - {""} == s["findings"] and ex["patient_id"] == ex["study_id"][:5]


def test_series_on_different_grids_are_refused(corpus):
    """Prepared with studies="" the series of a study are on their own grids: stacking them voxel
    by voxel would mix anatomy, so the study is refused, naming it and the way out."""
    src = P.data_source(corpus.own.tfds_dir, "train")
    studies = P.StudySource(src, SEQ)
    with pytest.raises(ValueError, match=r"study M\d{4}_S0: series .*--studies resample"):
        for i in range(len(studies)):
            studies[i]


def _eval_batches(src, **kw):
    cfg = P.LoaderConfig(batch_size=3, shuffle=False, repeat=False, drop_remainder=False)
    return list(P.studies(src, cfg, (16, 16, 16), SEQ, train=False, **kw))


def test_study_batches_for_evaluation(corpus):
    """Whole studies resized: the shapes, present flags equal to the study's sequences, absent
    channels exactly zero, y the manifest's findings; complete_only and min_present select."""
    src = P.data_source(corpus.resample.tfds_dir, "train")
    by_hash = {P.ToIds().map({"study_id": s})["study_id_hash"]: s for s in corpus.studies}
    batches = _eval_batches(src, findings=FINDINGS, keep_label=True)
    seen = []
    for b in batches:
        n = len(b["study_id_hash"])
        assert b["image"].shape == (n, 16, 16, 16, 4) and b["image"].dtype == np.float32
        assert b["present"].dtype == bool and b["y"].shape == (n, 4) and b["label"].shape == (n, 16, 16, 16)
        assert b["patient_id_hash"].dtype == np.int32
        for i in range(n):
            s = corpus.studies[by_hash[int(b["study_id_hash"][i])]]
            seen.append(by_hash[int(b["study_id_hash"][i])])
            assert b["present"][i].tolist() == [q in s["sequences"] for q in SEQ]
            assert b["y"][i].tolist() == [float(f in s["findings"]) for f in FINDINGS]
            assert np.all(b["image"][i][..., ~b["present"][i]] == 0)
    assert sorted(seen) == sorted(corpus.studies)
    assert sum(b["label"].sum() for b in batches) > 0
    complete = [s for s, v in corpus.studies.items() if len(v["sequences"]) == 4]
    got = _eval_batches(src, complete_only=True)
    assert sum(len(b["present"]) for b in got) == len(complete) == 4 and all(b["present"].all() for b in got)
    assert sum(len(b["present"]) for b in _eval_batches(src, min_present=3)) == 8
    plain = _eval_batches(src)[0]
    assert "label" not in plain and "y" not in plain


def test_study_batches_for_training_drop_sequences_deterministically(corpus):
    """Training crops: one box for all channels, dropped and absent channels exactly zero after
    augmentation, never fewer than min_present sequences, a different drop for a study in
    another epoch; the same seed gives the same batches, and a restored iterator continues
    exactly."""
    src = P.data_source(corpus.resample.tfds_dir, "train")
    by_hash = {P.ToIds().map({"study_id": s})["study_id_hash"]: s for s in corpus.studies}
    cfg = P.LoaderConfig(batch_size=2, seed=3)

    def loader():
        return iter(P.studies(src, cfg, (12, 12, 12), SEQ, train=True, findings=FINDINGS, keep_label=True, drop=0.5,
                              min_present=2))

    it = loader()
    batches = [next(it) for _ in range(15)]  # three epochs of the ten studies
    patterns: dict = {}
    for b in batches:
        assert b["image"].shape == (2, 12, 12, 12, 4) and b["label"].shape == (2, 12, 12, 12)
        for i in range(2):
            study = by_hash[int(b["study_id_hash"][i])]
            acquired = np.array([q in corpus.studies[study]["sequences"] for q in SEQ])
            present = b["present"][i]
            assert present.sum() >= 2 and not np.any(present & ~acquired)
            assert np.all(b["image"][i][..., ~present] == 0)
            assert np.all(np.abs(b["image"][i][..., present]).max((0, 1, 2)) > 0)
            patterns.setdefault(study, set()).add(tuple(present))
    assert any(len(p) > 1 for p in patterns.values())  # the drop changes across epochs
    assert any(sum(p) < sum(q in corpus.studies[s]["sequences"] for q in SEQ) for s, ps in patterns.items() for p in ps)
    again = loader()
    for b in batches[:4]:
        nb = next(again)
        assert all(np.array_equal(b[k], nb[k]) for k in b)
    state = again.get_state()
    ahead = [next(again) for _ in range(3)]
    again.set_state(state)
    for b in ahead:
        nb = next(again)
        assert all(np.array_equal(b[k], nb[k]) for k in b)
