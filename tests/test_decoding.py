"""Decoding under jit: greedy equals transformers' greedy generate; the KV cache changes nothing
(greedy, beam, sampling); one beam is greedy; nucleus filtering against NumPy; sharded equals one
device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from decipher_jax import decoding, sharding as sh
from decipher_jax.interop import hf_decoder
from decipher_jax.models import decoder as D

from helpers import randomise, randomise_torch

VOCAB, EOS = 61, 7


def _model(family="llama", seed=2):
    c = D.DecoderConfig(family=family, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2 if family == "llama" else None, intermediate_size=48, max_position=48)
    return randomise(D.Decoder(c, rngs=nnx.Rngs(0)), seed=seed, scale=0.3)


def _prompt(model, rng, b=3, p=6):
    ids = rng.integers(8, VOCAB, (b, p))
    valid = np.ones((b, p), bool)
    valid[1, :3] = False  # left padding
    return ids, valid, model.embed(jnp.asarray(ids))


def test_greedy_equals_transformers_generate(tmp_path, rng):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_positions=48)).eval()
    randomise_torch(ref, seed=4, scale=0.3)
    ref.save_pretrained(str(tmp_path))
    ours = hf_decoder.from_pretrained(str(tmp_path))
    ids, valid, x = _prompt(ours, rng)
    out = decoding.generate(ours, x, valid, max_new_tokens=10, eos_id=EOS, pad_id=0)
    with torch.no_grad():
        hf = ref.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(valid.astype(np.int64)),
                          max_new_tokens=10, do_sample=False, eos_token_id=EOS, pad_token_id=0).numpy()[:, ids.shape[1]:]
    hf = np.pad(hf, ((0, 0), (0, 10 - hf.shape[1])))  # generate stops when every row is done
    np.testing.assert_array_equal(np.asarray(out["tokens"]), hf)
    assert len({tuple(r) for r in hf}) == 3  # the rows differ: the prompts reach the tokens


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_cache_changes_nothing(rng, method):
    model = _model()
    _, valid, x = _prompt(model, rng)
    kw = dict(max_new_tokens=9, eos_id=EOS, method=method, num_beams=3, temperature=0.8, top_p=0.9,
              key=jax.random.key(5), length_penalty=0.6)
    a = decoding.generate(model, x, valid, use_cache=True, **kw)
    b = decoding.generate(model, x, valid, use_cache=False, **kw)
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    np.testing.assert_array_equal(np.asarray(a["lengths"]), np.asarray(b["lengths"]))
    np.testing.assert_allclose(np.asarray(a["scores"]), np.asarray(b["scores"]), atol=1e-4)


def test_beam_of_one_is_greedy_and_beams_score_at_least_as_well(rng):
    model = _model(seed=7)
    _, valid, x = _prompt(model, rng)
    greedy = decoding.generate(model, x, valid, max_new_tokens=8, eos_id=EOS)
    one = decoding.generate(model, x, valid, max_new_tokens=8, eos_id=EOS, method="beam", num_beams=1,
                            length_penalty=0.0)
    np.testing.assert_array_equal(np.asarray(one["tokens"]), np.asarray(greedy["tokens"]))
    np.testing.assert_allclose(np.asarray(one["scores"]), np.asarray(greedy["scores"]), atol=1e-4)
    # The returned score is the chosen tokens' own log-probability under the model.
    tokens = np.asarray(one["tokens"])
    full = jnp.concatenate([x, model.embed(jnp.asarray(tokens))], 1)
    v = np.concatenate([valid, np.ones_like(tokens, bool)], 1)
    logp = jax.nn.log_softmax(model(full, valid=jnp.asarray(v))[0], -1)[:, x.shape[1] - 1:-1]
    lengths = np.asarray(one["lengths"])
    chosen = np.take_along_axis(np.asarray(logp), tokens[..., None], -1)[..., 0]
    by_hand = [chosen[i, :lengths[i]].sum() for i in range(len(tokens))]
    np.testing.assert_allclose(np.asarray(one["scores"]), by_hand, atol=1e-4)
    wide = decoding.generate(model, x, valid, max_new_tokens=8, eos_id=EOS, method="beam", num_beams=6,
                             length_penalty=0.0)
    assert (np.asarray(wide["scores"]) >= np.asarray(greedy["scores"]) - 1e-4).all()


def test_tokens_after_eos_are_pad(rng):
    model = _model(seed=3)
    _, valid, x = _prompt(model, rng)
    first = np.asarray(decoding.generate(model, x, valid, max_new_tokens=3, eos_id=EOS)["tokens"])
    eos = int(first[0, 1])  # a token row 0 emits second: make it the end token
    out = decoding.generate(model, x, valid, max_new_tokens=6, eos_id=eos, pad_id=0)
    t = np.asarray(out["tokens"])
    assert int(out["lengths"][0]) == 2 and (t[0, 2:] == 0).all() and t[0, 1] == eos


def test_top_p_filter_against_numpy(rng):
    logits = rng.standard_normal((4, 23)).astype(np.float32) * 2
    for p in (0.05, 0.5, 0.9, 0.999):
        got = np.isfinite(np.asarray(decoding.top_p_filter(jnp.asarray(logits), p)))
        for row, keep in zip(logits, got):
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            order = np.argsort(-probs)
            n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest prefix reaching p
            assert set(np.flatnonzero(keep)) == set(order[:n]), p
    # A tiny nucleus is greedy, whatever the key.
    model = _model()
    _, valid, x = _prompt(model, rng)
    s = decoding.generate(model, x, valid, max_new_tokens=6, eos_id=EOS, method="sample", top_p=1e-6,
                          key=jax.random.key(9))
    g = decoding.generate(model, x, valid, max_new_tokens=6, eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(s["tokens"]), np.asarray(g["tokens"]))


def test_sharded_generation_equals_one_device(rng):
    model = _model(seed=11)
    ids = rng.integers(8, VOCAB, (4, 6))
    valid = np.ones((4, 6), bool)
    valid[2, :2] = False
    x = model.embed(jnp.asarray(ids))
    ref = decoding.generate(model, x, valid, max_new_tokens=7, eos_id=EOS, method="beam", num_beams=2)
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    state, _ = sh.shard_state(state, mesh)
    sharded = nnx.merge(graphdef, state)
    assert len(sharded.q_kernel[...].sharding.device_set) == 8
    with jax.set_mesh(mesh):
        b = sh.shard_batch({"x": np.asarray(x), "v": valid}, mesh)
        assert len(b["x"].sharding.device_set) == 8
        out = decoding.generate(sharded, b["x"], b["v"], max_new_tokens=7, eos_id=EOS, method="beam", num_beams=2)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(ref["tokens"]))
    np.testing.assert_allclose(np.asarray(out["scores"]), np.asarray(ref["scores"]), atol=1e-4)


def test_bad_prompts_are_refused(rng):
    model = _model()
    _, valid, x = _prompt(model, rng)
    valid[0, -1] = False
    with pytest.raises(ValueError, match="pad prompts on the left"):
        decoding.generate(model, x, valid, max_new_tokens=2, eos_id=EOS)
    with pytest.raises(ValueError, match="PRNG key"):
        decoding.generate(model, x, None, max_new_tokens=2, eos_id=EOS, method="sample")


def test_sharded_training_step_equals_one_device(rng):
    """The decoder's loss and gradients on a data x fsdp x tensor = 2 x 2 x 2 mesh equal one device's."""
    model = _model(seed=13)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(rng.integers(0, VOCAB, (4, 10)))

    def loss(s, ids):
        lm = nnx.merge(graphdef, s)
        logits, _ = lm(lm.embed(ids[:, :-1]))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(state, ids)
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, shardings = sh.shard_state(state, mesh)
    with jax.set_mesh(mesh):
        b = sh.shard_batch({"ids": np.asarray(ids)}, mesh)
        got_loss, got_grads = jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings))(sharded, b["ids"])
    assert got_grads["o_kernel"][...].sharding.spec == shardings["o_kernel"].get_value().spec
    assert len(got_grads["o_kernel"][...].sharding.device_set) == 8
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-6)
    for (p, a), (_, g) in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree_util.tree_leaves_with_path(got_grads)):
        # Reductions split over 8 devices sum in another order: 1e-5 of gradients of order 0.1.
        np.testing.assert_allclose(np.asarray(g), np.asarray(a), rtol=1e-5, atol=1e-5, err_msg=str(p))
