"""Helpers shared by the weight converters: path-keyed flat arrays <-> nnx state."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decipher_jax.sharding import path_str


def flat_arrays(state) -> dict[str, np.ndarray]:
    """``{"blocks/qkv_kernel": array, ...}`` from an nnx state (gathered to host)."""
    out = {}

    def visit(path, var):
        out[path_str(path)] = np.asarray(jax.device_get(var.get_value()))
        return var

    jax.tree_util.tree_map_with_path(visit, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return out


def fill_state(state, arrays: Mapping[str, np.ndarray], source: str, *, allow_missing: bool = False):
    """Returns ``state`` with values replaced from ``arrays`` (keys are our parameter paths).

    Shapes must match exactly. Missing entries raise unless ``allow_missing`` (then the
    existing values are kept and the names are returned in the second result).
    """
    missing = []

    def put(path, var):
        name = path_str(path)
        if name not in arrays:
            missing.append(name)
            return var
        want = var.get_value().shape
        got = np.shape(arrays[name])
        if tuple(got) != tuple(want):
            raise ValueError(f"{source}: parameter {name} has shape {tuple(got)}, the model expects {tuple(want)}")
        return var.replace(jnp.asarray(arrays[name], dtype=var.get_value().dtype))

    new = jax.tree_util.tree_map_with_path(put, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    unknown = sorted(set(arrays) - set(flat_arrays_keys(state)))
    if unknown:
        raise ValueError(f"{source}: converted parameters {unknown} do not exist in the model")
    if missing and not allow_missing:
        raise ValueError(f"{source}: no weights for {sorted(missing)}")
    return new, sorted(missing)


def flat_arrays_keys(state) -> list[str]:
    keys = []
    jax.tree_util.tree_map_with_path(
        lambda p, v: keys.append(path_str(p)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return keys


def read_torch_weights(path: str) -> dict[str, np.ndarray]:
    """Reads ``.safetensors`` (preferred) or a torch state dict with ``weights_only=True``.

    Never unpickles arbitrary objects: a torch file holding anything but tensors is refused.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except (SafetensorError, OSError) as e:  # their messages do not name the file
            raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is optional at run time
        raise ImportError(f"reading {path} needs torch; convert it to .safetensors instead") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable tensors-only torch checkpoint ({e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
