"""BERT: real all-MiniLM-L6-v2 weights give transformers' outputs; export loads into transformers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from decipher_jax.interop import hf_bert
from decipher_jax.models import bert

from helpers import randomise

TEXTS = [
    "FINDINGS: No acute infarct. Small T2/FLAIR hyperintensity in the left frontal white matter.",
    "Impression: normal MRI of the right knee; ACL intact.",
    "Großer Befund? Ünïcode and punctuation — handled!",
]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return hf_bert.from_pretrained(minilm_path), bert.load_tokenizer(minilm_path)


def test_tokenizer_ids_match_transformers_and_wordpiece(minilm_path, minilm):
    from tokenizers import BertWordPieceTokenizer
    from transformers import AutoTokenizer

    _, tok = minilm
    hf = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    # An independent WordPiece built from vocab.txt alone.
    wp = BertWordPieceTokenizer(f"{minilm_path}/vocab.txt", lowercase=True)
    for t in TEXTS:
        ids = tok(t)["input_ids"]
        assert ids == hf(t)["input_ids"] == wp.encode(t).ids
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids[1:-1]


def test_hidden_states_match_transformers(minilm_path, minilm):
    from transformers import BertModel

    model, tok = minilm
    enc = tok(TEXTS, padding=True, return_tensors="np")
    ours = np.asarray(model(jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])))
    ref_model = BertModel.from_pretrained(minilm_path, local_files_only=True).eval()
    with torch.no_grad():
        ref = ref_model(
            torch.from_numpy(enc["input_ids"]), attention_mask=torch.from_numpy(enc["attention_mask"])
        ).last_hidden_state.numpy()
    valid = enc["attention_mask"].astype(bool)
    assert valid.sum() > 40 and not valid.all()  # padding is exercised
    assert np.abs(ours[valid] - ref[valid]).max() <= 1e-4


def test_minilm_reports_missing_mlm_head_only(minilm_path):
    model = bert.Bert(bert.read_config(minilm_path), rngs=nnx.Rngs(0))
    missing = hf_bert.load_into(model, minilm_path)
    assert missing == ["mlm_bias", "mlm_decoder_bias", "mlm_kernel", "mlm_norm/bias", "mlm_norm/scale"]


def test_export_round_trip_through_transformers(tmp_path, rng):
    from transformers import BertForMaskedLM

    cfg = bert.BertConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                          max_position=40)
    ours = randomise(bert.Bert(cfg, rngs=nnx.Rngs(0)), seed=1)
    hf_bert.save_pretrained(ours, str(tmp_path))
    ref = BertForMaskedLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    ids = rng.integers(0, 97, (2, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    h = ours(jnp.asarray(ids), jnp.asarray(mask))
    logits = np.asarray(ours.mlm_logits(h))
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(h)[valid], out.hidden_states[-1].numpy()[valid], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[valid], out.logits.numpy()[valid], atol=1e-4, rtol=0)
    # And back: loading the exported directory restores identical parameters.
    back = hf_bert.from_pretrained(str(tmp_path))
    from decipher_jax.interop.common import flat_arrays

    a, b = flat_arrays(nnx.state(ours)), flat_arrays(nnx.state(back))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bad_checkpoint_directory_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_bert.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "roberta"}')
    with pytest.raises(ValueError, match="not a BERT"):
        hf_bert.from_pretrained(str(tmp_path))
