"""A multi-sequence 3D ViT for multi-parametric MRI with missing sequences (BrainMVP's setting).

Input: a study as ``(B, X, Y, Z, S)`` volumes, one channel per sequence of a fixed vocabulary
(T1, T2, FLAIR, DWI, ...), all on one grid, and ``present`` ``(B, S)``. Each sequence is
patch-embedded by the shared ViT stem (one channel at a time, as BrainMVP's encoder sees its
input), given the ViT's position embedding and its own learned *sequence embedding*, and the
sequences' tokens are concatenated, sequence-major: ``[CLS] [reg..] seq_0 patches .. seq_S-1
patches``. An absent sequence's tokens are simply absent: they are zeroed before the first
block (their pixels never enter) and masked out of every attention's keys, so no present token
and no pooled output depends on them. Shapes stay fixed whatever subset is present (one compiled
step for every batch), and the study representation is the CLS token over every present
token: the fusion is attention itself, not a late average.

Templates (BrainMVP's "modality-wise data distillation") are one learnable volume per sequence on
the input grid, zero-initialised; :mod:`decipher_jax.trainers.multiparam` learns them as each
sequence's least-squares fill of its masked voxels (``templates = "fit"``, the default) or, as
BrainMVP, through the losses of the view they fill (``"reconstruction"``). Downstream they can
stand in for a missing sequence (:func:`fill_missing`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax.models.layers import LayerNorm, param, trunc_normal, zeros
from decipher_jax.models.vit3d import ViT3D, ViTConfig
from decipher_jax.sharding import DEFAULT_RULES, Rules, constrain

SEQUENCES = ("T1", "T2", "FLAIR", "DWI")


@dataclasses.dataclass(frozen=True)
class MultiSeqConfig:
    vit: ViTConfig  # in_channels 1: every sequence goes through the one stem
    sequences: tuple[str, ...] = SEQUENCES

    def __post_init__(self):
        if self.vit.in_channels != 1:
            raise ValueError(f"the multi-sequence ViT embeds one sequence at a time: vit.in_channels must be 1, "
                             f"got {self.vit.in_channels}")
        if len(set(self.sequences)) != len(self.sequences) or not self.sequences:
            raise ValueError(f"sequences must be distinct names, got {self.sequences}")
        object.__setattr__(self, "sequences", tuple(self.sequences))

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)


def token_valid(present, n_patch: int, n_prefix: int):
    """``(B, prefix + S * n_patch)`` bool: which tokens exist (the prefix always)."""
    b = present.shape[0]
    seq = jnp.repeat(present.astype(bool), n_patch, axis=1)
    return jnp.concatenate([jnp.ones((b, n_prefix), bool), seq], axis=1)


class MultiSeqViT(nnx.Module):
    """``__call__(x, present, *, drop_path=0., key=None, collect=())`` -> dict:

    ``cls`` (B, E) the study representation (CLS over the present tokens; without a CLS token,
    the mean of the present patch tokens), ``patch`` (B, S, N, E) per-sequence patch tokens (an
    absent sequence's rows are meaningless and never read), ``mean`` / ``max`` (B, E) the present
    patch tokens' mean and max, ``per_sequence`` (B, S, E) each sequence's token mean, ``layers``
    the raw block outputs of ``collect``. ``x``: ``(B, X, Y, Z, S)``; ``present``: ``(B, S)``.
    """

    def __init__(self, config: MultiSeqConfig, *, rngs: nnx.Rngs, rules: Rules = DEFAULT_RULES):
        self.config, self.rules = config, rules
        self.vit = ViT3D(config.vit, rngs=rngs, rules=rules)
        pdt = jnp.dtype(config.vit.param_dtype)
        self.seq_embed = param(rngs.params(), trunc_normal, (config.num_sequences, config.vit.dim), (None, "embed"), pdt)

    def tokens(self, x, present):
        """Per-sequence patch tokens with position and sequence embeddings, absent ones zeroed:
        ``(B, S, N, E)`` and the token grid."""
        c = self.config
        s = c.num_sequences
        if x.ndim != 5 or x.shape[-1] != s:
            raise ValueError(f"expected (B, X, Y, Z, {s}) volumes (one channel per sequence of {c.sequences}), "
                             f"got shape {x.shape}")
        if present.shape != (x.shape[0], s):
            raise ValueError(f"present must be (batch, sequences) = {(x.shape[0], s)}, got {present.shape}")
        b = x.shape[0]
        # The absent channels' pixels are zeroed before the stem too: nothing of them reaches any
        # output, NaNs included (a zero multiply would keep a NaN; ``where`` does not).
        x = jnp.where(present[:, None, None, None, :], x, 0)
        flat = jnp.moveaxis(x, -1, 1).reshape((b * s,) + x.shape[1:4] + (1,))
        tok, grid = self.vit.embed(flat)
        tok = tok.reshape(b, s, tok.shape[1], tok.shape[2]) + self.seq_embed[...].astype(tok.dtype)[None, :, None]
        return jnp.where(present[:, :, None, None], tok, 0), grid

    def __call__(self, x, present, *, drop_path: float = 0.0, key=None, collect: Sequence[int] = ()):
        c, v = self.config, self.vit
        present = present.astype(bool)
        tok, _ = self.tokens(x, present)
        b, s, n, e = tok.shape
        dtype = tok.dtype
        prefix = []
        if v.config.cls_token:
            prefix.append(jnp.broadcast_to(v.cls[...].astype(dtype), (b, 1, e)))
        if v.config.num_registers:
            prefix.append(jnp.broadcast_to(v.registers[...].astype(dtype), (b, v.config.num_registers, e)))
        h = jnp.concatenate(prefix + [tok.reshape(b, s * n, e)], axis=1)
        h = constrain(h, ("act_batch", "act_len", "act_embed"), self.rules)
        valid = token_valid(present, n, v.config.num_prefix)
        h, layers = v.blocks(h, mask=valid[:, None, None, :], collect=collect, drop_path=drop_path, key=key)
        h = v.norm(h)
        patch = h[:, v.config.num_prefix:].reshape(b, s, n, e)
        w = present.astype(jnp.float32)[:, :, None, None]
        cnt = jnp.maximum(present.sum(1, keepdims=True).astype(jnp.float32) * n, 1.0)  # present tokens
        mean = (patch.astype(jnp.float32) * w).sum((1, 2)) / cnt
        mx = jnp.where(w > 0, patch.astype(jnp.float32), -jnp.inf).max((1, 2))
        mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
        return {"cls": h[:, 0] if v.config.cls_token else mean.astype(dtype), "patch": patch,
                "mean": mean, "max": mx, "per_sequence": patch.astype(jnp.float32).mean(2), "layers": layers}


class MultiParamModel(nnx.Module):
    """The pretraining model: the encoder, the templates ``(S, X, Y, Z)`` (zeros), a decoder
    (LayerNorm + two-layer MLP from each token to its patch's voxels, SimMIM / MAE-style; without
    skips, as BrainMVP's, unless ``voxel_skip`` > 0: see :meth:`decode`) and a projection head
    for the modality-aware contrastive loss."""

    def __init__(self, config: MultiSeqConfig, *, proj_dim: int = 128, decoder_hidden: int = 0,
                 voxel_skip: int = 0, rngs: nnx.Rngs, rules: Rules = DEFAULT_RULES):
        self.config = config
        self.voxel_skip = int(voxel_skip)
        v = config.vit
        pdt = jnp.dtype(v.param_dtype)
        self.encoder = MultiSeqViT(config, rngs=rngs, rules=rules)
        self.templates = param(rngs.params(), zeros, (config.num_sequences,) + tuple(v.img_size), (None, None, None, None), pdt)
        hid = decoder_hidden or v.dim
        vox = int(v.patch_size[0] * v.patch_size[1] * v.patch_size[2])
        self.dec_norm = LayerNorm(v.dim, v.ln_eps, param_dtype=pdt)
        self.dec_in = param(rngs.params(), trunc_normal, (v.dim, hid), ("embed", "mlp"), pdt)
        self.dec_in_bias = param(rngs.params(), zeros, (hid,), ("mlp",), pdt)
        self.dec_out = param(rngs.params(), trunc_normal, (hid, vox), ("mlp", None), pdt)
        self.dec_out_bias = param(rngs.params(), zeros, (vox,), (None,), pdt)
        if self.voxel_skip:  # see decode(); the output starts at zero, so the decoder starts as without it
            k = self.voxel_skip
            self.skip_in = param(rngs.params(), trunc_normal, (v.dim, k), ("embed", None), pdt)
            # offsets of sd 1 and gains of sd 3 (intensities are in [0, 1]), so that the k units start
            # at different intensity thresholds
            self.skip_pos = param(rngs.params(), jax.nn.initializers.normal(1.0), (vox, k), (None, None), pdt)
            self.skip_gain = param(rngs.params(), jax.nn.initializers.normal(3.0), (k,), (None,), pdt)
            self.skip_out = param(rngs.params(), zeros, (k,), (None,), pdt)
        self.proj_in = param(rngs.params(), trunc_normal, (v.dim, v.dim), ("embed", "mlp"), pdt)
        self.proj_in_bias = param(rngs.params(), zeros, (v.dim,), ("mlp",), pdt)
        self.proj_out = param(rngs.params(), trunc_normal, (v.dim, proj_dim), ("mlp", None), pdt)

    def decode(self, tokens, view=None):
        """``(..., E)`` tokens -> ``(..., p^3)`` voxels of their patches (float32).

        With ``voxel_skip`` = k > 0, ``view`` ``(..., p^3)`` (the input view's voxels of each patch)
        also reaches every voxel through a k-wide MLP whose hidden units the token and the voxel's
        place in the patch shift: ``out += w . gelu(token A + pos_v + g * view_v)``. The token then
        says how this patch's intensities map to the target (the sequence filled in, the tissue),
        and the fill's own voxels carry the geometry that a token narrower than its patch
        (64 dimensions for 512 voxels) cannot."""
        h = self.dec_norm(tokens).astype(jnp.float32)
        out = jax.nn.gelu(h @ self.dec_in[...] + self.dec_in_bias[...], approximate=False)
        out = out @ self.dec_out[...] + self.dec_out_bias[...]
        if self.voxel_skip:
            if view is None:
                raise ValueError("a decoder with voxel_skip needs the view's voxels")
            z = (h @ self.skip_in[...].astype(jnp.float32))[..., None, :]  # (..., 1, k)
            u = z + self.skip_pos[...].astype(jnp.float32) + view.astype(jnp.float32)[..., None] * self.skip_gain[...]
            out = out + jax.nn.gelu(u, approximate=False) @ self.skip_out[...].astype(jnp.float32)
        return out

    def project(self, feats):
        """The contrastive embedding of a study representation, L2-normalised (float32)."""
        h = jax.nn.gelu(feats.astype(jnp.float32) @ self.proj_in[...] + self.proj_in_bias[...], approximate=False)
        z = h @ self.proj_out[...]
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)


def patchify(vol, patch: Sequence[int]):
    """``(B, X, Y, Z)`` -> ``(B, N, px * py * pz)`` in the ViT's token order (raster over the grid)."""
    b, x, y, z = vol.shape
    px, py, pz = patch
    v = vol.reshape(b, x // px, px, y // py, py, z // pz, pz)
    return v.transpose(0, 1, 3, 5, 2, 4, 6).reshape(b, (x // px) * (y // py) * (z // pz), px * py * pz)


def unpatchify(tokens, grid: Sequence[int], patch: Sequence[int]):
    """Inverse of :func:`patchify`: ``(B, N, p^3)`` -> ``(B, X, Y, Z)``."""
    b = tokens.shape[0]
    (gx, gy, gz), (px, py, pz) = grid, patch
    v = tokens.reshape(b, gx, gy, gz, px, py, pz).transpose(0, 1, 4, 2, 5, 3, 6)
    return v.reshape(b, gx * px, gy * py, gz * pz)


def fill_missing(x, present, templates):
    """BrainMVP's missing-modality input: each absent sequence's channel replaced by its
    template, and every sequence then counted present. ``templates``: ``(S, X, Y, Z)`` on the
    input grid."""
    t = jnp.moveaxis(templates, 0, -1)[None].astype(x.dtype)
    return jnp.where(present[:, None, None, None, :], x, t), jnp.ones_like(present, dtype=bool)
