"""MONAI ``monai.networks.nets.ViT`` weights <-> :class:`decipher_jax.models.vit3d.ViT3D`.

Supported MONAI layout: ``proj_type="conv"``, any ``pos_embed_type`` (the stored position
embedding is imported as a learned one), ``classification`` True (CLS token) or False.
MONAI's LayerNorm eps is 1e-5 and its GELU is exact; the config built here matches both.
Conv3d kernels ``(out, in, k0, k1, k2)`` become ``(k0, k1, k2, in, out)`` for channels-last input.

Files: ``.safetensors`` (read and written) or a torch state dict read with
``torch.load(weights_only=True)``; nothing is ever unpickled beyond tensors.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flax import nnx

from decipher_jax.interop.common import fill_state, flat_arrays, read_torch_weights
from decipher_jax.models.vit3d import ViT3D, ViTConfig

log = logging.getLogger(__name__)

# Unused by MONAI's ViT forward when with_cross_attention=False, or not part of the encoder.
_IGNORED = ("norm_cross_attn.", "cross_attn.", "classification_head.")


def config_from_monai(
    *, in_channels: int, img_size, patch_size, hidden_size: int = 768, mlp_dim: int = 3072,
    num_layers: int = 12, num_heads: int = 12, qkv_bias: bool = False, classification: bool = False, **overrides,
) -> ViTConfig:
    """The :class:`ViTConfig` equivalent to ``monai.networks.nets.ViT(...)`` arguments."""
    return ViTConfig(
        dim=hidden_size, depth=num_layers, heads=num_heads, mlp_dim=mlp_dim, patch_size=patch_size,
        img_size=img_size, in_channels=in_channels, cls_token=classification, qkv_bias=qkv_bias,
        ln_eps=1e-5, pos_embed="learned", **overrides,
    )


def _require_linear_stem(c: ViTConfig):
    if c.stem != "linear":
        raise ValueError(f"MONAI's ViT has a linear patch embedding; a ViT with stem={c.stem!r} has no MONAI layout")


def monai_to_ours(sd: dict[str, np.ndarray], c: ViTConfig) -> dict[str, np.ndarray]:
    _require_linear_stem(c)
    E, H, L = c.dim, c.heads, c.depth
    D = E // H
    used: set[str] = set()

    def get(k):
        if k not in sd:
            raise KeyError(f"MONAI ViT weights lack {k!r}")
        used.add(k)
        return np.asarray(sd[k])

    out = {
        "patch_kernel": get("patch_embedding.patch_embeddings.weight").transpose(2, 3, 4, 1, 0),
        "patch_bias": get("patch_embedding.patch_embeddings.bias"),
        "pos_embed": get("patch_embedding.position_embeddings").reshape(c.grid + (E,)),
        "norm/scale": get("norm.weight"),
        "norm/bias": get("norm.bias"),
    }
    if c.cls_token:
        out["cls"] = get("cls_token").reshape(1, E)
    per: dict[str, list[np.ndarray]] = {}
    for i in range(L):
        p = f"blocks.{i}."
        e = {
            "ln1_scale": get(p + "norm1.weight"), "ln1_bias": get(p + "norm1.bias"),
            "qkv_kernel": get(p + "attn.qkv.weight").T.reshape(E, 3, H, D),
            "out_kernel": get(p + "attn.out_proj.weight").T.reshape(H, D, E),
            "out_bias": get(p + "attn.out_proj.bias"),
            "ln2_scale": get(p + "norm2.weight"), "ln2_bias": get(p + "norm2.bias"),
            "mlp_in_kernel": get(p + "mlp.linear1.weight").T, "mlp_in_bias": get(p + "mlp.linear1.bias"),
            "mlp_out_kernel": get(p + "mlp.linear2.weight").T, "mlp_out_bias": get(p + "mlp.linear2.bias"),
        }
        if c.qkv_bias:
            e["qkv_bias"] = get(p + "attn.qkv.bias").reshape(3, H, D)
        for k, v in e.items():
            per.setdefault(k, []).append(v)
    out.update({f"blocks/{k}": np.stack(v) for k, v in per.items()})
    leftover = sorted(k for k in set(sd) - used if not any(s in k for s in _IGNORED))
    if leftover:
        raise ValueError(f"unexpected MONAI ViT weights (config mismatch?): {leftover[:10]}")
    return out


def ours_to_monai(arrays: dict[str, np.ndarray], c: ViTConfig) -> dict[str, np.ndarray]:
    """Our weights in MONAI's state-dict layout (``ViT(..., proj_type='conv')``, MONAI >= 1.4)."""
    _require_linear_stem(c)
    if c.num_registers or c.pos_embed != "learned":
        raise ValueError("MONAI's ViT has no register tokens and stores a learned-shape position embedding; "
                         f"cannot export num_registers={c.num_registers}, pos_embed={c.pos_embed!r}")
    E = c.dim
    sd = {
        "patch_embedding.patch_embeddings.weight": arrays["patch_kernel"].transpose(4, 3, 0, 1, 2),
        "patch_embedding.patch_embeddings.bias": arrays["patch_bias"],
        "patch_embedding.position_embeddings": arrays["pos_embed"].reshape(1, math.prod(c.grid), E),
        "norm.weight": arrays["norm/scale"],
        "norm.bias": arrays["norm/bias"],
    }
    if c.cls_token:
        sd["cls_token"] = arrays["cls"].reshape(1, 1, E)
    b = {k[len("blocks/"):]: v for k, v in arrays.items() if k.startswith("blocks/")}
    for i in range(c.depth):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = b["ln1_scale"][i], b["ln1_bias"][i]
        sd[p + "attn.qkv.weight"] = b["qkv_kernel"][i].reshape(E, 3 * E).T
        if c.qkv_bias:
            sd[p + "attn.qkv.bias"] = b["qkv_bias"][i].reshape(3 * E)
        sd[p + "attn.out_proj.weight"] = b["out_kernel"][i].reshape(E, E).T
        sd[p + "attn.out_proj.bias"] = b["out_bias"][i]
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = b["ln2_scale"][i], b["ln2_bias"][i]
        sd[p + "mlp.linear1.weight"], sd[p + "mlp.linear1.bias"] = b["mlp_in_kernel"][i].T, b["mlp_in_bias"][i]
        sd[p + "mlp.linear2.weight"], sd[p + "mlp.linear2.bias"] = b["mlp_out_kernel"][i].T, b["mlp_out_bias"][i]
        # MONAI >= 1.4 registers this (unused) LayerNorm in every block; strict loading wants it.
        sd[p + "norm_cross_attn.weight"] = np.ones(E, np.float32)
        sd[p + "norm_cross_attn.bias"] = np.zeros(E, np.float32)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def load_monai(path_or_state_dict, config: ViTConfig, *, seed: int = 0) -> ViT3D:
    """A :class:`ViT3D` holding MONAI ViT weights (file path or ``{name: array}``)."""
    sd = read_torch_weights(path_or_state_dict) if isinstance(path_or_state_dict, str) else path_or_state_dict
    source = path_or_state_dict if isinstance(path_or_state_dict, str) else "MONAI state dict"
    model = ViT3D(config, rngs=nnx.Rngs(seed))
    state, missing = fill_state(nnx.state(model), monai_to_ours(sd, config), source, allow_missing=True)
    if set(missing) - {"mask_token", "registers"}:
        raise ValueError(f"{source}: no weights for {missing}")
    nnx.update(model, state)
    return model


def export_monai(model: ViT3D, path: str | None = None) -> dict[str, np.ndarray]:
    """MONAI state dict of ``model``; also written as ``.safetensors`` when ``path`` is given."""
    sd = ours_to_monai(flat_arrays(nnx.state(model)), model.config)
    if path is not None:
        from safetensors.numpy import save_file

        save_file(sd, path, metadata={"format": "pt", "source": "decipher_jax", "layout": "monai.networks.nets.ViT"})
    return sd
