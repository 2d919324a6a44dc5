"""Ahead-of-time compilation for TPU topologies from a CPU host: memory and FLOPs before launch.

``jax.experimental.topologies.get_topology_desc`` (needs ``pip install libtpu``) describes the
chips of a slice; a step lowered with abstract, sharded inputs compiles for it without any
TPU attached. ``compiled.memory_analysis()`` gives per-chip bytes and ``cost_analysis()``
XLA's FLOP count for the per-chip SPMD program.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from decipher_jax import env
from decipher_jax import sharding as sh
from decipher_jax.state import Model, opt_shardings

# Per-chip HBM in GiB (public spec sheets).
HBM_GIB = {"v4": 32, "v5 lite": 16, "v5e": 16, "v5p": 95, "v5": 95, "v6 lite": 32, "v6e": 32}


@dataclasses.dataclass
class AotResult:
    name: str
    topology: str
    chips: int
    mesh: dict
    per_chip_bytes: int
    argument_bytes: int
    temp_bytes: int
    hbm_bytes: int | None
    xla_flops_per_chip: float
    analytic_flops_per_chip: float | None
    compile_s: float

    def row(self) -> str:
        hbm = f"{self.per_chip_bytes / self.hbm_bytes:.0%}" if self.hbm_bytes else "?"
        an = f"{self.analytic_flops_per_chip / 1e12:.3g}" if self.analytic_flops_per_chip else "-"
        mesh = "x".join(str(self.mesh[a]) for a in sh.MESH_AXES)
        return (f"| {self.name} | {self.topology} | {self.chips} | {mesh} | {self.per_chip_bytes / 2**30:.2f} GiB "
                f"| {hbm} | {self.xla_flops_per_chip / 1e12:.3g} | {an} | {self.compile_s:.0f} |")


TABLE_HEADER = (
    "| step | topology | chips | mesh (data x fsdp x tensor) | per-chip bytes | of HBM | XLA TFLOP/chip | analytic TFLOP/chip | compile s |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def topology_mesh(topology_name: str, mesh_shape: dict, platform: str = "tpu"):
    from jax.experimental import topologies

    env.before_tpu_compile()
    topo = topologies.get_topology_desc(platform=platform, topology_name=topology_name)
    devices = topo.devices
    return sh.make_mesh(mesh_shape, devices=devices), devices


def hbm_bytes(device) -> int | None:
    kind = device.device_kind.lower().replace("tpu ", "")
    for k, gib in sorted(HBM_GIB.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(k):
            return gib * 2**30
    return None


def abstract_train_state(factory, mesh, tx: optax.GradientTransformation, rules=sh.DEFAULT_RULES):
    """The :class:`Model`, abstract (params, opt_state) with shardings attached, and their sharding trees."""
    model = Model(factory, mesh, rules)
    params, shard_state = nnx.to_pure_dict(model.template), model.shardings
    opt_shape = jax.eval_shape(tx.init, params)
    opt_shard = opt_shardings(tx, params, shard_state, mesh)
    attach = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    return (
        model,
        (jax.tree.map(attach, params, shard_state), jax.tree.map(attach, opt_shape, opt_shard)),
        (shard_state, opt_shard),
    )


def compile_train_step(
    name: str,
    factory: Callable,
    loss_fn: Callable,
    batch_spec: dict,
    topology: str,
    mesh_shape: dict,
    tx: optax.GradientTransformation | None = None,
    analytic_flops: float | None = None,
) -> AotResult:
    """Lowers and compiles ``loss -> grads -> optimizer update`` for a TPU topology."""
    tx = tx or optax.adamw(1e-4, weight_decay=0.05)
    mesh, devices = topology_mesh(topology, mesh_shape)
    model, (a_params, a_opt), (s_params, s_opt) = abstract_train_state(factory, mesh, tx)
    a_batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh.batch_sharding(mesh, len(shape)))
        for k, (shape, dtype) in batch_spec.items()
    }
    for k, v in a_batch.items():
        sh.check_divisible(f"batch/{k}", v.shape, v.sharding.spec, mesh)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model(p), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, out_shardings=(s_params, s_opt, None), donate_argnums=(0, 1))
    return compile_and_measure(name, topology, mesh, devices, jitted, (a_params, a_opt, a_batch), analytic_flops)


def compile_and_measure(name, topology, mesh, devices, jitted, abstract_args, analytic_flops=None) -> AotResult:
    """Lowers ``jitted`` on abstract (sharded) arguments, compiles, and reads memory and FLOPs."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(*abstract_args).compile()
    dt = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_chip = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    n = len(devices)
    return AotResult(
        name=name, topology=topology, chips=n, mesh=dict(mesh.shape), per_chip_bytes=int(per_chip),
        argument_bytes=int(mem.argument_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        hbm_bytes=hbm_bytes(devices[0]), xla_flops_per_chip=float(cost.get("flops", float("nan"))),
        analytic_flops_per_chip=None if analytic_flops is None else analytic_flops / n, compile_s=dt,
    )


def vit_train_flops(c, batch: int, spatial) -> float:
    """Analytic FLOPs of one forward+backward of a ViT (3x forward; matmuls only, 2 per MAC)."""
    n = math.prod(s // p for s, p in zip(spatial, c.patch_size)) + c.num_prefix
    e, m, L = c.dim, c.mlp_dim, c.depth
    patch = 2 * n * math.prod(c.patch_size) * c.in_channels * e
    per_layer = 2 * n * e * 3 * e + 2 * 2 * n * n * e + 2 * n * e * e + 2 * 2 * n * e * m
    return 3.0 * batch * (patch + L * per_layer)


def versions_note() -> str:
    return f"jax {jax.__version__}, numpy {np.__version__}, compiled on host platform {jnp.zeros(()).device.platform}"
