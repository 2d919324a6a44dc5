"""A 3D Vision Transformer in Flax NNX for MRI volumes.

Input: channels-last volumes ``(B, D, H, W, C)``. Tokens are patches in (d, h, w) raster
order, the same order as MONAI's ``Conv3d`` + ``flatten(2)``, so weights convert directly.

Token sequence: ``[CLS] [reg_1..reg_R] patch_1..patch_N`` (CLS optional, for MONAI's
``classification=False`` layout). The position embedding covers patches only (MONAI layout);
CLS and registers are position-free learned tokens. A model built for one grid runs on any
other: learned embeddings are resampled trilinearly, sin-cos ones are evaluated at coordinates
rescaled to the native grid.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decipher_jax.models.layers import (LayerNorm, StackConfig, TransformerStack, conv3d, instance_norm, ones, param,
                                       trunc_normal, zeros)
from decipher_jax.sharding import DEFAULT_RULES, Rules, constrain

Triple = tuple[int, int, int]

# name -> (dim, depth, heads, mlp_dim); the standard ViT family.
VARIANTS = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


def _triple(v) -> Triple:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected 3 values (D, H, W), got {v!r}")
    return t  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    patch_size: Triple = (16, 16, 16)
    img_size: Triple = (96, 96, 96)  # the native grid of the position embedding
    in_channels: int = 1
    cls_token: bool = True
    num_registers: int = 0
    pos_embed: str = "learned"  # "learned" | "sincos"
    qkv_bias: bool = True
    layerscale: float | None = None
    ln_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan: bool = False
    attention_impl: str | None = None
    # "linear": the standard patch embedding (one matmul per patch, MONAI's layout). "conv": a
    # convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better"):
    # log2(patch) stride-2 3^3 convolutions, each followed by InstanceNorm and GELU, then a linear
    # projection of each cell to ``dim``. Small lesions are learnable through it where the linear
    # stem stays at chance (BENCHMARKS.md, "The conv stem"). Patch sizes must be powers of two.
    stem: str = "linear"
    stem_channels: tuple[int, ...] = ()  # per conv; () -> 16, 32, ... doubling, capped at dim
    conv_impl: str = "auto"  # layers.conv3d: "auto" | "xla" | "im2col"

    def __post_init__(self):
        object.__setattr__(self, "patch_size", _triple(self.patch_size))
        object.__setattr__(self, "img_size", _triple(self.img_size))
        object.__setattr__(self, "stem_channels", tuple(int(w) for w in self.stem_channels))
        if self.stem not in ("linear", "conv"):
            raise ValueError(f"stem must be 'linear' or 'conv', got {self.stem!r}")
        if self.stem == "conv":
            if any(p & (p - 1) for p in self.patch_size):
                raise ValueError(f"a conv stem needs power-of-two patch sizes, got {self.patch_size}")
            if self.stem_channels and len(self.stem_channels) != self.stem_depth:
                raise ValueError(f"stem_channels {self.stem_channels} must name one width per stride-2 conv "
                                 f"({self.stem_depth} for patch size {self.patch_size})")
        for s, p in zip(self.img_size, self.patch_size):
            if s % p:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")

    @property
    def grid(self) -> Triple:
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))  # type: ignore[return-value]

    @property
    def stem_depth(self) -> int:
        """Stride-2 convolutions of the conv stem: log2 of the largest patch side."""
        return max(p.bit_length() - 1 for p in self.patch_size)

    def stem_plan(self) -> list[tuple[int, Triple]]:
        """(output channels, strides) of each conv; an axis stops striding at its patch size."""
        widths = self.stem_channels or tuple(min(self.dim, 16 * 2 ** i) for i in range(self.stem_depth))
        return [(w, tuple(2 if p >> (i + 1) else 1 for p in self.patch_size)) for i, w in enumerate(widths)]

    @property
    def num_prefix(self) -> int:
        return int(self.cls_token) + self.num_registers

    def stack(self) -> StackConfig:
        return StackConfig(
            num_layers=self.depth, dim=self.dim, heads=self.heads, mlp_dim=self.mlp_dim,
            qkv_bias=self.qkv_bias, pre_norm=True, ln_eps=self.ln_eps, layerscale=self.layerscale,
            dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, scan=self.scan,
            attention_impl=self.attention_impl,
        )


def vit_config(name: str, **overrides) -> ViTConfig:
    """A config by variant name: ``"B/16"``, ``"L/16"``, ``"S/16x16x8"`` (anisotropic patches)."""
    m = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)(?:x(\d+)x(\d+))?", name)
    if not m:
        raise ValueError(f"unknown ViT variant {name!r}; expected e.g. 'B/16' or 'S/16x16x8' over {sorted(VARIANTS)}")
    dim, depth, heads, mlp = VARIANTS[m.group(1)]
    patch = (int(m.group(2)),) * 3 if m.group(3) is None else tuple(int(m.group(i)) for i in (2, 3, 4))
    return ViTConfig(**{"dim": dim, "depth": depth, "heads": heads, "mlp_dim": mlp, "patch_size": patch, **overrides})


def grid_positions(grid: Sequence[int]) -> np.ndarray:
    """``(N, len(grid))`` integer coordinates of a patch grid's cells, row-major (the patch tokens' order)."""
    return np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, len(grid))


def grid_neighbours(grid: Sequence[int], reach: int) -> np.ndarray:
    """``(N, N)`` bool: cells of a patch grid at most ``reach`` steps apart (Chebyshev)."""
    pos = grid_positions(grid)
    return np.abs(pos[:, None] - pos[None]).max(-1) <= reach


def sincos_3d(grid: Triple, dim: int, native: Triple | None = None) -> np.ndarray:
    """Fixed 3D sin-cos embedding ``(gd, gh, gw, dim)``.

    Each axis gets ``2 * (dim // 6)`` channels; leftover channels (dim not divisible by 6)
    are zero. Coordinates are rescaled to the native grid so resampling keeps their meaning.
    """
    native = native or grid
    per_axis = dim // 6
    omega = 1.0 / 10000 ** (np.arange(per_axis, dtype=np.float64) / max(per_axis, 1))
    parts = []
    for g, n in zip(grid, native):
        pos = np.arange(g, dtype=np.float64) * (n / g)
        ang = pos[:, None] * omega[None]
        parts.append(np.concatenate([np.sin(ang), np.cos(ang)], axis=1))  # (g, 2 * per_axis)
    d, h, w = parts
    emb = np.concatenate(
        [
            np.broadcast_to(d[:, None, None], grid + (d.shape[1],)),
            np.broadcast_to(h[None, :, None], grid + (h.shape[1],)),
            np.broadcast_to(w[None, None, :], grid + (w.shape[1],)),
        ],
        axis=-1,
    )
    pad = dim - emb.shape[-1]
    return np.pad(emb, ((0, 0),) * 3 + ((0, pad),)).astype(np.float32)


def resample_pos_embed(pos: jax.Array, grid: Sequence[int]) -> jax.Array:
    """Trilinear resampling of a learned ``(gd, gh, gw, E)`` embedding to another grid."""
    return jax.image.resize(pos, tuple(grid) + (pos.shape[-1],), method="trilinear", antialias=False)


class ViT3D(nnx.Module):
    """3D ViT returning a dict of features.

    ``__call__(x, mask=None, collect=(), drop_path=0., key=None)``:
      x: ``(B, D, H, W, C)``; each spatial size a multiple of the patch size (any grid).
      mask: optional ``(B, N)`` bool; True patches are replaced by the mask token *before*
        the position embedding is added (iBOT / DINOv2 convention).
    Returns ``cls`` (B, E; mean patch token when there is no CLS), ``patch`` (B, N, E),
    ``registers`` (B, R, E), all after the final LayerNorm; ``layers`` {i: (B, T, E)} raw block
    outputs for the indices in ``collect``. ``token_grid(x.shape[1:4])`` gives the token grid.
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, rules: Rules = DEFAULT_RULES):
        c = self.config = config
        self.rules = rules
        pdt = jnp.dtype(c.param_dtype)
        cells, cin = c.patch_size, c.in_channels
        if c.stem == "conv":
            he = jax.nn.initializers.he_normal(in_axis=(0, 1, 2, 3), out_axis=4)
            ks, bs, ss, ns = [], [], [], []
            for w, _ in c.stem_plan():
                ks.append(param(rngs.params(), he, (3, 3, 3, cin, w), ("patch", "patch", "patch", "channels", None), pdt))
                bs.append(param(rngs.params(), zeros, (w,), ("norm",), pdt))
                ss.append(param(rngs.params(), ones, (w,), ("norm",), pdt))
                ns.append(param(rngs.params(), zeros, (w,), ("norm",), pdt))
                cin = w
            self.stem_kernel, self.stem_bias = nnx.List(ks), nnx.List(bs)
            self.stem_norm_scale, self.stem_norm_bias = nnx.List(ss), nnx.List(ns)
            cells = (1, 1, 1)  # the stem has already reduced each patch to one cell
        self.patch_kernel = param(
            rngs.params(), trunc_normal, cells + (cin, c.dim),
            ("patch", "patch", "patch", "channels", "embed"), pdt,
        )
        self.patch_bias = param(rngs.params(), zeros, (c.dim,), ("norm",), pdt)
        if c.pos_embed == "learned":
            self.pos_embed = param(rngs.params(), trunc_normal, c.grid + (c.dim,), ("grid", "grid", "grid", "embed"), pdt)
        if c.cls_token:
            self.cls = param(rngs.params(), trunc_normal, (1, c.dim), (None, "embed"), pdt)
        if c.num_registers:
            self.registers = param(rngs.params(), trunc_normal, (c.num_registers, c.dim), (None, "embed"), pdt)
        self.mask_token = param(rngs.params(), zeros, (c.dim,), ("norm",), pdt)
        self.blocks = TransformerStack(c.stack(), rngs=rngs, rules=rules)
        self.norm = LayerNorm(c.dim, c.ln_eps, param_dtype=pdt)

    def token_grid(self, spatial: Sequence[int]) -> Triple:
        c = self.config
        if len(spatial) != 3 or any(s % p for s, p in zip(spatial, c.patch_size)):
            raise ValueError(f"volume of spatial shape {tuple(spatial)} is not divisible by patch size {c.patch_size}")
        return tuple(s // p for s, p in zip(spatial, c.patch_size))  # type: ignore[return-value]

    def position_embedding(self, grid: Triple) -> jax.Array:
        c = self.config
        if c.pos_embed == "sincos":
            return jnp.asarray(sincos_3d(grid, c.dim, c.grid))
        pos = self.pos_embed[...]
        return pos if tuple(grid) == c.grid else resample_pos_embed(pos, grid)

    def embed(self, x, mask=None):
        """Patch embedding (+ mask token) + position embedding -> ``(B, N, E)``, grid."""
        c = self.config
        if x.ndim != 5 or x.shape[-1] != c.in_channels:
            raise ValueError(f"expected (B, D, H, W, {c.in_channels}) volumes, got shape {x.shape}")
        dtype = jnp.dtype(c.dtype)
        grid = self.token_grid(x.shape[1:4])
        (gd, gh, gw), (pd, ph, pw) = grid, c.patch_size
        b, x = x.shape[0], x.astype(dtype)
        if c.stem == "conv":
            x = self.conv_stem(x)
            pd = ph = pw = 1
        # A stride=kernel conv is a reshape + matmul: patches (B, gd, gh, gw, pd, ph, pw, C).
        x = x.reshape(b, gd, pd, gh, ph, gw, pw, x.shape[-1])
        tok = jnp.einsum("bipjqkrc,pqrce->bijke", x, self.patch_kernel[...].astype(dtype))
        tok = tok.reshape(b, gd * gh * gw, c.dim) + self.patch_bias[...].astype(dtype)
        if mask is not None:
            if mask.shape != (b, gd * gh * gw):
                raise ValueError(f"mask shape {mask.shape} != (batch, tokens) {(b, gd * gh * gw)}")
            tok = jnp.where(mask[..., None], self.mask_token[...].astype(dtype), tok)
        tok = tok + self.position_embedding(grid).reshape(1, -1, c.dim).astype(dtype)
        return tok, grid

    def conv_stem(self, x):
        """The conv stem's feature map ``(B, gd, gh, gw, C_last)`` of a ``(B, D, H, W, C)`` volume."""
        c = self.config
        for i, (_, strides) in enumerate(c.stem_plan()):
            x = conv3d(x, self.stem_kernel[i][...], strides, c.conv_impl) + self.stem_bias[i][...].astype(x.dtype)
            x = jax.nn.gelu(instance_norm(x, self.stem_norm_scale[i][...], self.stem_norm_bias[i][...]), approximate=False)
        return x

    def __call__(self, x, *, mask=None, collect: Sequence[int] = (), drop_path: float = 0.0, key=None):
        c = self.config
        tok, _ = self.embed(x, mask)
        b, dtype = tok.shape[0], tok.dtype
        prefix = []
        if c.cls_token:
            prefix.append(jnp.broadcast_to(self.cls[...].astype(dtype), (b, 1, c.dim)))
        if c.num_registers:
            prefix.append(jnp.broadcast_to(self.registers[...].astype(dtype), (b, c.num_registers, c.dim)))
        h = jnp.concatenate(prefix + [tok], axis=1) if prefix else tok
        h = constrain(h, ("act_batch", "act_len", "act_embed"), self.rules)
        h, layers = self.blocks(h, collect=collect, drop_path=drop_path, key=key)
        h = self.norm(h)
        patch = h[:, c.num_prefix :]
        return {
            "cls": h[:, 0] if c.cls_token else patch.mean(axis=1),
            "patch": patch,
            "registers": h[:, int(c.cls_token) : c.num_prefix],
            "layers": layers,
        }


def num_params(state) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))
