"""decipher prep --runner beam (the DirectRunner): the same records, splits, card and errors as the
local pool; bad inputs recorded; a killed run finished by a rerun; gs:// paths end to end; a DICOM tree."""

import csv
import glob
import json
import os
import subprocess
import sys

import pytest

beam = pytest.importorskip("apache_beam")

from array_record.python import array_record_module as arm  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402

from data_prep import beam_prep, manifest as manifest_lib, prep, volume  # noqa: E402
from decipher_jax import cli  # noqa: E402
from decipher_jax.data import synthetic  # noqa: E402
from helpers import bad_rows  # noqa: E402

CFG = volume.VolumeConfig(target_spacing=(3.0, 3.0, 3.0))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The synthetic corpus (8 patients) plus one row per kind of bad input, as one manifest."""
    d = str(tmp_path_factory.mktemp("corpus"))
    m = synthetic.generate_corpus(d, n_patients=8, seed=1, matrix=20)
    with open(m, newline="") as f:
        good = list(csv.DictReader(f))
    for r in good:
        for k in ("image", "label", "report_file"):
            r[k] = os.path.join(d, r[k]) if r[k] else ""
    bad = bad_rows(d, good[0])
    return d, manifest_lib.write(os.path.join(d, "all.csv"), good + list(bad.values())), good, bad


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory):
    """The local pool's preparation, the reference."""
    _, m, _, _ = corpus
    out = str(tmp_path_factory.mktemp("local"))
    return out, prep.run(m, out, prep.PrepConfig(volume=CFG, workers=1), progress=False)


def records(tfds_dir: str) -> dict[str, list[dict]]:
    """Each split's records, decoded, in shard then record order. (Not the raw bytes: a record is a
    protobuf map, whose serialised field order varies from one process to another.)"""
    import tensorflow_datasets as tfds

    for f in glob.glob(os.path.join(tfds_dir, "*.array_record-*")):
        r = arm.ArrayRecordReader(f)
        assert "uncompressed" in r.writer_options_string()  # the local path's chunk options
        r.close()
    b = tfds.builder_from_directory(tfds_dir)
    return {s: [dict(ex) for ex in b.as_data_source(s)] for s in b.info.splits}


def same(a: dict, b: dict) -> bool:
    """Two splits' records equal field by field, in the same order: the volume bytes, label maps,
    affines, reports and metadata."""
    import numpy as np

    return a.keys() == b.keys() and all(
        len(a[s]) == len(b[s]) and all(x.keys() == y.keys() and all(
            np.asarray(x[k]).dtype == np.asarray(y[k]).dtype and np.array_equal(x[k], y[k]) for k in x)
            for x, y in zip(a[s], b[s])) for s in a)


def errors(out: str) -> dict[str, dict]:
    with open(os.path.join(out, "errors.jsonl")) as f:
        return {e["series_id"]: e for e in map(json.loads, f)}


def card(out: str) -> dict:
    with open(os.path.join(out, "dataset_card.json")) as f:
        c = json.load(f)
    c.pop("created")
    return c


def test_beam_equals_local_record_for_record(corpus, local, tmp_path):
    d, m, good, bad = corpus
    ref_out, ref = local
    out = str(tmp_path / "beam")
    # Through the CLI, on the DirectRunner with two worker processes; exit 1: bad inputs were recorded.
    assert cli.main(["prep", "--manifest", m, "--out", out, "--spacing", "3", "3", "3", "--runner", "beam",
                     "--workers", "2", "--quiet"]) == 1
    tfds_dir = os.path.join(out, "tfds", "decipher_mri", "1.4.0")
    got, want = records(tfds_dir), records(ref.tfds_dir)
    assert {s: len(v) for s, v in got.items()} == {s: len(v) for s, v in want.items()}
    assert sum(len(v) for v in got.values()) == len(good)
    assert same(got, want)  # the same volumes, label maps, affines and metadata, splits and order
    assert card(out) == card(ref_out)
    assert errors(out) == errors(ref_out) and set(errors(out)) == {f"bad_{k}" for k in bad}
    assert "report is empty" in errors(out)["bad_empty_report"]["reason"]
    assert errors(out)["bad_missing"]["file"] == bad["missing"]["image"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref_out))  # no by-products left beside them
    assert got["train"][0]["volume"].ndim == 3 and got["train"][0]["volume"].dtype.name == "float16"
    # Pipeline options without the Beam runner are refused.
    assert cli.main(["prep", "--manifest", m, "--out", out, "--runner", "local", "--beam-options=--x"]) == 2


_KILL = """
import sys
from data_prep import beam_prep, prep, volume
real, n = prep.process_row, [0]
def dying(row, *a):
    n[0] += 1
    if n[0] > {after}:
        import os; os._exit(17)  # the machine goes away mid-run: no cleanup, no exception
    return real(row, *a)
prep.process_row = dying
beam_prep.run({m!r}, {out!r}, prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(3.0, 3.0, 3.0)), workers=1),
              progress=False)
"""


def test_killed_beam_run_is_finished_by_a_rerun(corpus, local, tmp_path):
    d, m, good, bad = corpus
    out = str(tmp_path / "beam")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    after = 12  # calls; at most 8 of them bad rows, so some series are cached before the kill
    p = subprocess.run([sys.executable, "-c", _KILL.format(after=after, m=m, out=out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 17, p.stderr[-2000:]
    cache = os.path.join(out, "cache", prep.PrepConfig(volume=CFG).cache_key())
    done = [f for f in os.listdir(cache) if f.endswith(".npz") and not f.endswith(".tmp.npz")]
    assert 0 < len(done) <= after and not os.path.exists(os.path.join(out, "tfds"))
    res = beam_prep.run(m, out, prep.PrepConfig(volume=CFG, workers=1), progress=False)
    assert res.reused == len(done) and res.processed == len(good) - len(done)
    assert len(res.errors) == len(bad)  # bad inputs are retried, and recorded again
    assert same(records(res.tfds_dir), records(local[1].tfds_dir))


class FakeGCS(LocalFileSystem):
    """``gs://bucket/key`` as ``ROOT/bucket/key`` on this disk, under fsspec's GCS protocol names, so
    every remote code path (epath reads and writes, staged ArrayRecord shards, streamed inputs)
    runs as it would against a bucket."""

    protocol = ("gs", "gcs")
    root = ""

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's argument, as epath passes it
        super().__init__(*args, auto_mkdir=True, **kwargs)  # a bucket has no folders to make

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for p in ("gs://", "gcs://"):
            if path.startswith(p):
                path = os.path.join(cls.root, path[len(p):])
        return super()._strip_protocol(path)

    def glob(self, path, **kwargs):  # like gcsfs: "bucket/key", which epath prefixes with "gs://"
        return [os.path.relpath(p, self.root) for p in super().glob(path, **kwargs)]


def test_gs_paths_end_to_end(corpus, local, tmp_path, monkeypatch):
    import fsspec
    from etils.epath import backend

    d, m, good, bad = corpus
    bucket = tmp_path / "bucket"
    monkeypatch.setattr(FakeGCS, "root", str(tmp_path))  # gs://bucket/... is tmp_path/bucket/...
    fsspec.register_implementation("gs", FakeGCS, clobber=True)
    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    # The corpus copied into the bucket, its manifest with paths relative to it.
    (bucket / "corpus").mkdir(parents=True)
    rows = []
    for r in good:
        r = dict(r)
        for k in ("image", "label", "report_file"):
            if r[k]:
                rel = os.path.relpath(r[k], d)
                os.makedirs(bucket / "corpus" / os.path.dirname(rel), exist_ok=True)
                with open(r[k], "rb") as fi, open(bucket / "corpus" / rel, "wb") as fo:
                    fo.write(fi.read())
                r[k] = rel
        rows.append(r)
    rows.append({**rows[0], "series_id": "bad_missing", "image": "gs://bucket/nowhere/x.nii.gz", "label": ""})
    manifest_lib.write(str(bucket / "corpus" / "manifest.csv"), rows)
    try:
        res = beam_prep.run("gs://bucket/corpus/manifest.csv", "gs://bucket/prep",
                            prep.PrepConfig(volume=CFG, workers=1), progress=False)
        assert res.tfds_dir == "gs://bucket/prep/tfds/decipher_mri/1.4.0" and res.processed == len(good)
        assert same(records(str(bucket / "prep/tfds/decipher_mri/1.4.0")), records(local[1].tfds_dir))
        err = errors(str(bucket / "prep"))
        assert set(err) == {"bad_missing"} and err["bad_missing"]["file"] == "gs://bucket/nowhere/x.nii.gz"
        assert "image file not found" in err["bad_missing"]["reason"]
        c, ref = card(str(bucket / "prep")), card(local[0])
        assert c["statistics"] == ref["statistics"] and c["counts"] == ref["counts"] and c["manifest"] == "gs://bucket/corpus/manifest.csv"
        with pytest.raises(manifest_lib.ManifestError, match="--runner beam"):
            prep.run("gs://bucket/corpus/manifest.csv", str(tmp_path / "out"), prep.PrepConfig(volume=CFG))
        again = beam_prep.run("gs://bucket/corpus/manifest.csv", "gs://bucket/prep",
                              prep.PrepConfig(volume=CFG, workers=1), progress=False)
        assert again.processed == 0 and again.reused == len(good)
    finally:
        backend.fsspec_backend._get_filesystem.cache_clear()


def test_dicom_tree_through_beam_equals_local(tmp_path):
    from test_dicom import _tree  # two patients' oblique DICOM series, an SR to skip, a reports CSV

    _tree(tmp_path)
    cfg = prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(2.0, 2.0, 2.0)), workers=1,
                          dicom=prep.DicomOptions(reports=str(tmp_path / "reports.csv"), pseudonymise=True, salt="s"))
    ref = prep.run(str(tmp_path / "tree"), str(tmp_path / "local"), cfg, progress=False)
    res = beam_prep.run(str(tmp_path / "tree"), str(tmp_path / "beam"), cfg, progress=False)
    assert res.processed == ref.processed == 3
    assert [s["reason"] for s in res.skipped] == ["not an image (Basic Text SR Storage)"]
    assert same(records(res.tfds_dir), records(ref.tfds_dir))
    with open(tmp_path / "beam" / "errors.jsonl") as a, open(tmp_path / "local" / "errors.jsonl") as b:
        assert a.read() == b.read()  # the skipped SR, named by number in SOURCE.json
    ca, cb = card(str(tmp_path / "beam")), card(str(tmp_path / "local"))
    assert ca.pop("manifest").endswith("beam/dicom/manifest.csv") and cb.pop("manifest").endswith("local/dicom/manifest.csv")
    assert ca == cb and ca["dicom"]["pseudonymised"]
    with pytest.raises(manifest_lib.ManifestError, match="local --out"):
        beam_prep.run(str(tmp_path / "tree"), "gs://bucket/out", cfg, progress=False)
