"""decipher prep against hostile or broken inputs: unsafe ids, wide labels, bad headers, constant
images, mis-encoded reports, gzip bombs, symlink loops, broken manifests, and a seeded fuzz run.

Each bad series must end as one line of errors.jsonl (file + reason) while the rest is prepared."""

import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from data_prep import manifest as manifest_lib
from data_prep import prep, volume
from decipher_jax.data import pipelines as P
from decipher_jax.data import transforms as T

CFG = volume.VolumeConfig(target_spacing=(4.0, 4.0, 4.0))
AFF = np.diag([2.0, 2.0, 2.0, 1.0])


def _image(d, name, seed=0, shape=(16, 16, 16)):
    data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)
    p = os.path.join(d, name)
    nib.save(nib.Nifti1Image(data, AFF), p)
    return p


def _raw_nii(path, data, gz=False, edits=(), **fields):
    """A NIfTI-1 file written byte by byte, so header fields nibabel would fix on save stay as set;
    ``edits`` are ``(field, index or None, value)`` applied last."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(data.dtype)
    hdr.set_data_shape(data.shape)
    hdr.set_sform(AFF, code=1)
    hdr.set_qform(AFF, code=1)
    hdr.set_zooms((2.0,) * data.ndim)
    hdr["vox_offset"] = 352
    for k, v in fields.items():
        hdr[k] = v
    for k, i, v in edits:
        if i is None:
            hdr[k] = v
        else:
            hdr[k][i] = v
    blob = hdr.binaryblock + b"\0" * 4 + np.asarray(data).tobytes(order="F")
    with open(path, "wb") as f:
        f.write(gzip.compress(blob, 1) if gz else blob)
    return path


def _row(sid, image, **kw):
    return {"series_id": sid, "study_id": f"st_{sid}", "patient_id": f"p_{sid}", "image": image, **kw}


def _jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _run(manifest, out):
    return prep.run(manifest, str(out), prep.PrepConfig(volume=CFG, workers=1), progress=False)


def _errors(out) -> list[dict]:
    with open(os.path.join(out, "errors.jsonl")) as f:
        return [json.loads(line) for line in f]


def _records(tfds_dir) -> dict:
    """series_id -> decoded record (labels kept), over every split written."""
    import tensorflow_datasets as tfds

    out = {}
    for split in tfds.builder_from_directory(tfds_dir).info.splits:
        src = P.data_source(tfds_dir, split)
        for i in range(len(src)):
            ex = T.Decode(keep_label=True).map(src[i])
            out[ex["series_id"]] = ex
    return out


def _tree(root, skip) -> set:
    return {os.path.join(r, f) for r, _, fs in os.walk(root) if not r.startswith(skip) for f in fs + [""]}


def test_unsafe_series_ids_are_refused_per_row_and_nothing_escapes(tmp_path):
    img = _image(str(tmp_path), "img.nii.gz")
    good = ["sub-01_ses-1_T1w", "1.2.840.113619.2.55"]
    bad = ["../../../../escaped_series", "sub/dir/x", "back\\slash", ".hidden", "a..b", "nul\x00id", "tab\tid",
           "x" * 201]
    m = _jsonl(tmp_path / "m.jsonl", [_row(s, img) for s in good + bad])
    out = tmp_path / "a" / "b" / "out"  # "../../../../" from out/cache/<key>/ lands in a/
    out.mkdir(parents=True)
    before = _tree(str(tmp_path), str(out))
    res = _run(m, out)
    assert _tree(str(tmp_path), str(out)) == before  # nothing written outside --out
    assert not list(tmp_path.rglob("escaped_series*"))
    errs = {e["series_id"]: e for e in _errors(out)}
    assert set(errs) == set(bad)
    for sid in bad:
        assert "series_id" in errs[sid]["reason"] and errs[sid]["file"] == m and errs[sid]["field"] == "series_id"
    assert set(_records(res.tfds_dir)) == set(good) and res.processed == 2
    # Defence in depth: a caller that bypasses the manifest still cannot write outside the cache.
    cache = os.path.join(out, "cache", "k")
    os.makedirs(cache)
    st = prep.process_row(manifest_lib.SeriesRow("../../escaped2", "s", "p", img), CFG, cache)
    assert st["status"] == "error" and "outside the cache" in st["reason"]
    assert not list(tmp_path.rglob("escaped2*"))


def test_label_ids_above_255_survive_into_the_records(tmp_path):
    d = str(tmp_path)
    img = _image(d, "img.nii.gz", shape=(16, 16, 16))
    lab = np.zeros((16, 16, 16), np.int16)
    lab[:8, :8, :8], lab[8:, 8:, 8:], lab[:8, 8:, :8] = 300, 2035, 7  # 4 mm output voxels: blocks survive
    nib.save(nib.Nifti1Image(lab, AFF), wide := os.path.join(d, "aseg.nii.gz"))
    nib.save(nib.Nifti1Image(np.minimum(lab, 200).astype(np.uint8), AFF), narrow := os.path.join(d, "narrow.nii.gz"))
    nib.save(nib.Nifti1Image(np.where(lab == 7, -1, lab).astype(np.int16), AFF), neg := os.path.join(d, "neg.nii.gz"))
    frac = os.path.join(d, "frac.nii.gz")
    nib.save(nib.Nifti1Image(np.where(lab == 7, 0.5, lab).astype(np.float32), AFF), frac)
    rows = [_row("wide", img, label=wide), _row("narrow", img, label=narrow), _row("neg", img, label=neg),
            _row("frac", img, label=frac)]
    res = _run(_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out")
    errs = {e["series_id"]: e for e in _errors(tmp_path / "out")}
    assert set(errs) == {"neg", "frac"}
    assert "negative" in errs["neg"]["reason"] and errs["neg"]["file"] == neg
    assert "non-integer" in errs["frac"]["reason"] and errs["frac"]["file"] == frac
    recs = _records(res.tfds_dir)
    assert set(np.unique(recs["wide"]["label"])) == {0, 7, 300, 2035}
    assert set(np.unique(recs["narrow"]["label"])) == {0, 7, 200}
    # The cache keeps uint8 where the ids fit (half the bytes), uint16 otherwise.
    cache = os.path.join(tmp_path, "out", "cache", prep.PrepConfig(volume=CFG).cache_key())
    with np.load(os.path.join(cache, "narrow.npz")) as z, np.load(os.path.join(cache, "wide.npz")) as w:
        assert z["label"].dtype == np.uint8 and w["label"].dtype == np.uint16


def test_bad_pixdim_and_affines_are_refused_before_the_affine_is_used(tmp_path):
    data = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32)
    no_xform = {"sform_code": 0, "qform_code": 0}
    cases = {
        "pixdim0": ({**no_xform, "pixdim": [1, 0, 0, 0, 1, 1, 1, 1]}, "pixdim"),
        "pixdim_neg": ({**no_xform, "pixdim": [1, -2, 2, 2, 1, 1, 1, 1]}, "pixdim"),
        "pixdim_nan": ({"pixdim": [1, np.nan, 2, 2, 1, 1, 1, 1]}, "pixdim"),
        "sform_nan": ({"srow_x": [np.nan, 0, 0, 0]}, "affine is not sane"),
        "sform_singular": ({"srow_x": [0, 0, 0, 0], "qform_code": 0}, "affine is not sane"),
    }
    for name, (fields, words) in cases.items():
        p = _raw_nii(str(tmp_path / f"{name}.nii"), data, **fields)
        with pytest.raises(volume.BadInput, match=words) as e:
            volume.load(p, CFG)
        assert e.value.path == p and str(e.value).startswith(p), name


def test_constant_image_is_refused(tmp_path):
    p = _raw_nii(str(tmp_path / "const.nii"), np.full((12, 12, 12), 7, np.int16))
    with pytest.raises(volume.BadInput, match=r"image is constant \(all voxels = 7\)"):
        volume.process(p, None, CFG)


def test_reports_must_be_utf8_and_a_bom_is_dropped(tmp_path):
    img = _image(str(tmp_path), "img.nii.gz")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("FINDINGS: caf\u00e9 normal.".encode("latin-1"))
    bom = tmp_path / "bom.txt"
    bom.write_bytes("FINDINGS: caf\u00e9 normal.".encode("utf-8-sig"))
    rows = [_row("latin", img, report_file=str(latin)), _row("bom", img, report_file=str(bom))]
    res = _run(_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out")
    (err,) = _errors(tmp_path / "out")
    assert err["series_id"] == "latin" and err["file"] == str(latin)
    assert "not valid UTF-8 at byte 13" in err["reason"] and "re-save" in err["reason"]
    src = P.data_source(res.tfds_dir, "train")
    (rec,) = [src[i] for i in range(len(src))]
    assert rec["report_full"].decode() == "FINDINGS: caf\u00e9 normal."  # no U+FEFF, no U+FFFD
    assert not rec["has_label"]  # and a record without a label map reads back (its placeholder decodes)


def _bomb(path, extension=False):
    """~1 MB of .nii.gz that inflates to 1 GiB (gzip members concatenate): the uint8 data of the
    1024**3 voxels its header claims, or one header extension of that size."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape((16, 16, 16) if extension else (1024, 1024, 1024))
    hdr["vox_offset"] = 352 + (1 << 30 if extension else 0)
    ext = b"\1\0\0\0" + np.array([1 << 30, 4], "<i4").tobytes() if extension else b"\0" * 4
    zeros = gzip.compress(b"\0" * (16 << 20), 9)
    with open(path, "wb") as f:
        f.write(gzip.compress(hdr.binaryblock + ext))
        for _ in range(64):
            f.write(zeros)
    return path


_CHILD = """
import json, sys
from data_prep import prep, volume
cfg = prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(4.0,) * 3), workers=1)
res = prep.run(sys.argv[1], sys.argv[2], cfg, progress=False)
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"tfds_dir": res.tfds_dir, "errors": len(res.errors), "peak_mb": peak / 1024}))
"""


def _run_child(manifest, out, timeout=120) -> dict:
    """prep.run in a fresh process: its peak RSS (VmHWM) is this run's alone."""
    p = subprocess.run([sys.executable, "-c", _CHILD, manifest, str(out)], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"prep child peak RSS {info['peak_mb']:.0f} MB")
    return info


def test_gzip_bomb_is_refused_from_the_header_with_bounded_memory(tmp_path):
    d = str(tmp_path)
    bomb = _bomb(os.path.join(d, "bomb.nii.gz"))
    assert os.path.getsize(bomb) < 2 << 20
    img = _image(d, "img.nii.gz")
    ext_bomb = _bomb(os.path.join(d, "ext_bomb.nii.gz"), extension=True)
    rows = [_row("good", img), _row("bomb", bomb), _row("label_bomb", img, label=bomb), _row("ext_bomb", ext_bomb),
            _row("good2", _image(d, "b.nii.gz", 1))]
    info = _run_child(_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out")
    assert info["peak_mb"] < 1500
    errs = {e["series_id"]: e for e in _errors(tmp_path / "out")}
    assert set(errs) == {"bomb", "label_bomb", "ext_bomb"}
    for e in (errs["bomb"], errs["label_bomb"]):
        assert e["file"] == bomb and "max_voxels" in e["reason"] and "(1024, 1024, 1024)" in e["reason"]
    assert errs["ext_bomb"]["file"] == ext_bomb and "extensions claim" in errs["ext_bomb"]["reason"]
    assert set(_records(info["tfds_dir"])) == {"good", "good2"}


def test_any_failure_of_one_series_is_recorded_not_raised(tmp_path, monkeypatch):
    img = _image(str(tmp_path), "img.nii.gz")

    def boom(*a, **k):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(volume, "process", boom)
    st = prep.process_row(manifest_lib.SeriesRow("s1", "s", "p", img), CFG, str(tmp_path))
    assert st["status"] == "error" and st["file"] == img and "MemoryError: cannot allocate" in st["reason"]


def test_symlink_loop_and_paths_with_colons_are_reported_exactly(tmp_path):
    loop_a, loop_b = str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")
    os.symlink(loop_b, loop_a)
    os.symlink(loop_a, loop_b)
    weird = tmp_path / "weird: dir"
    weird.mkdir()
    trunc = str(weird / "x.nii.gz")
    with open(_image(str(tmp_path), "img.nii.gz"), "rb") as f:
        blob = f.read()
    with open(trunc, "wb") as f:
        f.write(blob[: len(blob) // 2])
    rows = [_row("loop", loop_a), _row("weird", trunc), _row("dangling", str(tmp_path / "gone.nii.gz"))]
    os.symlink(str(tmp_path / "nowhere"), str(tmp_path / "gone.nii.gz"))
    _run(_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out")
    errs = {e["series_id"]: e for e in _errors(tmp_path / "out")}
    assert "symlink loop" in errs["loop"]["reason"] and errs["loop"]["file"] == loop_a
    assert errs["weird"]["file"] == trunc and "truncated" in errs["weird"]["reason"]
    assert "broken symlink" in errs["dangling"]["reason"]
    e = volume.BadInput("/a: b/c.nii", "why")
    assert (e.path, e.reason, str(e)) == ("/a: b/c.nii", "why", "/a: b/c.nii: why")


def test_unreadable_safetensors_name_the_file(tmp_path):
    from decipher_jax.interop.common import read_torch_weights

    p = tmp_path / "w.safetensors"
    p.write_bytes(b"\x10\0\0\0\0\0\0\0{not a header")
    with pytest.raises(ValueError, match=f"{p}: not a readable .safetensors file"):
        read_torch_weights(str(p))


def test_manifest_row_problems_are_per_row_and_file_problems_raise(tmp_path):
    j = tmp_path / "m.jsonl"
    j.write_text(json.dumps(_row("A", "a.nii", age="045Y")) + "\n"
                 + json.dumps({"series_id": "B", "study_id": "s", "patient_id": "p"}) + "\n\n"
                 + json.dumps(_row("C", "c.nii", age="4x")) + "\n" + json.dumps(_row("D", "d.nii", age="006M")) + "\n"
                 + json.dumps(_row("", "e.nii")) + "\n")
    errs: list = []
    rows = manifest_lib.read(str(j), errs)
    assert [r.series_id for r in rows] == ["A", "D"] and rows[0].age == 45.0 and rows[1].age == 0.5
    assert [(e.series_id, e.line, e.field) for e in errs] == [("B", 2, "image"), ("C", 4, "age"), ("", 6, "series_id")]
    assert str(errs[0]).startswith(f"{j}: line 2: field 'image': ")
    with pytest.raises(manifest_lib.ManifestError, match="line 2: field 'image'"):
        manifest_lib.read(str(j))  # without an error list, a row problem raises
    assert manifest_lib.parse_age("003W") == pytest.approx(21 / 365.25)
    assert manifest_lib.parse_age("010D") == pytest.approx(10 / 365.25) and np.isnan(manifest_lib.parse_age(""))
    # Excel's "CSV UTF-8" starts with a BOM.
    c = tmp_path / "bom.csv"
    c.write_bytes("series_id,study_id,patient_id,image\nA,s,p,a.nii\n".encode("utf-8-sig"))
    assert manifest_lib.read(str(c))[0].series_id == "A"
    file_level = {
        "bad.jsonl": (b'{"series_id": "A"}\n{"series_id": \n', "line 2: malformed JSON"),
        "list.jsonl": (b"[1, 2]\n", "line 1: expected a JSON object"),
        "latin.csv": ("series_id,study_id,patient_id,image\nA,s,p,caf\u00e9.nii\n".encode("latin-1"), "byte 45"),
        "empty.csv": (b"series_id,study_id,patient_id,image\n", "no rows"),
        "cols.csv": (b"series_id,image\nA,a.nii\n", "missing required column"),
        "dup.csv": (b"series_id,study_id,patient_id,image\nA,s,p,a\nA,s,p,b\n",
                    "line 3: field 'series_id'.*duplicated"),
    }
    for name, (blob, words) in file_level.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(manifest_lib.ManifestError, match=words):
            manifest_lib.read(str(tmp_path / name), [])
    with pytest.raises(manifest_lib.ManifestError, match="cannot read the manifest"):
        manifest_lib.read(str(tmp_path / "absent.csv"))
    assert issubclass(manifest_lib.ManifestError, ValueError)


def test_prep_records_manifest_row_errors_and_goes_on(tmp_path):
    img = _image(str(tmp_path), "img.nii.gz")
    m = _jsonl(tmp_path / "m.jsonl", [_row("ok", img), {"series_id": "noimg", "study_id": "s", "patient_id": "p"},
                                      _row("badage", img, age="forty")])
    res = _run(m, tmp_path / "out")
    errs = {e["series_id"]: e for e in _errors(tmp_path / "out")}
    assert (errs["noimg"]["line"], errs["noimg"]["field"]) == (2, "image") and errs["noimg"]["file"] == m
    assert errs["badage"]["field"] == "age" and "forty" in errs["badage"]["reason"]
    assert res.processed == 1 and not res.ok and set(_records(res.tfds_dir)) == {"ok"}


# --- fuzz -------------------------------------------------------------------------------------

_HEADER_MUTATIONS = [  # (field, index or None, values)
    ("dim", 0, [0, -1, 1, 2, 4, 7, 8, 100]),
    ("dim", 1, [0, -5, 1, 32767]),
    ("dim", 3, [0, 1, 3, 30000]),
    ("pixdim", 1, [0.0, -1.0, np.nan, np.inf, 1e-12, 1e9]),
    ("pixdim", 0, [0.0, np.nan]),
    ("datatype", None, [32, 128, 0, 9999, 1, 1792, 2048, 2304]),  # complex64, RGB24, unknown, binary, c128, c256, RGBA
    ("bitpix", None, [0, 7]),
    ("vox_offset", None, [0, 1, 347, 353, 1e9, -5, np.nan]),
    ("sform_code", None, [0, 99]),
    ("qform_code", None, [0, 99]),
    ("srow_y", 1, [np.nan, np.inf, 0.0, 1e6]),
    ("quatern_b", None, [np.nan, 5.0]),
    ("scl_slope", None, [np.nan, np.inf, 0.0, -1.0]),
    ("scl_inter", None, [np.nan, np.inf]),
    ("magic", None, [b"ni1", b"xyz"]),
    ("sizeof_hdr", None, [0, 540]),
]


def _fuzz_cases(d, rng) -> list[dict]:
    base = (rng.normal(500, 100, (12, 12, 12))).astype(np.int16)
    good = _raw_nii(os.path.join(d, "good.nii"), base)
    rows = [_row(f"good{i}", _image(d, f"good{i}.nii.gz", seed=i, shape=(12, 12, 12))) for i in range(3)]
    rows.append(_row("good_raw", good))
    with open(good, "rb") as f:
        raw = f.read()
    blobs = {".nii": raw, ".nii.gz": gzip.compress(raw)}
    for ext, blob in blobs.items():  # truncations anywhere, header included
        for cut in sorted(rng.choice(len(blob), 6, replace=False)):
            p = os.path.join(d, f"trunc{cut}{ext}")
            with open(p, "wb") as f:
                f.write(blob[:cut])
            rows.append(_row(f"trunc{cut}{ext}", p))
    single = [[(f, i, v)] for f, i, vs in _HEADER_MUTATIONS for v in vs]
    combos = [[single[k][0] for k in rng.choice(len(single), 3, replace=False)] for _ in range(12)]
    for n, edits in enumerate(single + combos):
        p = _raw_nii(os.path.join(d, f"hdr{n}.nii" + (".gz" if n % 2 else "")), base, gz=bool(n % 2), edits=edits)
        sid = f"hdr{n}_" + "+".join(f"{f}{'' if i is None else i}" for f, i, _ in edits)
        # Every third mutated file is a label map paired with a good image (the label path is checked too).
        rows.append(_row(sid, rows[0]["image"], label=p) if n % 3 == 2 else _row(sid, p))
    for n, shape in enumerate([(12, 12, 12, 1, 1, 1, 2), (12, 12), (12, 12, 12, 3), (7, 12, 12)]):
        data = (np.arange(np.prod(shape)) % 251).astype(np.uint8).reshape(shape)
        rows.append(_row(f"shape{n}", _raw_nii(os.path.join(d, f"shape{n}.nii"), data)))
    rows.append(_row("complex", _raw_nii(os.path.join(d, "complex.nii"), (base + 1j).astype(np.complex64))))
    rows.append(_row("bomb", _raw_nii(os.path.join(d, "bomb.nii.gz"), np.zeros(16, np.uint8), gz=True,
                                      dim=[3, 2048, 2048, 2048, 1, 1, 1, 1])))
    with open(p := os.path.join(d, "zlib_garbage.nii.gz"), "wb") as f:
        f.write(b"\x1f\x8b\x08\x00" + rng.bytes(200))
    rows.append(_row("gz_garbage", p))
    rows.append({"series_id": "no_image", "study_id": "s", "patient_id": "p"})
    rows.append(_row("bad_age", rows[0]["image"], age="-3"))
    rows.append(_row("../up", rows[0]["image"]))
    return rows


def test_fuzzed_inputs_each_end_in_records_or_errors_exactly_once(tmp_path):
    d = str(tmp_path / "in")
    os.makedirs(d)
    rows = _fuzz_cases(d, np.random.default_rng(1234))
    assert len(rows) >= 90 and len({r["series_id"] for r in rows}) == len(rows)
    info = _run_child(_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out", timeout=90)
    assert info["peak_mb"] < 1500
    errs = _errors(tmp_path / "out")
    recs = _records(info["tfds_dir"])
    err_ids = [e["series_id"] for e in errs]
    assert len(err_ids) == len(set(err_ids)) and not set(err_ids) & set(recs)
    assert set(err_ids) | set(recs) == {r["series_id"] for r in rows}  # each row exactly once
    for e in errs:
        assert e["reason"].strip() and e["file"], e
        assert not any(w in e["reason"] for w in ("Traceback", "LinAlgError", "MemoryError")), e
    assert {"good0", "good1", "good2", "good_raw"} <= set(recs)
    by_id = {e["series_id"]: e["reason"] for e in errs}
    assert "max_voxels" in by_id["bomb"] and "complex" in by_id["complex"]
    with open(tmp_path / "out" / "dataset_card.json") as f:
        card = json.load(f)
    assert sum(c["series"] for c in card["counts"].values()) == len(recs) and card["errors"] == len(errs)


def test_cli_prints_a_manifest_error_without_a_traceback(tmp_path, capsys):
    from decipher_jax import cli

    m = tmp_path / "m.csv"
    m.write_text("series_id,study_id,patient_id\ns1,st1,p1\n")  # no image column
    assert cli.main(["prep", "--manifest", str(m), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prep: error: ") and str(m) in err and "image" in err and "Traceback" not in err
