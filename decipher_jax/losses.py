"""Losses as pure functions: DINO, iBOT, KoLeo, Sinkhorn-Knopp, MLM (stage 1); CLIP, SigLIP and
embedding regression (stage 2).

Formulas follow facebookresearch/dinov2 (``dinov2/loss/*.py``), google-research/bert,
mlfoundations/open_clip (``loss.py``) and google-research/big_vision (SigLIP).
Arrays are global (sharded) ``jax.Array``s under jit: means and sums over the batch axis
are over the *global* batch, which is what DINOv2 achieves with all-reduces.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def centered_teacher_probs(teacher_logits, center, temp):
    """softmax((t - c) / temp), in float32 (DINO centering mode)."""
    return jax.nn.softmax((teacher_logits.astype(jnp.float32) - center) / temp, axis=-1)


def update_center(center, teacher_logits, momentum: float = 0.9, weights=None):
    """c <- m c + (1 - m) mean(teacher logits over every global crop of the global batch).

    ``weights`` (teacher_logits.shape[:-1]) restricts the mean, e.g. to the masked patch slots
    of a fixed-size iBOT buffer.
    """
    flat = teacher_logits.reshape(-1, teacher_logits.shape[-1]).astype(jnp.float32)
    if weights is None:
        mean = flat.mean(axis=0, keepdims=True)
    else:
        w = weights.reshape(-1, 1).astype(jnp.float32)
        mean = (flat * w).sum(0, keepdims=True) / jnp.maximum(w.sum(), 1.0)
    return center * momentum + mean * (1.0 - momentum)


def sinkhorn_knopp(teacher_logits, temp, n_iterations: int = 3, valid=None):
    """Sinkhorn-Knopp normalised teacher targets over the global batch (float32).

    ``teacher_logits``: (B, K). ``valid``: optional (B,) weights (1 = real row), so padded
    rows (e.g. unmasked slots of a fixed-size iBOT buffer) do not take mass.
    """
    t = teacher_logits.astype(jnp.float32)
    w = jnp.ones(t.shape[0], jnp.float32) if valid is None else valid.astype(jnp.float32)
    q = jnp.exp((t - jax.lax.stop_gradient(t.max())) / temp) * w[:, None]  # (B, K)
    b = w.sum()
    k = t.shape[1]
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(axis=0, keepdims=True) / k  # prototypes: equal mass
        q = q / jnp.maximum(q.sum(axis=1, keepdims=True), 1e-30) * w[:, None] / b  # samples: equal mass
    return q * b


def cross_entropy(teacher_probs, student_logits, student_temp):
    """-sum_k t_k log softmax(s / temp)_k, per row."""
    lsm = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    return -jnp.sum(teacher_probs * lsm, axis=-1)


def dino_loss(student_global, student_local, teacher_probs, student_temp: float = 0.1):
    """DINO CLS loss over crop pairs.

    student_global: (2, B, K); student_local: (L, B, K) (L may be 0); teacher_probs: (2, B, K).
    Global crop i is paired with teacher crop 1 - i (no same-view term); each local crop with
    both teacher crops; the mean over the 2 + 2L pair terms of the batch-mean cross-entropy.
    """
    terms = [cross_entropy(teacher_probs[1 - i], student_global[i], student_temp).mean() for i in range(2)]
    for l in range(student_local.shape[0]):
        terms += [cross_entropy(teacher_probs[j], student_local[l], student_temp).mean() for j in range(2)]
    return sum(terms) / len(terms)


def ibot_loss(student_patch, teacher_probs, mask_weights, student_temp: float = 0.1):
    """iBOT masked-token loss.

    student_patch, teacher_probs: (M, P, K) for M global-crop images and P selected patch
    slots; mask_weights: (M, P), 1 at masked patches, 0 elsewhere. Per image the masked
    cross-entropies are averaged (weight 1 / #masked), then summed and divided by M (every
    global-crop image counts, masked or not), as in DINOv2.
    """
    ce = cross_entropy(teacher_probs, student_patch, student_temp)  # (M, P)
    w = mask_weights.astype(jnp.float32)
    per_image = jnp.sum(ce * w, axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
    return per_image.sum() / mask_weights.shape[0]


def koleo_loss(x, eps: float = 1e-8):
    """Kozachenko-Leonenko entropy estimator: -mean log(distance to nearest neighbour).

    x: (B, D), L2-normalised inside. (DINOv2 applies it per device batch; we use the batch
    given, which under jit is the global batch: neighbours come from more samples.)
    """
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -2.0, dots)
    nn = jnp.argmax(dots, axis=1)
    d = jnp.linalg.norm(x - x[nn] + eps, axis=-1)  # torch.pairwise_distance adds eps to the difference
    return -jnp.mean(jnp.log(d + eps))


def mlm_loss(logits, labels):
    """Masked-LM cross-entropy averaged over prediction slots (labels >= 0)."""
    valid = labels >= 0
    ll = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ll = jnp.take_along_axis(ll, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    loss = -jnp.sum(jnp.where(valid, ll, 0.0)) / jnp.maximum(valid.sum(), 1)
    acc = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == labels, False)) / jnp.maximum(valid.sum(), 1)
    return loss, acc


def entropy(probs):
    """Mean entropy (nats) of rows of a probability matrix."""
    return -jnp.mean(jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-12)), axis=-1))


# -- stage 2: image-text alignment ------------------------------------------------------------

LOG_MAX_SCALE = math.log(100.0)  # open_clip clamps the learnt temperature at 100 (no jnp at import: that would
# initialise the backend before jax.distributed.initialize)


def positives(ids_a, ids_b=None):
    """(B, B') bool matrix of positive pairs: same text id (stage 2's ``pair_id_hash``). Series
    that share a text (a study's series, paired with its report alone) are all positives, so
    one batch can hold several positives per row."""
    ids_b = ids_a if ids_b is None else ids_b
    return ids_a[:, None] == ids_b[None, :]


def pair_logits(z_img, z_txt, log_scale, bias=None, max_log_scale: float | None = LOG_MAX_SCALE):
    """``exp(log_scale) * z_img @ z_txt.T (+ bias)`` in float32 over the global batch.

    Under jit with batch-sharded inputs this is the all-gather of the text embeddings that
    open_clip's ``gather_with_grad`` / big_vision do by hand: negatives span the whole mesh.
    """
    return scaled_logits(z_img.astype(jnp.float32) @ z_txt.astype(jnp.float32).T, log_scale, bias, max_log_scale)


def scaled_logits(sim, log_scale, bias=None, max_log_scale: float | None = LOG_MAX_SCALE):
    """``exp(log_scale) * sim (+ bias)``: cosines ``sim`` to logits, the scale clamped at
    ``exp(max_log_scale)`` (``None``: unclamped)."""
    if max_log_scale is not None:
        log_scale = jnp.minimum(log_scale, max_log_scale)
    logits = jnp.exp(log_scale) * sim.astype(jnp.float32)
    return logits if bias is None else logits + bias


def clip_loss(z_img, z_txt, log_scale, pos=None):
    """Symmetric InfoNCE (CLIP). ``z_*``: (B, D) L2-normalised; ``pos``: (B, B) positives.

    With the identity for ``pos`` this is open_clip's ``ClipLoss``. With several positives per
    row (series of one study sharing a report) the target is uniform over the positives, so a
    duplicate report is never pushed away as a negative (a one-hot diagonal would ask image i
    to prefer its own copy of a text over an identical copy at j, which is unsatisfiable). The
    loss is the KL divergence to that target (cross-entropy minus the target's entropy): the
    same gradients, and 0 at the optimum whatever the number of positives.
    """
    logits = pair_logits(z_img, z_txt, log_scale)
    b = logits.shape[0]
    pos = jnp.eye(b, dtype=bool) if pos is None else pos
    pos = pos.astype(jnp.float32)

    def ce(lg, p):
        n = p.sum(1, keepdims=True)
        return (-(p / n * jax.nn.log_softmax(lg, axis=1)).sum(1) - jnp.log(n[:, 0])).mean()

    return (ce(logits, pos) + ce(logits.T, pos.T)) / 2


def siglip_loss(z_img, z_txt, log_scale, bias, pos=None):
    """Sigmoid loss (big_vision siglip.py): labels +1 for positives, -1 otherwise;
    ``-sum_ij log sigmoid(label_ij * logit_ij) / B`` (normalised by the batch, not B^2)."""
    logits = pair_logits(z_img, z_txt, log_scale, bias, max_log_scale=None)
    b = logits.shape[0]
    pos = jnp.eye(b, dtype=bool) if pos is None else pos
    labels = 2.0 * pos.astype(jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / b


def regression_loss(pred, target, kind: str = "mse"):
    """NeuroBERT-style: the image embedding regresses its report's (frozen) text embedding.

    ``mse``: mean over batch and dimensions of the squared error; ``cosine``: mean(1 - cos).
    """
    pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
    if kind == "mse":
        return jnp.mean(jnp.square(pred - target))
    if kind == "cosine":
        cos = jnp.sum(pred * target, -1) / jnp.maximum(
            jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1), 1e-8)
        return jnp.mean(1.0 - cos)
    raise ValueError(f"unknown regression loss {kind!r} (mse or cosine)")


# -- multi-parametric MRI (BrainMVP) -------------------------------------------------------------

def masked_mse(pred, target, weights):
    """``sum(w * (pred - target)^2) / sum(w)`` in float32 (0 when nothing is weighted): the
    reconstruction error over the masked voxels only. ``weights`` broadcasts against ``pred``."""
    w = jnp.broadcast_to(weights.astype(jnp.float32), pred.shape)
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.sum(w * err) / jnp.maximum(jnp.sum(w), 1e-12)


def info_nce(z_a, z_b, temperature: float, valid=None):
    """Symmetric InfoNCE between two views: row i of ``z_a`` and row i of ``z_b`` (L2-normalised,
    (B, D)) are the positives, every other row of the *global* batch a negative (under jit with
    batch-sharded inputs the similarity matrix spans the mesh: BrainMVP's negatives were the 3
    cases on one GPU). ``logits = z_a @ z_b.T / temperature``; the loss is the mean of the two
    directions' cross-entropies. ``valid`` (B,) drops rows from both the anchors and the
    negatives (padding)."""
    logits = (z_a.astype(jnp.float32) @ z_b.astype(jnp.float32).T) / temperature
    b = logits.shape[0]
    v = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
    logits = jnp.where(v[None, :] & v[:, None] | jnp.eye(b, dtype=bool), logits, -1e9)
    diag = jnp.diagonal(logits)
    w = v.astype(jnp.float32)
    ce_a = jax.nn.logsumexp(logits, axis=1) - diag
    ce_b = jax.nn.logsumexp(logits, axis=0) - diag
    return jnp.sum(w * (ce_a + ce_b)) / (2 * jnp.maximum(jnp.sum(w), 1.0))
