"""Losses against direct NumPy ports of the reference code (dinov2/loss/*.py, BERT) and hand values."""

import jax.numpy as jnp
import numpy as np
import pytest

from decipher_jax import losses


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _log_softmax(x, axis=-1):
    return x - x.max(axis, keepdims=True) - np.log(np.exp(x - x.max(axis, keepdims=True)).sum(axis, keepdims=True))


def test_dino_loss_matches_reference_pairing(rng):
    b, k, n_loc = 5, 7, 3
    sg, sl, tl = rng.normal(size=(2, b, k)), rng.normal(size=(n_loc, b, k)), rng.normal(size=(2, b, k))
    center = rng.normal(size=(1, k)) * 0.1
    t = _softmax((tl - center) / 0.04)
    # dinov2 ssl_meta_arch: globals vs swapped teacher crops, locals vs both; / (2 + 2 * n_loc) terms.
    terms = [-(t[1 - i] * _log_softmax(sg[i] / 0.1)).sum(-1).mean() for i in range(2)]
    terms += [-(t[j] * _log_softmax(sl[l] / 0.1)).sum(-1).mean() for l in range(n_loc) for j in range(2)]
    ref = sum(terms) / len(terms)
    probs = losses.centered_teacher_probs(jnp.asarray(tl), jnp.asarray(center), 0.04)
    ours = losses.dino_loss(jnp.asarray(sg), jnp.asarray(sl), probs, 0.1)
    assert abs(float(ours) - ref) < 1e-5
    # Hand value: uniform teacher and uniform student give log(K).
    u = jnp.zeros((2, 1, k))
    assert abs(float(losses.dino_loss(u, jnp.zeros((0, 1, k)), jnp.full((2, 1, k), 1 / k))) - np.log(k)) < 1e-6


def test_center_update():
    c = jnp.zeros((1, 3))
    t = jnp.asarray([[[1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0]]])
    np.testing.assert_allclose(np.asarray(losses.update_center(c, t, 0.9)), [[0.2, 0.2, 0.2]], atol=1e-7)
    # Weighted (iBOT: only masked patch slots count): the second row is ignored.
    w = jnp.asarray([[1.0], [0.0]])
    np.testing.assert_allclose(np.asarray(losses.update_center(c, t, 0.9, weights=w)), [[0.1, 0.2, 0.3]], atol=1e-7)


def _sinkhorn_ref(teacher_output, temp, n_iterations=3):
    """dinov2/loss/dino_clstoken_loss.py: sinkhorn_knopp_teacher (one process)."""
    q = np.exp(teacher_output / temp).T
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def test_sinkhorn_matches_reference(rng):
    t = rng.normal(size=(6, 4))
    ours = np.asarray(losses.sinkhorn_knopp(jnp.asarray(t), 0.5))
    np.testing.assert_allclose(ours, _sinkhorn_ref(t, 0.5), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-5)  # each sample is an assignment
    # Padding rows (valid=0) take no mass and leave the real rows' targets unchanged.
    padded = np.concatenate([t, rng.normal(size=(3, 4)) * 5])
    valid = np.r_[np.ones(6), np.zeros(3)]
    out = np.asarray(losses.sinkhorn_knopp(jnp.asarray(padded), 0.5, valid=jnp.asarray(valid)))
    np.testing.assert_allclose(out[:6], ours, rtol=1e-4, atol=1e-6)
    assert np.abs(out[6:]).max() < 1e-6


def test_ibot_loss_weights_per_image_and_divides_by_all_images(rng):
    m, p, k = 4, 6, 5
    s, t = rng.normal(size=(m, p, k)), _softmax(rng.normal(size=(m, p, k)))
    w = np.zeros((m, p))
    w[0, :2] = 1
    w[2, :5] = 1  # images 1 and 3 are unmasked but still count in the denominator
    ce = -(t * _log_softmax(s / 0.1)).sum(-1)
    ref = ((ce * w).sum(1) / np.maximum(w.sum(1), 1)).sum() / m
    assert abs(float(losses.ibot_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), 0.1)) - ref) < 1e-5


def test_koleo_hand_value():
    # Three unit vectors: e1, e2 and (e1 + e2)/sqrt2. Nearest-neighbour distances:
    # e1 <-> diag: sqrt(2 - sqrt2), e2 <-> diag: same, diag <-> e1: same.
    x = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    d = np.sqrt(2 - np.sqrt(2))
    assert abs(float(losses.koleo_loss(x)) + np.log(d)) < 1e-5
    # Scale invariance (L2-normalised inside) and the reference's eps handling.
    assert abs(float(losses.koleo_loss(x * 7.0)) - float(losses.koleo_loss(x))) < 1e-6


def test_mlm_loss_and_accuracy(rng):
    logits = rng.normal(size=(2, 5, 11))
    labels = np.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 3, 7, int(np.argmax(logits[1, 4]))
    ls = _log_softmax(logits)
    ref = -(ls[0, 1, 3] + ls[1, 3, 7] + ls[1, 4, labels[1, 4]]) / 3
    loss, acc = losses.mlm_loss(jnp.asarray(logits), jnp.asarray(labels))
    assert abs(float(loss) - ref) < 1e-5
    expect_acc = np.mean([np.argmax(logits[0, 1]) == 3, np.argmax(logits[1, 3]) == 7, True])
    assert abs(float(acc) - expect_acc) < 1e-6


@pytest.mark.parametrize("k", [4, 1000])
def test_entropy(k):
    assert abs(float(losses.entropy(jnp.full((3, k), 1.0 / k))) - np.log(k)) < 1e-4
