"""Device mesh, logical-axis rules and sharding helpers.

Model code names only *logical* axes (``embed``, ``mlp``, ``heads`` ...), stored as the
``logical_axes`` metadata of every ``nnx.Param``. One short rule table maps them onto the
three mesh axes ``data`` / ``fsdp`` / ``tensor``. Shardings are derived from
``nnx.eval_shape`` (shapes first), and parameters are born sharded by a jitted init with
``out_shardings``: nothing materialises on one device.

Why a custom metadata key rather than flax's ``out_sharding``: flax 0.12 shards variables
eagerly at construction when ``out_sharding`` is present and then demands an active mesh;
we want construction to be mesh-agnostic and the mesh + rules passed explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
# Parameters: FSDP shards the embedding dimension; tensor parallelism shards heads and MLP.
# Activations ("act_*") keep the batch over data x fsdp and heads/MLP over tensor.
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("vocab", None),  # BERT's 30522 rows divide nothing; shard its embed axis instead.
    ("layers", None),
    ("norm", None),
    ("grid", None),
    ("patch", None),
    ("channels", None),
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices.

    Axis types are Auto (GSPMD style): ``jax.make_mesh`` defaults to Explicit in jax 0.10, under
    which ``with_sharding_constraint`` fails.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}"
        )
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    except NotImplementedError:
        # A logical axis larger than any physical torus axis (e.g. fsdp=256 on v5p 8x8x8):
        # let it span several physical axes, else fall back to device order.
        from jax.experimental import mesh_utils

        try:
            arr = mesh_utils.create_device_mesh(tuple(sizes), devices, allow_split_physical_axes=True)
        except (NotImplementedError, ValueError):
            arr = np.asarray(devices).reshape(sizes)
        return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(axes: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> P:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def _axis_size(mesh_shape: Mapping[str, int], entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh_shape[n] for n in names)


def check_divisible(name: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
    """Raises a ValueError naming the tensor when a sharded dimension does not divide."""
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        parts = _axis_size(mesh.shape, entry)
        if size % parts:
            raise ValueError(
                f"cannot shard {name}: dimension {dim} has size {size}, which mesh axes {entry!r} "
                f"(total {parts} devices) do not divide; change the mesh or the rule for this axis"
            )


def path_str(path) -> str:
    """``a/b/0/c`` for a jax key path (dict keys, sequence indices, attributes)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for an (abstract) nnx.State, from each Variable's ``logical_axes``.

    Variables without ``logical_axes`` are replicated. Every sharded dimension is checked.
    """

    def one(path, var):
        shape = var.get_value().shape
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            spec = P()
        else:
            if len(axes) != len(shape):
                raise ValueError(f"{path_str(path)}: logical axes {axes} do not match shape {shape}")
            spec = logical_to_spec(axes, rules)
        check_divisible(path_str(path), shape, spec, mesh)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=_is_var)


def abstract_model(factory: Callable[[nnx.Rngs], nnx.Module]):
    """(graphdef, abstract state) of ``factory(rngs)`` without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))


def init_sharded(
    factory: Callable[[nnx.Rngs], nnx.Module],
    mesh: Mesh,
    key: jax.Array,
    rules: Rules = DEFAULT_RULES,
):
    """Creates a module's parameters directly in their sharded layout.

    Returns ``(graphdef, state, shardings)``; ``nnx.merge(graphdef, state)`` gives the module.
    """
    graphdef, abstract = abstract_model(factory)
    shardings = state_shardings(abstract, mesh, rules)

    def init(k):
        return nnx.split(factory(nnx.Rngs(k)))[1]

    state = jax.jit(init, out_shardings=shardings)(key)
    return graphdef, state, shardings


def shard_state(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Places an existing (e.g. converted) state onto the mesh according to the rules."""
    shardings = state_shardings(state, mesh, rules)
    return jax.device_put(state, shardings), shardings


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array: leading axis over the batch mesh axes, rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def shard_batch(batch, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Puts a pytree of host arrays onto the mesh with the batch sharding (single process)."""

    def put(path, x):
        x = np.asarray(x)
        s = batch_sharding(mesh, x.ndim, rules)
        check_divisible(f"batch/{path_str(path)}", x.shape, s.spec, mesh)
        return jax.device_put(x, s)

    return jax.tree_util.tree_map_with_path(put, batch)


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> jax.Array:
    """``with_sharding_constraint`` by logical names under the ambient mesh (no-op without one).

    Dimensions that do not divide their mesh axes are left unconstrained rather than padded.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = list(logical_to_spec(axes, rules))
    for i, entry in enumerate(spec):
        if entry is not None and x.shape[i] % _axis_size(mesh.shape, entry):
            spec[i] = None
    return jax.lax.with_sharding_constraint(x, P(*spec))
