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


# -- stage 2 ------------------------------------------------------------------------------------

def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_clip_loss_matches_open_clip(rng):
    zi, zt = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 5)))
    log_t = np.log(1 / 0.07)
    lg = np.exp(log_t) * zi @ zt.T  # open_clip ClipLoss: CE(logits, arange) both ways, averaged
    ref = (-np.diag(_log_softmax(lg, 1)).mean() - np.diag(_log_softmax(lg.T, 1)).mean()) / 2
    assert float(losses.clip_loss(jnp.asarray(zi), jnp.asarray(zt), log_t)) == pytest.approx(ref, rel=1e-5)
    # The temperature is clamped at 100 (open_clip), so a log-scale of 10 acts as ln 100.
    hi = losses.clip_loss(jnp.asarray(zi), jnp.asarray(zt), 10.0)
    assert float(hi) == pytest.approx(float(losses.clip_loss(jnp.asarray(zi), jnp.asarray(zt), np.log(100.0))), rel=1e-6)


def test_clip_loss_multiple_positives(rng):
    # Rows 0, 1 and 2 are series of one study: their reports are one text.
    study = np.array([7, 7, 7, 3, 5, 9])
    zt = _unit(rng.normal(size=(6, 4)))
    zt[1] = zt[2] = zt[0]
    zi = _unit(rng.normal(size=(6, 4)))
    pos = study[:, None] == study[None, :]
    lg = 20.0 * zi @ zt.T
    t = pos / pos.sum(1, keepdims=True)  # uniform target over the positives; KL to it

    def kl(lg, t):
        return (t * (np.log(np.where(t > 0, t, 1)) - _log_softmax(lg, 1))).sum(1).mean()

    ref = (kl(lg, t) + kl(lg.T, pos.T / pos.T.sum(1, keepdims=True))) / 2
    ours = losses.clip_loss(jnp.asarray(zi), jnp.asarray(zt), np.log(20.0), jnp.asarray(pos))
    assert float(ours) == pytest.approx(ref, rel=1e-5)
    # Perfect alignment (each series equals its report) is an optimum with several positives:
    # the loss goes to 0, while one-hot diagonal targets cannot (the duplicates tie).
    aligned = jnp.asarray(zt)
    multi = float(losses.clip_loss(aligned, aligned, np.log(100.0), jnp.asarray(pos)))
    onehot = float(losses.clip_loss(aligned, aligned, np.log(100.0)))
    assert multi < 1e-3 and onehot > 0.5  # 3 of 6 rows tie three ways: (3 ln 3) / 6 = 0.55


def test_siglip_loss_matches_big_vision(rng):
    zi, zt = _unit(rng.normal(size=(5, 3))), _unit(rng.normal(size=(5, 3)))
    t, b = np.log(10.0), -10.0
    lg = np.exp(t) * zi @ zt.T + b
    labels = 2 * np.eye(5) - 1  # big_vision siglip.py
    ref = -np.sum(-np.log1p(np.exp(-labels * lg))) / 5
    assert float(losses.siglip_loss(jnp.asarray(zi), jnp.asarray(zt), t, b)) == pytest.approx(ref, rel=1e-5)
    pos = np.eye(5, dtype=bool)
    pos[0, 1] = pos[1, 0] = True
    labels = 2 * pos - 1.0
    ref = -np.sum(-np.log1p(np.exp(-labels * lg))) / 5
    assert float(losses.siglip_loss(jnp.asarray(zi), jnp.asarray(zt), t, b, jnp.asarray(pos))) == pytest.approx(ref, rel=1e-5)


def test_regression_loss_hand_values():
    p, t = jnp.asarray([[1.0, 2.0], [0.0, 0.0]]), jnp.asarray([[1.0, 0.0], [1.0, 1.0]])
    assert float(losses.regression_loss(p, t, "mse")) == pytest.approx((0 + 4 + 1 + 1) / 4)
    a, b = jnp.asarray([[1.0, 0.0], [0.0, 2.0]]), jnp.asarray([[2.0, 0.0], [1.0, 0.0]])
    assert float(losses.regression_loss(a, b, "cosine")) == pytest.approx((0.0 + 1.0) / 2)
    with pytest.raises(ValueError, match="unknown regression loss"):
        losses.regression_loss(a, b, "l1")
