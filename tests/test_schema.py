"""One record schema: the manifest writer, the parser, the TFDS features, the records prep writes,
the decoder and the evaluations' metadata all carry the fields of ``data_prep.schema``; a
template is told apart by its manifest role, not by its id."""

import csv
import dataclasses

import numpy as np
import pytest

from data_prep import manifest, prep, schema, volume
from decipher_jax.data import pipelines as P
from decipher_jax.data import synthetic
from decipher_jax.data import transforms as T


@pytest.fixture(scope="module")
def roles_prep(tmp_path_factory):
    """A tiny corpus where a lesion series is named like a template (``MNI152_T1``) and a series
    with an ordinary id has the role ``template``; prepared into one split."""
    d = tmp_path_factory.mktemp("roles")
    m = synthetic.generate_corpus(str(d / "raw"), n_patients=2, seed=0, matrix=16)
    with open(m, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["series_id"] = "MNI152_T1"
    rows[1]["role"] = schema.TEMPLATE
    m = manifest.write(str(d / "raw" / "manifest.csv"), rows)
    res = prep.run(m, str(d / "prep"), prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(6.0,) * 3),
                                                       split_fractions=(1.0, 0.0, 0.0), workers=1), progress=False)
    assert res.ok, res.errors
    return res.tfds_dir, m, rows


def test_every_stage_carries_the_schema_fields(roles_prep):
    from data_prep import tfds_builder
    from decipher_jax.eval import embed

    tfds_dir, m, rows = roles_prep
    with open(m, newline="") as f:
        assert tuple(next(csv.reader(f))) == schema.MANIFEST_COLUMNS  # what the corpus writer writes
    assert tuple(f.name for f in dataclasses.fields(manifest.SeriesRow)) == schema.MANIFEST_COLUMNS
    assert set(schema.METADATA) <= set(schema.MANIFEST_COLUMNS) and set(schema.METADATA) <= set(schema.FIELDS)
    assert set(tfds_builder.features().keys()) == set(schema.FIELDS)
    src = P.data_source(tfds_dir, "train")
    assert len(src) == len(rows)
    by_id = {}
    for i in range(len(src)):
        ex = src[i]
        assert set(ex) == set(schema.FIELDS)
        d = T.Decode(keep_label=True).map(ex)
        assert set(d) == {"image", "label", *schema.DECODED}
        by_id[d["series_id"]] = d
    # Every metadata column arrives as the manifest had it (series_description and role included).
    for r in rows:
        d = by_id[r["series_id"]]
        for k in schema.METADATA:
            assert d[k] == pytest.approx(float(r[k])) if k == "age" else d[k] == r[k], k
    assert set(embed.META) <= set(schema.FIELDS) and {"series_description", "role"} <= set(embed.META)


def test_a_template_is_known_by_its_role_not_its_id(roles_prep):
    from decipher_jax.eval import segtasks

    tfds_dir, _, rows = roles_prep
    _, _, ids, _, _ = segtasks._split_arrays(tfds_dir, "train", (8, 8, 8), lesion_only=False)
    assert "MNI152_T1" in ids  # a lesion series, whatever its name
    assert rows[1]["series_id"] not in ids  # role template: tissue classes, not lesions
    assert sorted(ids) == sorted(r["series_id"] for r in rows if r["role"] != schema.TEMPLATE)


def test_records_without_a_role(monkeypatch):
    """Records of format 1.2 decode without the field; the lesion task, which needs it, says so."""
    from decipher_jax.eval import segtasks

    rec = {f.name: (np.zeros((2, 2, 2), f.dtype) if f.kind == "volume" else np.zeros(f.shape, f.dtype)
                    if f.kind != "text" else b"") for f in schema.RECORD if f.name != "role"}
    rec["has_label"] = np.bool_(True)
    assert set(T.Decode().map(rec)) == {"image"} | set(schema.DECODED) - {"role"}
    monkeypatch.setattr(P, "data_source", lambda d, split: [rec])
    with pytest.raises(ValueError, match="no role field"):
        segtasks._split_arrays("old_prep", "train", (4, 4, 4), lesion_only=False)


def test_an_unknown_role_skips_the_row(tmp_path):
    rows = [{"series_id": s, "study_id": "st", "patient_id": "p", "image": "a.nii.gz", "role": role}
            for s, role in (("A", ""), ("B", "template"), ("C", "atlas"))]
    errors = []
    got = manifest.read(manifest.write(str(tmp_path / "m.csv"), rows), errors)
    assert [(r.series_id, r.role) for r in got] == [("A", ""), ("B", "template")]
    assert [(e.series_id, e.field) for e in errors] == [("C", "role")]
