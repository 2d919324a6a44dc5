"""Scaffolding shared by the trainers: configs, born-sharded train state, logging.

The train state is a plain pytree (pure dicts of ``jax.Array``); modules are rebuilt inside
the jitted step from a graphdef + template with :func:`merge_pure`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from decipher_jax import sharding as sh


# -- configs ----------------------------------------------------------------------------------

def load_config(spec: str, overrides: dict | None = None):
    """``path/to/config.py[:arg]`` -> ``get_config(arg)``, then ``{"a.b": value}`` overrides."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location(f"decipher_config_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    cfg = mod.get_config(arg or None)
    for key, value in (overrides or {}).items():
        set_path(cfg, key, value)
    return cfg


def set_path(cfg, dotted: str, value):
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        if p not in node:
            raise KeyError(f"config has no field {dotted!r} (no {p!r})")
        node = node[p]
    if leaf not in node:
        raise KeyError(f"config has no field {dotted!r}")
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    node[leaf] = value


def parse_overrides(argv: list[str]) -> dict:
    """``--config.a.b=v`` / ``--config.a.b v`` arguments -> {"a.b": "v"}."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--config."):
            raise ValueError(f"unexpected argument {a!r} (overrides look like --config.field=value)")
        key = a[len("--config."):]
        if "=" in key:
            key, val = key.split("=", 1)
        else:
            i += 1
            val = argv[i]
        out[key] = val
        i += 1
    return out


# -- modules as pure pytrees ------------------------------------------------------------------

def merge_pure(graphdef, template, params):
    """A module from a pure dict of arrays and its abstract template state."""
    state = jax.tree.map(lambda v: v, template, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


class Model:
    """graphdef + template + shardings of one nnx module family; params live outside."""

    def __init__(self, factory, mesh, rules=sh.DEFAULT_RULES):
        self.factory, self.mesh, self.rules = factory, mesh, rules
        self.graphdef, self.template = sh.abstract_model(factory)
        self.shardings = nnx.to_pure_dict(sh.state_shardings(self.template, mesh, rules))

    def init(self, key):
        """Parameters born sharded (jit with out_shardings)."""
        f = lambda k: nnx.to_pure_dict(nnx.split(self.factory(nnx.Rngs(k)))[1])  # noqa: E731
        return jax.jit(f, out_shardings=self.shardings)(key)

    def __call__(self, params):
        return merge_pure(self.graphdef, self.template, params)


def opt_shardings(tx, params, param_shardings, mesh):
    """Shardings of ``tx.init(params)``: each state leaf that mirrors a parameter (Adam moments,
    also inside ``multi_transform`` / masked states) takes that parameter's sharding; counts,
    hyperparameters and empty placeholders are replicated.

    Matching is by the dict-key suffix of the leaf's path and its shape, which survives the
    wrapper nodes optax adds (``optax.tree_map_params`` fails on masked states: frozen towers).
    """
    by_path = {}
    jax.tree_util.tree_map_with_path(
        lambda p, x, s: by_path.__setitem__(_dict_path(p), (x.shape, s)), params, param_shardings)
    rep = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = _dict_path(path)
        for n in range(len(keys), 0, -1):  # longest suffix first
            hit = by_path.get(keys[-n:])
            if hit and hit[0] == leaf.shape:
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))


def _dict_path(path) -> tuple:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def replicated(mesh):
    return NamedSharding(mesh, P())


def abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# -- logging ----------------------------------------------------------------------------------

class Logger:
    """TensorBoard scalars + a progress line + metrics.jsonl in the workdir (process 0 only)."""

    def __init__(self, workdir: str, every: int = 1):
        self.every = every
        self.main = jax.process_index() == 0
        self.t0 = time.perf_counter()
        self.last = (0, self.t0)
        if self.main:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def log(self, step: int, metrics: dict, samples_per_step: int | None = None):
        if not self.main or step % self.every:
            return
        now = time.perf_counter()
        s0, t0 = self.last
        m = {k: float(np.asarray(v)) for k, v in metrics.items()}
        if step > s0:
            m["steps_per_s"] = (step - s0) / (now - t0)
            if samples_per_step:
                m["samples_per_s"] = m["steps_per_s"] * samples_per_step
        self.last = (step, now)
        for k, v in m.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **m}) + "\n")
        self.jsonl.flush()
        keys = [k for k in ("loss", "dino", "ibot", "koleo", "mlm", "acc", "lr", "steps_per_s") if k in m]
        print(f"step {step:6d} " + " ".join(f"{k} {m[k]:.4g}" for k in keys), flush=True)

    def close(self):
        if self.main:
            self.tb.close()
            self.jsonl.close()


def keep_if_finite(loss, new_state, old_state):
    """Inside a step: a non-finite loss returns the old state, so the last good one can be saved."""
    ok = jnp.isfinite(loss)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, old_state)


def check_finite(step: int, loss: float, workdir: str):
    if not np.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss ({loss}) at step {step}; the parameters were left at the last good step and a "
            f"checkpoint of it was written in {workdir}/checkpoints. Lower the learning rate or check the data.")


def run_loop(step_fn, state, iterator, mesh, mngr, *, start: int, steps: int, workdir: str, log_every: int,
             samples_per_step: int, stop_after: int = 0):
    """The training loop shared by the trainers; returns ``(state, last metrics)``.

    A checkpoint at step s is written after batch s was consumed (so resume continues with
    batch s + 1). ``stop_after`` > 0 stops after that step as if pre-empted. A non-finite loss
    (the step returns the previous state unchanged in that case) is checkpointed and raised.
    """
    from decipher_jax import checkpoint as ckpt
    from decipher_jax.data import pipelines as P

    logger = Logger(workdir, every=log_every)
    metrics = {}
    with jax.set_mesh(mesh):
        for step in range(start, steps):
            state, metrics = step_fn(state, P.to_global(next(iterator), mesh))
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                ckpt.save(mngr, step, state, iterator, force=True)
                mngr.wait_until_finished()
                check_finite(step + 1, loss, workdir)
            logger.log(step + 1, metrics, samples_per_step=samples_per_step)
            stop = step + 1 == steps or step + 1 == stop_after
            ckpt.save(mngr, step + 1, state, iterator, force=stop)
            if stop:
                break
    mngr.wait_until_finished()
    logger.close()
    return state, {k: float(np.asarray(v)) for k, v in metrics.items()}


def initialize_distributed():
    """Multi-host: ``jax.distributed.initialize`` from the environment when configured.

    On TPU VMs it needs no arguments; elsewhere set DECIPHER_COORDINATOR (host:port),
    DECIPHER_NUM_PROCESSES and DECIPHER_PROCESS_ID.
    """
    coord = os.environ.get("DECIPHER_COORDINATOR")
    if coord:
        jax.distributed.initialize(coordinator_address=coord,
                                   num_processes=int(os.environ["DECIPHER_NUM_PROCESSES"]),
                                   process_id=int(os.environ["DECIPHER_PROCESS_ID"]))
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        jax.distributed.initialize()


def host_note() -> str:
    return f"process {jax.process_index()}/{jax.process_count()}, {jax.device_count()} devices, python {sys.version.split()[0]}"


def tree_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
