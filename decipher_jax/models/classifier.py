"""The fine-tuned classifier: a 3D ViT with a linear head on its pooled features."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decipher_jax.models.layers import param, trunc_normal, zeros
from decipher_jax.models.vit3d import ViT3D, ViTConfig, grid_neighbours

POOLS = ("cls", "mean", "max", "anomaly")
DEFAULT_POOL = ("cls", "mean", "max")


def pool_features(out: dict, pool: Sequence[str], anomaly: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """The ViT's output pooled by each name of ``pool`` and concatenated, in float32: ``cls`` (the
    CLS token, or the mean patch token without one), ``mean`` / ``max`` (the patch tokens' mean /
    channel-wise max), ``anomaly`` (``anomaly(patch tokens)``: :meth:`Classifier.anomaly_pool`).
    The max is the multiple-instance readout: a finding in a few of the patches moves it by as
    much as in all of them, where the mean divides it by the token count (BENCHMARKS.md, "The
    ViT's readout")."""
    feats = {"cls": lambda: out["cls"], "mean": lambda: out["patch"].mean(axis=1),
             "max": lambda: token_max(out["patch"]), "anomaly": lambda: anomaly(out["patch"])}
    if "anomaly" in pool and anomaly is None:
        raise ValueError("pool 'anomaly': the classifier needs its normal bank (bank_size > 0)")
    return jnp.concatenate([feats[p]().astype(jnp.float32) for p in pool], axis=-1)


def nearest_normal_distance(tokens, group, patient, bank, bank_group, bank_patient, near, *,
                            chunk: int = 16) -> jax.Array:
    """``(B, N)``: each patch token's cosine distance to the nearest bank token of its series'
    group at most one grid step away (``near`` ``(N, N)``), as
    :func:`decipher_jax.eval.localisation.nearest_normal` on the host: a group (``group`` ``(B,)``
    int, -1 = none) with fewer than two bank series uses the whole bank; the series' own patient's
    bank series (``patient`` ``(B,)`` int, -1 = unknown) are left out, and a series left with no
    series of its group uses the rest of the bank. ``tokens`` ``(B, N, D)``, ``bank`` ``(K, N,
    D)``. Memory: a ``(B, N, chunk, N)`` similarity at a time (``lax.map`` over the bank,
    ``chunk`` series per step), and the ``(B, N, K)`` nearest similarities."""
    unit = lambda t: t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-8)  # noqa: E731
    t, b = unit(tokens.astype(jnp.float32)), unit(bank.astype(jnp.float32))

    def nearest(bk):  # one bank series (N, D) -> (B, N): the best match within reach
        sim = jnp.einsum("bpd,qd->bpq", t, bk)
        return jnp.where(near[None], sim, -jnp.inf).max(-1)

    sim = jnp.moveaxis(jax.lax.map(nearest, b, batch_size=min(int(chunk), b.shape[0])), 0, -1)  # (B, N, K)
    in_g = bank_group[None] == group[:, None]  # (B, K)
    in_g = jnp.where(in_g.sum(1, keepdims=True) >= 2, in_g, True)
    ok = ~((bank_patient[None] == patient[:, None]) & (patient[:, None] >= 0))
    allowed = in_g & ok
    allowed = jnp.where(allowed.any(1, keepdims=True), allowed, ok)
    allowed = jnp.where(allowed.any(1, keepdims=True), allowed, True)
    return 1.0 - jnp.where(allowed[:, None, :], sim, -jnp.inf).max(-1)


def token_max(patch: jax.Array) -> jax.Array:
    """``(B, N, E) -> (B, E)``: each channel's max over the tokens, as a gather at its argmax.
    ``jnp.max``'s gradient divides by the count of tokens equal to the max; inside a fused
    training step XLA may recompute the tokens with other roundings, find none equal and return
    0 / 0 (a NaN update at step 3 of a fine-tuning test on 8 simulated devices). The gather sends
    the gradient to the argmax token whatever the roundings."""
    idx = jnp.argmax(patch, axis=1)
    return jnp.take_along_axis(patch, idx[:, None, :], axis=1)[:, 0]


def check_pool(pool: Sequence[str]) -> tuple[str, ...]:
    pool = tuple(str(p) for p in pool)
    if not pool or set(pool) - set(POOLS) or len(set(pool)) != len(pool):
        raise ValueError(f"pool {pool!r}: one or more distinct names of {POOLS}")
    return pool


class Classifier(nnx.Module):
    """ViT3D backbone; a linear head on the standardised pooled features (``pool``: by default
    the CLS token, the mean and the max of the patch tokens).

    ``"anomaly"`` in ``pool`` adds the probes' anomaly pool (:mod:`decipher_jax.eval.features`):
    the patch tokens weighted by softmax(d / tau), d each patch's distance to the nearest patch of
    a bank of ``bank_size`` normal training series (:func:`nearest_normal_distance`). The bank
    (``bank_tokens``, their groups and patients as small integers, ``bank_tau``) is filled once
    from the initial encoder (:func:`decipher_jax.trainers.finetune.fill_bank`) and never trained;
    the weights carry no gradient. Its inputs ``group`` / ``patient`` come with each batch.

    ``feat_mean`` / ``feat_scale`` standardise the features with the training split's statistics
    at the start (:func:`set_feature_stats`), then stay fixed, as the probes standardise theirs:
    a small ViT's pooled features differ little between images at init (a mean cosine near 0.95),
    so an unstandardised head needs weights far from its init before any class separates.
    """

    def __init__(self, vit: ViTConfig, n_out: int, *, rngs: nnx.Rngs, pool: Sequence[str] = DEFAULT_POOL,
                 bank_size: int = 0):
        self.pool = check_pool(pool)
        self.backbone = ViT3D(vit, rngs=rngs)
        n = len(self.pool) * vit.dim
        self.feat_mean = param(rngs.params(), zeros, (n,), ("embed",))
        self.feat_scale = param(rngs.params(), jax.nn.initializers.ones, (n,), ("embed",))
        self.head_kernel = param(rngs.params(), trunc_normal, (n, n_out), ("embed", None))
        self.head_bias = param(rngs.params(), zeros, (n_out,), (None,))
        self.grid = tuple(int(s) // int(p) for s, p in zip(vit.img_size, vit.patch_size))
        if "anomaly" in self.pool:
            if bank_size < 2:
                raise ValueError(f"pool 'anomaly': a bank of at least 2 normal series, got bank_size={bank_size}")
            k, n_tok = int(bank_size), int(np.prod(self.grid))
            self.bank_tokens = param(rngs.params(), zeros, (k, n_tok, vit.dim), (None, None, "embed"))
            self.bank_group = param(rngs.params(), zeros, (k,), (None,))  # small integers, exact in float32
            self.bank_patient = param(rngs.params(), zeros, (k,), (None,))
            self.bank_tau = param(rngs.params(), jax.nn.initializers.ones, (), ())

    def anomaly_pool(self, patch, group, patient) -> jax.Array:
        """``(B, D)``: the patch tokens weighted by softmax(d / tau) over the patches (no gradient
        through the weights)."""
        if group is None or patient is None:
            raise ValueError("pool 'anomaly': each batch needs 'bank_group' and 'bank_patient'")
        fixed = jax.lax.stop_gradient  # the bank never trains: no backward pass through the distances
        d = nearest_normal_distance(jax.lax.stop_gradient(patch), jnp.asarray(group, jnp.float32),
                                    jnp.asarray(patient, jnp.float32), fixed(self.bank_tokens[...]),
                                    fixed(self.bank_group[...]), fixed(self.bank_patient[...]),
                                    jnp.asarray(grid_neighbours(self.grid, 1)))
        w = jax.nn.softmax(d / fixed(self.bank_tau[...]), axis=-1)
        return jnp.einsum("bn,bnd->bd", w, patch.astype(jnp.float32))

    def features(self, x, *, drop_path: float = 0.0, key=None, group=None, patient=None):
        anomaly = (lambda t: self.anomaly_pool(t, group, patient)) if "anomaly" in self.pool else None  # noqa: E731
        return pool_features(self.backbone(x, drop_path=drop_path, key=key), self.pool, anomaly)

    def __call__(self, x, *, drop_path: float = 0.0, key=None, group=None, patient=None):
        f = (self.features(x, drop_path=drop_path, key=key, group=group, patient=patient) - self.feat_mean[...]) \
            * self.feat_scale[...]
        return f @ self.head_kernel[...] + self.head_bias[...]
