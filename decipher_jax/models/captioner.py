"""An image-conditioned decoder: the stage-2 image tower's patch tokens, resampled to a fixed
number of latents and projected, stand before the text as a prefix (M3D-LaMed / RadFM layout; no
cross-attention in the language model).

Parameter tree (the optimiser's regex rules address the parts by these names)::

    image/...      the 3D ViT (stage 2's image tower; frozen by the default rule ``image/.*``)
    resampler/...  a perceiver resampler: learnt latents cross-attend to the image tokens (and
                   themselves, Flamingo's keys), then an MLP, ``resampler_depth`` times
    projector/...  a 2-layer GELU MLP into the decoder's width (M3D's projector)
    decoder/...    the causal LM (:class:`decipher_jax.models.decoder.Decoder`)
    memory/...     with ``anomaly_bank = K``: ``bank``, the frozen tower's patch tokens of K training
                   series without findings (filled by the trainer, never trained: rule ``memory/bank``),
                   and the embedding of each patch's distance to its nearest bank patch
                   (PatchCore's score, as the visual localisation map computes it), which is added
                   to the patch's token before the resampler, with a position embedding; and a
                   summary token (the map's maximum, mean, arg-max position and the map) after the
                   latents

Why the memory: the frozen tower's pooled features barely tell a study with a finding from one
without (the demo's "abnormal" probe, 0.52 AUROC), but the nearest-normal-patch distance does (its
maximum: 0.76 for any finding, 0.85 for a lesion, on the demo's test series); the decoder cannot
compute that distance from the image tokens alone, since it needs the other studies.

``use_image=False`` builds the decoder alone: the language-prior baseline, the same LM that never
sees the image.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decipher_jax.models.decoder import Decoder, DecoderConfig
from decipher_jax.models.layers import layer_norm, normal, ones, param, trunc_normal, zeros
from decipher_jax.models.towers import normalise
from decipher_jax.models.vit3d import ViT3D, ViTConfig, grid_neighbours, grid_positions
from decipher_jax.sharding import DEFAULT_RULES, Rules, constrain


@dataclasses.dataclass(frozen=True)
class CaptionerConfig:
    use_image: bool = True
    num_latents: int = 16  # image tokens the decoder sees (RadFM: 32; M3D pools to 256)
    resampler_depth: int = 2
    resampler_heads: int = 4
    anomaly_bank: int = 0  # K bank series for the nearest-normal-patch distance (0: off)
    anomaly_reach: int = 1  # bank patches at most this many grid steps away (Chebyshev) are neighbours
    anomaly_scale: float = 10.0  # the distance (1 - cosine, about 0-0.4) times this enters the embedding


class Resampler(nnx.Module):
    """Perceiver resampler: ``(B, N, Din)`` tokens -> ``(B, num_latents, dim)``."""

    def __init__(self, din: int, dim: int, c: CaptionerConfig, *, rngs: nnx.Rngs, rules: Rules = DEFAULT_RULES):
        if dim % c.resampler_heads:
            raise ValueError(f"decoder width {dim} is not divisible by resampler_heads {c.resampler_heads}")
        self.c, self.rules = c, rules
        L, H, D, M = c.resampler_depth, c.resampler_heads, dim // c.resampler_heads, 4 * dim
        p = lambda init, shape, axes: param(rngs.params(), init, shape, axes)  # noqa: E731
        self.in_kernel = p(trunc_normal, (din, dim), (None, "embed"))
        self.in_bias = p(zeros, (dim,), ("norm",))
        self.latents = p(trunc_normal, (c.num_latents, dim), (None, "embed"))
        self.ln_q_scale, self.ln_q_bias = p(ones, (L, dim), ("layers", "norm")), p(zeros, (L, dim), ("layers", "norm"))
        self.ln_kv_scale, self.ln_kv_bias = p(ones, (L, dim), ("layers", "norm")), p(zeros, (L, dim), ("layers", "norm"))
        self.q_kernel = p(trunc_normal, (L, dim, H, D), ("layers", "embed", "heads", "kv"))
        self.k_kernel = p(trunc_normal, (L, dim, H, D), ("layers", "embed", "heads", "kv"))
        self.v_kernel = p(trunc_normal, (L, dim, H, D), ("layers", "embed", "heads", "kv"))
        self.o_kernel = p(trunc_normal, (L, H, D, dim), ("layers", "heads", "kv", "embed"))
        self.ln_m_scale, self.ln_m_bias = p(ones, (L, dim), ("layers", "norm")), p(zeros, (L, dim), ("layers", "norm"))
        self.mlp_in = p(trunc_normal, (L, dim, M), ("layers", "embed", "mlp"))
        self.mlp_out = p(trunc_normal, (L, M, dim), ("layers", "mlp", "embed"))
        self.out_scale, self.out_bias = p(ones, (dim,), ("norm",)), p(zeros, (dim,), ("norm",))

    def __call__(self, tokens, extra=None):
        """``extra``: ``(B, N, dim)`` added to the projected tokens (the memory's embedding)."""
        b = tokens.shape[0]
        x = tokens.astype(jnp.float32) @ self.in_kernel[...] + self.in_bias[...]
        if extra is not None:
            x = x + extra
        lat = jnp.broadcast_to(self.latents[...], (b,) + self.latents.shape)
        for i in range(self.c.resampler_depth):
            q_in = layer_norm(lat, self.ln_q_scale[i], self.ln_q_bias[i], 1e-6)
            kv_in = layer_norm(jnp.concatenate([x, lat], 1), self.ln_kv_scale[i], self.ln_kv_bias[i], 1e-6)
            q = jnp.einsum("bte,end->btnd", q_in, self.q_kernel[i])
            k = jnp.einsum("bte,end->btnd", kv_in, self.k_kernel[i])
            v = jnp.einsum("bte,end->btnd", kv_in, self.v_kernel[i])
            o = jax.nn.dot_product_attention(q, k, v)
            lat = lat + jnp.einsum("btnd,nde->bte", o, self.o_kernel[i])
            h = layer_norm(lat, self.ln_m_scale[i], self.ln_m_bias[i], 1e-6)
            lat = lat + jax.nn.gelu(h @ self.mlp_in[i]) @ self.mlp_out[i]
            lat = constrain(lat, ("act_batch", "act_len", "act_embed"), self.rules)
        return layer_norm(lat, self.out_scale[...], self.out_bias[...], 1e-6)


class Memory(nnx.Module):
    """A bank of normal studies' patch tokens and the embedding of each patch's distance to it.

    ``distance(tokens)``: ``(B, N)``, one minus the largest cosine between a patch token and the
    bank's tokens at most ``anomaly_reach`` grid steps away (:func:`decipher_jax.eval.localisation.visual_map`
    without the groups: the nearest bank patch is taken over every series). A bank series is never
    its own neighbour: a bank row whose tokens equal the query's (mean same-position cosine above
    1 - 1e-5) is left out, so a training series that is in the bank gets the distance an unseen one
    would. That match needs the tower's float32 tokens (the trainer refuses other dtypes); matching
    by series id would not. Cost O(B K N^2 D): for the tiny configs (N = 64, K = 128), not a pod's.
    """

    def __init__(self, vit: ViTConfig, dim: int, c: CaptionerConfig, *, rngs: nnx.Rngs):
        self.c, self.grid = c, tuple(vit.grid)
        n = int(np.prod(self.grid))
        p = lambda init, shape, axes: param(rngs.params(), init, shape, axes)  # noqa: E731
        self.bank = p(zeros, (c.anomaly_bank, n, vit.dim), (None, None, "embed"))
        self.w1, self.b1 = p(normal, (dim,), ("norm",)), p(zeros, (dim,), ("norm",))
        self.w2 = p(normal, (dim, dim), ("mlp", "embed"))
        self.pos = p(trunc_normal, (n, dim), (None, "embed"))
        # the summary token: an MLP of the map's maximum, mean, the maximum's grid coordinates and the map
        self.s1, self.sb1 = p(normal, (5 + n, dim), (None, "mlp")), p(zeros, (dim,), ("norm",))
        self.s2, self.sb2 = p(normal, (dim, dim), ("mlp", "embed")), p(zeros, (dim,), ("norm",))

    def distance(self, tokens):
        t = normalise(jax.lax.stop_gradient(tokens))
        b = normalise(jax.lax.stop_gradient(self.bank[...]))
        sim = jnp.einsum("bpd,kqd->bkpq", t, b)
        own = jnp.diagonal(sim, axis1=2, axis2=3).mean(-1) > 1.0 - 1e-5  # (B, K): the series itself
        ok = jnp.asarray(grid_neighbours(self.grid, self.c.anomaly_reach))[None, None] & ~own[:, :, None, None]
        return 1.0 - jnp.where(ok, sim, -jnp.inf).max(axis=(1, 3))

    def embed(self, dist):
        """``(B, N)`` distances -> ``(B, N, dim)``: a one-hidden-layer MLP of the scaled distance, plus
        each patch's position."""
        h = jax.nn.gelu(self.c.anomaly_scale * dist[..., None] * self.w1[...] + self.b1[...])
        return h @ self.w2[...] + self.pos[...]

    def summary(self, dist):
        """``(B, N)`` distances -> ``(B, 1, dim)``: one token of the map's maximum and mean (scaled),
        the grid coordinates of its maximum (each in [-1, 1]) and the scaled map itself, through a
        one-hidden-layer MLP. Whether a study holds a lesion, and where, is one threshold and one
        sign away in it, where the resampler's latents would have to find the most anomalous of N
        patches; the map lets it read a place (where a kidney should be) as well."""
        g, pos = np.asarray(self.grid), grid_positions(self.grid)
        coords = jnp.asarray(2.0 * pos / np.maximum(g - 1, 1) - 1.0, jnp.float32)[jnp.argmax(dist, 1)]  # (B, 3)
        f = jnp.concatenate([self.c.anomaly_scale * dist.max(1, keepdims=True),
                             self.c.anomaly_scale * dist.mean(1, keepdims=True), coords,
                             self.c.anomaly_scale * dist], 1)
        h = jax.nn.gelu(f @ self.s1[...] + self.sb1[...])
        return (h @ self.s2[...] + self.sb2[...])[:, None]


class Captioner(nnx.Module):
    def __init__(self, vit: ViTConfig | None, dec: DecoderConfig, c: CaptionerConfig, *, rngs: nnx.Rngs,
                 rules: Rules = DEFAULT_RULES):
        self.c, self.vit_config, self.rules = c, vit, rules
        self.decoder = Decoder(dec, rngs=rngs, rules=rules)
        if c.use_image:
            if vit is None:
                raise ValueError("an image-conditioned captioner needs the image tower's ViTConfig")
            E = dec.hidden_size
            self.image = ViT3D(vit, rngs=rngs, rules=rules)
            self.resampler = Resampler(vit.dim, E, c, rngs=rngs, rules=rules)
            self.proj_in = param(rngs.params(), normal, (E, E), ("embed", "mlp"))
            self.proj_in_bias = param(rngs.params(), zeros, (E,), ("norm",))
            self.proj_out = param(rngs.params(), normal, (E, E), ("mlp", "embed"))
            self.proj_out_bias = param(rngs.params(), zeros, (E,), ("norm",))
            if c.anomaly_bank:
                self.memory = Memory(vit, E, c, rngs=rngs)

    @property
    def num_prefix(self) -> int:
        return (self.c.num_latents + int(bool(self.c.anomaly_bank))) if self.c.use_image else 0

    def prefix(self, image, *, freeze_image: bool = True):
        """``(B, num_prefix, E)`` prefix embeddings of ``(B, D, H, W, C)`` volumes (``(B, 0, E)``
        without the image). ``freeze_image`` stops the gradient at the tower's output: a frozen
        tower costs no backward pass."""
        b = image.shape[0]
        E = self.decoder.config.hidden_size
        if not self.c.use_image:
            return jnp.zeros((b, 0, E), jnp.dtype(self.decoder.config.dtype))
        tokens = self.image(image)["patch"]
        if freeze_image:
            tokens = jax.lax.stop_gradient(tokens)
        dist = self.memory.distance(tokens) if self.c.anomaly_bank else None
        lat = self.resampler(tokens, None if dist is None else self.memory.embed(dist))
        h = jax.nn.gelu(lat @ self.proj_in[...] + self.proj_in_bias[...])
        out = h @ self.proj_out[...] + self.proj_out_bias[...]
        if dist is not None:  # the memory's summary token after the latents
            out = jnp.concatenate([out, self.memory.summary(dist)], 1)
        return out.astype(jnp.dtype(self.decoder.config.dtype))

    def sequence(self, image, ids, *, freeze_image: bool = True):
        """The decoder's input: the prefix, then the embedded ``ids``; and how many prefix slots."""
        pre = self.prefix(image, freeze_image=freeze_image)
        return jnp.concatenate([pre, self.decoder.embed(ids)], 1), pre.shape[1]

    def __call__(self, image, ids, valid=None, *, freeze_image: bool = True):
        """Next-token logits ``(B, T, vocab)`` at the text slots (the prefix's are dropped)."""
        x, n = self.sequence(image, ids, freeze_image=freeze_image)
        v = None if valid is None else jnp.concatenate([jnp.ones((ids.shape[0], n), bool), valid.astype(bool)], 1)
        logits, _ = self.decoder(x, valid=v)
        return logits[:, n:]
