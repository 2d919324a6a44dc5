"""``decipher embed`` on new files equals the prepared records' embeddings; ``decipher export``
then ``bundle.from_pretrained`` reproduces the run exactly; a damaged bundle fails naming the file."""

import glob
import json
import os

import numpy as np
import pytest

from decipher_jax import bundle, cli, inference, zeroshot

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")
SENTENCES = ["there is an acute infarct", "no acute infarct"]


@pytest.fixture(scope="module")
def run(prepared, minilm_path, tmp_path_factory):
    """A tiny SigLIP stage-2 run on the ``prepared`` corpus (5 mm, matrix 20)."""
    out = str(tmp_path_factory.mktemp("embed_run") / "stage2")
    assert cli.main(["train", "--config", os.path.join(CONFIGS, "clip_align.py") + ":tiny,locktext,siglip",
                     "--workdir", out, f"--config.data.dir={prepared}", "--config.init.vision=",
                     "--config.init.text=minilm", "--config.steps=3", "--config.optim.warmup_steps=1",
                     "--config.eval.before=False", "--config.eval.splits=()", "--config.async_checkpoints=False"]) == 0
    return out


def _raw(prepared):
    """The corpus's NIfTI files (what ``prepared`` was made from), by series id."""
    raw = os.path.normpath(os.path.join(prepared, "..", "..", "..", "..", "raw"))
    return {os.path.basename(p)[: -len(".nii.gz")]: p for p in glob.glob(os.path.join(raw, "*.nii.gz"))
            if not p.endswith("_mask.nii.gz")}


def test_embed_of_new_files_equals_the_prepared_records(run, prepared, tmp_path):
    zs = zeroshot.ZeroShot.from_workdir(run)
    ref = zs.embed_split(prepared, "train")
    raw = _raw(prepared)
    ids = [str(s) for s in ref["series_id"]][:5]
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    out_path = str(tmp_path / "emb.npz")
    assert cli.main(["embed", "--run", run, "--images", *[raw[i] for i in ids], str(bad), "--out", out_path,
                     "--sentences", *SENTENCES, "--quiet"]) == 0
    got = dict(np.load(out_path))
    assert list(got["series_id"]) == ids
    by_id = {str(s): z for s, z in zip(ref["series_id"], ref["image"])}
    np.testing.assert_allclose(got["embedding"], np.stack([by_id[i] for i in ids]), atol=1e-5)
    np.testing.assert_allclose(got["scores"], zs.score(image_embeddings=np.stack([by_id[i] for i in ids]),
                                                       sentences=SENTENCES), atol=1e-5)
    skipped = [json.loads(line) for line in open(out_path + ".skipped.jsonl")]
    assert [s["file"] for s in skipped] == [str(bad)] and "truncated or corrupt" in skipped[0]["reason"]
    assert not glob.glob(str(tmp_path / "*.tmp"))


def test_embed_reads_dicom_folders_through_the_same_chain(run, prepared, tmp_path):
    import nibabel as nib

    from data_prep import dicom

    sid, path = sorted(_raw(prepared).items())[0]
    img = nib.load(path)
    dicom.write_series(np.asarray(img.dataobj, np.float32), img.affine, str(tmp_path / "dcm" / "s1"),
                       patient_id="P9", series_description="AX T2")
    emb = inference.Embedder.from_run(run)
    out = emb.embed([str(tmp_path / "dcm"), path], tokens=True)
    assert list(out["patient_id"]) == ["P9", ""] and list(out["series_description"]) == ["AX T2", ""]  # in order given
    # 16-bit DICOM storage quantises the intensities; the embeddings stay the same direction.
    assert float(out["embedding"][0] @ out["embedding"][1]) > 0.999
    assert out["tokens"].shape[:2] == (2, int(np.prod([s // p for s, p in zip(emb.image_size,
                                                                                 emb.spec["vit"]["patch_size"])])))
    # Sliding windows at the prepared spacing, sent a batch at a time: the renormalised mean of the
    # embeddings of every window, cut by hand from the prepared volume in MONAI's scan order.
    from decipher_jax.eval import seghead
    from decipher_jax.eval.retrieval import normalise

    emb.batch_size = 2
    win = emb.embed([path], window=(8, 8, 8), overlap=0.5)
    vol = seghead.pad_to_window(emb.preprocess(path).astype(np.float32)[None], (8, 8, 8))[0]
    corners = seghead.window_corners(vol.shape[:3], (8, 8, 8), 0.5)
    assert len(corners) > 2
    crops = np.stack([vol[x: x + 8, y: y + 8, z: z + 8] for x, y, z in corners])
    np.testing.assert_allclose(win["embedding"], normalise(emb._run(crops)[0].mean(0, keepdims=True)), atol=1e-5)
    pq = pytest.importorskip("pyarrow.parquet")
    inference.save(out, str(tmp_path / "emb.parquet"))
    table = pq.read_table(str(tmp_path / "emb.parquet"))
    assert table.num_rows == 2 and np.allclose(np.asarray(table["embedding"][0].as_py()), out["embedding"][0])


def test_export_then_from_pretrained_reproduces_the_run(run, prepared, tmp_path):
    out = str(tmp_path / "bundle")
    assert cli.main(["export", "--run", run, "--out", out, "--monai", "--hf"]) == 0
    files = sorted(os.listdir(out))
    assert {"config.json", "image_tower.safetensors", "text_tower.safetensors", "projections.safetensors",
            "preprocessing.json", "tokenizer", "README.md", "monai_vit.safetensors", "hf_bert"} <= set(files)
    card = open(os.path.join(out, "README.md")).read()
    assert "## Training data" in card and "| train |" in card and "## Preprocessing" in card
    paths = list(_raw(prepared).values())[:3]
    a = inference.Embedder.from_run(run).embed(paths, sentences=SENTENCES)
    b = inference.Embedder.from_run(out).embed(paths, sentences=SENTENCES)
    np.testing.assert_array_equal(a["embedding"], b["embedding"])
    np.testing.assert_array_equal(a["scores"], b["scores"])
    zs = zeroshot.ZeroShot.from_workdir(out)  # the bundle serves zero-shot scoring as a run does
    np.testing.assert_allclose(zs.encode_sentences(SENTENCES),
                               zeroshot.ZeroShot.from_workdir(run).encode_sentences(SENTENCES), atol=0)
    # The MONAI and Hugging Face exports load in their own libraries.
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel.from_pretrained(os.path.join(out, "hf_bert"))
    assert hf.config.hidden_size == zs.spec["bert"]["hidden_size"]


def test_export_never_replaces_a_folder_that_is_not_a_bundle(run, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(bundle.BundleError, match="exists and is not a model bundle"):
        bundle.export(run, str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert cli.main(["export", "--run", run, "--out", run]) == 2  # not even the run itself
    assert os.path.exists(os.path.join(run, "run_spec.json"))
    first = bundle.export(run, str(tmp_path / "b"))
    assert bundle.export(run, first) == first and bundle.is_bundle(first)  # an old bundle is replaced


def test_a_damaged_or_newer_bundle_fails_naming_the_file(run, tmp_path):
    out = bundle.export(run, str(tmp_path / "b"))
    weights = os.path.join(out, "image_tower.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(bundle.BundleError, match=r"image_tower\.safetensors: .* bytes, the bundle lists .*truncated"):
        bundle.from_pretrained(out)
    assert cli.main(["embed", "--run", out, "--images", weights, "--out", str(tmp_path / "e.npz")]) == 2
    with open(weights, "wb") as f:  # same size, other bytes
        f.write(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(bundle.BundleError, match=r"image_tower\.safetensors: SHA-256 differs"):
        bundle.from_pretrained(out)
    with open(weights, "wb") as f:
        f.write(data)
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump(cfg | {"format_version": bundle.FORMAT_VERSION + 1}, open(cfg_path, "w"))
    with pytest.raises(bundle.BundleError, match="format version 2 is newer than this decipher_jax reads"):
        bundle.from_pretrained(out)
    json.dump(cfg, open(cfg_path, "w"))
    bundle.from_pretrained(out)  # restored: loads again


def test_sentences_padded_to_their_bucket_embed_as_at_the_full_length(run):
    """encode_sentences pads to the longest query rounded up to 16, not to max_length: the
    attention mask makes the embeddings equal to those at the full length."""
    zs = zeroshot.ZeroShot.from_workdir(run)
    long = ["Restricted diffusion in the left MCA territory consistent with acute infarct, " * 3]
    for sentences in (SENTENCES, long):
        got = zs.encode_sentences(sentences)
        texts = [t.format(s) for s in sentences for t in zeroshot.TEMPLATES]
        enc = zs.tokenizer(texts, max_length=zs.max_length, truncation=True, padding="max_length", return_tensors="np")
        assert enc["attention_mask"].sum(1).max() < zs.max_length or sentences is long
        full = np.asarray(zs._text(zs.params, enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)))
        want = zeroshot.normalise(zeroshot.normalise(full).reshape(len(sentences), len(zeroshot.TEMPLATES), -1).mean(1))
        np.testing.assert_allclose(got, want, atol=2e-5)
