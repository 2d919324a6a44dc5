"""The decoder LM: Hugging Face GPT-2 and Llama checkpoints give transformers' logits; the KV cache
gives what the full forward gives; export reads back into transformers; sharded equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from decipher_jax.interop import hf_decoder
from decipher_jax.models import decoder as D

from helpers import randomise, randomise_torch

VOCAB = 101


def _gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_positions=48)).eval()
    randomise_torch(m, seed=1, scale=0.1)
    m.save_pretrained(str(tmp_path))
    return m


def _llama(tmp_path, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
               rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    cfg.update(kw)
    m = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    randomise_torch(m, seed=1, scale=0.1)
    m.save_pretrained(str(tmp_path))
    return m


def _hf_logits(m, ids, mask):
    with torch.no_grad():
        # transformers derives positions from the attention mask only in generate(); pass them.
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        return m(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(pos)).logits.numpy()


def _ours_logits(model, ids, mask):
    logits, _ = model(model.embed(jnp.asarray(ids)), valid=jnp.asarray(mask))
    return np.asarray(logits)


def _batch(rng, t=13):
    ids = rng.integers(0, VOCAB, (3, t))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama3_tied"])
def test_logits_match_transformers(tmp_path, rng, family):
    if family == "gpt2":
        ref = _gpt2(tmp_path)
    elif family == "llama":
        ref = _llama(tmp_path)
    else:  # Llama 3.2's layout: tied head, llama3 rope scaling, explicit head_dim
        ref = _llama(tmp_path, tie_word_embeddings=True, head_dim=8, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    ours = hf_decoder.from_pretrained(str(tmp_path))
    assert ours.config.family == ("gpt2" if family == "gpt2" else "llama")
    ids, mask = _batch(rng)
    a, b = _ours_logits(ours, ids, mask), _hf_logits(ref, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(b[valid]).max() > 0.5  # not a degenerate model
    np.testing.assert_allclose(a[valid], b[valid], atol=1e-4, rtol=0)


def test_left_padding_does_not_change_a_row(tmp_path, rng):
    _llama(tmp_path)
    ours = hf_decoder.from_pretrained(str(tmp_path))
    ids, mask = _batch(rng)
    full = _ours_logits(ours, ids[1:2, 4:], mask[1:2, 4:])
    padded = _ours_logits(ours, ids, mask)[1:2, 4:]
    np.testing.assert_allclose(padded, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_round_trip_through_transformers(tmp_path, rng, family):
    from transformers import AutoModelForCausalLM

    c = D.DecoderConfig(family=family, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2 if family == "llama" else None, intermediate_size=48, max_position=32,
                        tie_embeddings=family == "gpt2")
    ours = randomise(D.Decoder(c, rngs=nnx.Rngs(0)), seed=3, scale=0.1)
    hf_decoder.save_pretrained(ours, str(tmp_path))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    ids, mask = _batch(rng, t=9)
    mask[2, 7:] = 0
    valid = mask.astype(bool)
    np.testing.assert_allclose(_ours_logits(ours, ids, mask)[valid], _hf_logits(ref, ids, mask)[valid], atol=1e-4, rtol=0)
    back = hf_decoder.from_pretrained(str(tmp_path))
    for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(ours)),
                              jax.tree_util.tree_leaves_with_path(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scan", [False, True])
def test_cache_equals_full_forward(rng, family, scan):
    c = D.DecoderConfig(family=family, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2 if family == "llama" else None, intermediate_size=48, max_position=40, scan=scan)
    model = randomise(D.Decoder(c, rngs=nnx.Rngs(0)), seed=2, scale=0.1)
    ids, mask = _batch(rng, t=12)
    mask[2, 9:] = 1  # generation continues every row: padding only on the left
    full = _ours_logits(model, ids, mask)
    # A prompt of 5 slots, then one token at a time, then a chunk of 3.
    cache = D.init_cache(c, 3, 16)
    x = model.embed(jnp.asarray(ids))
    v = jnp.asarray(mask)
    out = []
    for lo, hi in [(0, 5)] + [(i, i + 1) for i in range(5, 9)] + [(9, 12)]:
        logits, cache = model(x[:, lo:hi], valid=v[:, lo:hi], cache=cache)
        out.append(np.asarray(logits))
    stepped = np.concatenate(out, 1)
    assert int(cache["index"]) == 12 and list(np.asarray(cache["length"])) == list(mask.sum(1))
    valid = mask.astype(bool)
    np.testing.assert_allclose(stepped[valid], full[valid], atol=2e-5, rtol=0)


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="model_type"):
        hf_decoder.config_from_hf({"model_type": "mistral"})
    with pytest.raises(ValueError, match="rope type"):
        hf_decoder.config_from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "intermediate_size": 8,
                                   "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        D.DecoderConfig(family="llama", hidden_size=24, num_heads=3, num_kv_heads=2)


def test_lora_starts_as_the_base_model_and_merges_exactly(tmp_path, rng):
    import dataclasses

    _llama(tmp_path)
    base = hf_decoder.from_pretrained(str(tmp_path))
    lora = hf_decoder.from_pretrained(str(tmp_path), lora_rank=4, lora_targets=("q", "v", "o", "down", "gate"))
    ids, mask = _batch(rng)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(_ours_logits(lora, ids, mask)[valid], _ours_logits(base, ids, mask)[valid])
    # Trained adapters (random A and B): the forward equals the merged kernels' model.
    state = nnx.state(lora)
    r = np.random.default_rng(5)
    nnx.update(lora, jax.tree_util.tree_map_with_path(
        lambda p, v: v.replace(jnp.asarray(r.standard_normal(v.get_value().shape) * 0.05, jnp.float32))
        if "_lora_" in str(p) else v, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    merged = D.merge_lora(lora)
    assert merged.config == dataclasses.replace(lora.config, lora_rank=0)
    a, m = _ours_logits(lora, ids, mask)[valid], _ours_logits(merged, ids, mask)[valid]
    np.testing.assert_allclose(a, m, atol=2e-5, rtol=0)
    assert np.abs(a - _ours_logits(base, ids, mask)[valid]).max() > 1e-2  # the adapters do something
    with pytest.raises(ValueError, match="merge the LoRA"):
        hf_decoder.save_pretrained(lora, str(tmp_path / "x"))
    hf_decoder.save_pretrained(merged, str(tmp_path / "merged"))  # exportable once merged


def test_lora_training_moves_only_the_adapters(rng):
    import ml_collections as mlc
    import optax

    from decipher_jax import optim
    from decipher_jax.state import merge_pure

    c = D.DecoderConfig(family="llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=48, lora_rank=2)
    model = D.Decoder(c, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    oc = mlc.ConfigDict(dict(lr=1e-2, warmup_steps=1, total_steps=10, weight_decay=0.1,
                             lr_rules=[("(?!.*_lora_).*", None)]))
    tx = optim.build(oc, params)
    opt = tx.init(params)
    # Optimiser state only for the adapters (two moments each), none for the frozen base weights.
    n_state = sum(x.size for x in jax.tree.leaves(opt) if x.ndim)
    n_lora = sum(v.size for k, v in params.items() if "_lora_" in k)
    assert n_state == 2 * n_lora
    ids = jnp.asarray(rng.integers(0, VOCAB, (2, 9)))

    def loss(p):
        lm = merge_pure(graphdef, state, p)
        logits, _ = lm(lm.embed(ids[:, :-1]))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    new = params
    for _ in range(3):
        g = jax.grad(loss)(new)
        upd, opt = tx.update(g, opt, new)
        new = optax.apply_updates(new, upd)
    for k in params:
        if "_lora_" in k:
            assert not np.array_equal(np.asarray(new[k]), np.asarray(params[k])), k
        else:
            np.testing.assert_array_equal(np.asarray(new[k]), np.asarray(params[k]), err_msg=k)
    assert float(loss(new)) < float(loss(params))
