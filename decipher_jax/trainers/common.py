"""Scaffolding shared by the trainers: configs, the :class:`Setup` every trainer returns, the
one :func:`train` that runs any of them, born-sharded train state, logging.

The train state is a plain pytree (pure dicts of ``jax.Array``); modules are rebuilt inside
the jitted step from a graphdef + template with :func:`merge_pure`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from decipher_jax import layout

# Model state and its shardings live in decipher_jax.state (not training-specific); re-exported
# so that the trainers keep calling common.Model, common.abstract, ...
from decipher_jax.state import Model, _dict_path, abstract, merge_pure, opt_shardings, replicated, tree_norm  # noqa: F401


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


def params_state(model, tx, mesh, params_shape) -> tuple[dict, dict]:
    """``(shardings, abstract shapes)`` of a ``{"step", "params", "opt"}`` train state."""
    shardings = {"step": replicated(mesh), "params": model.shardings,
                 "opt": opt_shardings(tx, params_shape, model.shardings, mesh)}
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shape,
              "opt": jax.eval_shape(tx.init, params_shape)}
    return shardings, shapes


# -- logging ----------------------------------------------------------------------------------

class Logger:
    """TensorBoard scalars + a progress line + metrics.jsonl in the workdir (process 0 only)."""

    def __init__(self, workdir: str, every: int = 1, keys: tuple[str, ...] = ("loss",)):
        self.every, self.keys = every, tuple(keys) + ("lr", "steps_per_s")
        self.main = jax.process_index() == 0
        self.t0 = time.perf_counter()
        self.last = (0, self.t0)
        if self.main:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self.tb = SummaryWriter(layout.RunDir(workdir).tb)
            self.jsonl = open(layout.RunDir(workdir).metrics, "a")

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
        keys = [k for k in self.keys if k in m]
        print(f"step {step:6d} " + " ".join(f"{k} {m[k]:.4g}" for k in keys), flush=True)

    def close(self):
        if self.main:
            self.tb.close()
            self.jsonl.close()


class Diverged(FloatingPointError):
    """A step the guard refused; the last good state is checkpointed (``step``)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Preempted(Exception):
    """SIGTERM arrived; the run stopped at ``step`` with a checkpoint of it (rerun to resume)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _float_sq_sum(tree):
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)
                if jnp.issubdtype(x.dtype, jnp.inexact)), jnp.zeros([], jnp.float32))


def guard_update(loss, new_state, old_state, *, params, new_params, max_update_ratio: float, check=None):
    """Inside a step: ``(state, metrics)``, the old state unless the step is sound.

    Sound means a finite loss, a finite new state (parameters, optimiser moments, EMA; or the
    part of it named by ``check``) and an update ``new_params - params`` whose norm is at most
    ``max_update_ratio`` times the parameters' norm. The loss alone is not enough: it is
    computed before the update, so with lr 1e30 the step that took the weights to 2e29 had a
    finite loss and only the next one was NaN; its state was then kept as "the last good step"
    and could never train again. An AdamW update is about lr per element, so the ratio is about
    lr / rms(parameter): 0.05 at lr 1e-3 for 0.02-scale weights.

    Every norm reads arrays the step materialises anyway (its inputs and outputs), never the
    optimiser's update itself: a second reader of that would change how XLA fuses the update
    into the parameters (an FMA or not) and so the trained weights' last bits. ``params`` /
    ``new_params`` / ``check`` may leave out frozen parameters (a locked tower never changes):
    each norm costs a pass over what it covers.
    """
    delta = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), new_params, params)
    ratio = jnp.sqrt(_float_sq_sum(delta)) / jnp.maximum(jnp.sqrt(_float_sq_sum(params)), 1e-12)
    ok = jnp.isfinite(loss) & jnp.isfinite(_float_sq_sum(new_state if check is None else check))
    ok = ok & (ratio <= max_update_ratio)
    state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, old_state)
    return state, {"step_ok": ok, "update_ratio": ratio}


def _diverged(step: int, metrics: dict, max_update_ratio: float | None, ckpt_dir: str) -> Diverged:
    loss, ratio = float(metrics["loss"]), float(metrics.get("update_ratio", 0.0))
    if not np.isfinite(loss):
        why = f"non-finite loss ({loss})"
    elif max_update_ratio is not None and not ratio <= max_update_ratio:
        why = (f"an update {ratio:.3g} times the parameters' norm (the limit is guard_update_ratio = "
               f"{max_update_ratio:g})")
    else:
        why = "non-finite parameters or optimiser state after the update"
    return Diverged(
        f"step {step + 1} refused: {why}. The state was left at step {step}, checkpointed in {ckpt_dir}; "
        f"rerunning the same command resumes there and retries the same batch: lower the learning rate "
        f"(--config.optim.lr) or check the data.", step)


class _Preemption:
    """SIGTERM -> a flag the loop reads between steps; a watchdog ends the process if the
    checkpoint is not written within ``grace_s`` seconds (the scheduler would kill it anyway)."""

    def __init__(self, grace_s: float):
        self.grace_s, self.requested, self.timer, self.previous = grace_s, False, None, None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live there
            self.previous = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_term(self, signum, frame):
        import threading

        if self.requested:
            return
        self.requested = True
        print(f"SIGTERM: stopping after this step with a checkpoint (grace {self.grace_s:g} s)", flush=True)
        self.timer = threading.Timer(self.grace_s, self._expired)
        self.timer.daemon = True
        self.timer.start()

    def _expired(self):
        print(f"SIGTERM: no checkpoint within the {self.grace_s:g} s grace period; exiting; resume from the "
              f"last checkpoint written", file=sys.stderr, flush=True)
        os._exit(143)

    def any_host(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))  # stop together

    def __exit__(self, *exc):
        import signal

        if self.timer is not None:
            self.timer.cancel()
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def run_loop(step_fn, state, iterator, mesh, mngr, *, start: int, steps: int, workdir: str, log_every: int,
             samples_per_step: int, stop_after: int = 0, max_update_ratio: float | None = None,
             preemption_grace_s: float = 30.0, log_keys: tuple[str, ...] = ("loss",), after_step=None):
    """The training loop shared by the trainers; returns ``(state, last metrics)``.

    A checkpoint at step s is written after batch s was consumed (so resume continues with
    batch s + 1). ``stop_after`` > 0 stops after that step as if pre-empted. A step the guard
    refused (``metrics["step_ok"]`` false: the step returned the previous state) leaves a
    checkpoint of that previous state, with the data position before the refused batch, and
    raises :class:`Diverged`. SIGTERM stops the run after the current step with a checkpoint
    and raises :class:`Preempted`.
    """
    from decipher_jax import checkpoint as ckpt
    from decipher_jax.data import pipelines as P

    logger = Logger(workdir, every=log_every, keys=log_keys)
    metrics = {}
    try:
        with jax.set_mesh(mesh), _Preemption(preemption_grace_s) as term:
            for step in range(start, steps):
                before = iterator.get_state()
                state, metrics = step_fn(state, P.to_global(next(iterator), mesh))
                if not bool(metrics.get("step_ok", np.isfinite(float(metrics["loss"])))):
                    iterator.set_state(before)  # the checkpoint's data position: the refused batch comes next
                    mngr.wait_until_finished()
                    if step not in (mngr.all_steps() or ()):  # it may exist already (saved after the last step)
                        ckpt.save(mngr, step, state, iterator, force=True)
                        mngr.wait_until_finished()
                    raise _diverged(step, metrics, max_update_ratio, layout.RunDir(workdir).checkpoints)
                logger.log(step + 1, metrics, samples_per_step=samples_per_step)
                preempted = term.any_host()
                done = after_step is not None and bool(after_step(step + 1, state))
                stop = step + 1 == steps or step + 1 == stop_after or preempted or done
                ckpt.save(mngr, step + 1, state, iterator, force=stop)
                if stop:
                    mngr.wait_until_finished()
                    if preempted:
                        raise Preempted(f"pre-empted (SIGTERM) after step {step + 1}; checkpoint written in "
                                        f"{layout.RunDir(workdir).checkpoints}; rerun the same command to resume",
                                        step + 1)
                    break
        mngr.wait_until_finished()
    finally:
        logger.close()
    return state, {k: float(np.asarray(v)) for k, v in metrics.items()}


class WorkdirLocked(RuntimeError):
    """Another trainer holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """An exclusive lock on ``workdir/.lock`` for one training run (process 0; local paths).

    Two trainers on one workdir would interleave checkpoints and ``metrics.jsonl``. The lock
    is ``flock``: the kernel drops it when the holder dies, even by ``kill -9``, so a stale
    lock file never blocks a rerun. The file names its holder (pid, host, start time).
    """
    import fcntl
    import socket

    if "://" in workdir or _process_id() != 0:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = layout.RunDir(workdir).lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "an unknown process"
            raise WorkdirLocked(f"{workdir} is in use by another trainer ({holder}); lock file {path}. "
                                f"Wait for it to finish or stop it, or train in another workdir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _process_id() -> int:
    """This host's process index, from the environment: asking jax would start its backends
    before ``jax.distributed.initialize`` (which must come first) has run."""
    for var in ("DECIPHER_PROCESS_ID", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    return 0


def locked(train_fn):
    """Decorates a trainer's ``train(cfg, workdir)`` with :func:`workdir_lock`."""

    @functools.wraps(train_fn)
    def wrapper(cfg, workdir: str, *args, **kwargs):
        with workdir_lock(workdir):
            return train_fn(cfg, workdir, *args, **kwargs)

    return wrapper


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



def make_mesh(cfg, name: str):
    """Multi-host initialisation, then ``cfg.mesh`` over every device (printed with ``name``)."""
    from decipher_jax import sharding as sh

    initialize_distributed()
    mesh = sh.make_mesh(dict(cfg.mesh))
    print(f"{name}: {host_note()}, mesh {dict(mesh.shape)}", flush=True)
    return mesh


# -- one trainer interface ----------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """One trainer for one config on one mesh, as :func:`train` and ``experiments/aot_compile.py``
    use it. Building it reads no weights and no data: ``init`` and ``data`` do, when called.

    ``step(state, batch, *extras)`` is the unjitted step; ``extras`` are what ``on_start``
    returned (replicated side inputs such as a locked tower's feature table).
    """

    kind: str  # the run kind written in run_spec.json
    cfg: Any
    mesh: Any
    model: Model
    tx: Any  # optax.GradientTransformation
    shardings: dict  # of the train state
    shapes: dict  # the train state's ShapeDtypeStructs
    step: Callable
    batch_spec: dict  # {name: (shape, dtype)} of one global batch
    init: Callable[[], dict]  # a fresh train state on ``shardings`` (reads initial weights)
    data: Callable[[], Iterator]  # the training iterator; its position is checkpointed
    spec: Callable[[], Any]  # the runspec.RunSpec to write
    log_keys: tuple[str, ...] = ("loss",)
    # (state, workdir, fresh) -> the step's extras; fresh: no checkpoint was restored
    on_start: Callable[[dict, str, bool], tuple] | None = None
    # (state, metrics, workdir) -> metrics, after the loop returned (cfg.steps or stop_after)
    on_end: Callable[[dict, dict, str], dict] | None = None
    # (step, state) -> True to stop after that step (early stopping); see run_loop
    after_step: Callable[[int, dict], bool] | None = None
    # (workdir) -> True when an earlier run of this workdir stopped early: no further steps
    stopped: Callable[[str], bool] | None = None
    vit: Any = None  # model configs where the trainer has them (ViTConfig, BertConfig, TowersConfig)
    bert: Any = None
    towers: Any = None
    frozen: dict = dataclasses.field(default_factory=dict)  # tower -> frozen by the optimiser rules

    def abstract_state(self) -> dict:
        return abstract(self.shapes, self.shardings)

    def abstract_batch(self) -> dict:
        from decipher_jax import sharding as sh

        return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sh.batch_sharding(self.mesh, len(shape)))
                for k, (shape, dt) in self.batch_spec.items()}

    def jit_step(self, n_extras: int = 0):
        return jax.jit(self.step, in_shardings=(self.shardings, None) + (None,) * n_extras,
                       out_shardings=(self.shardings, None), donate_argnums=(0,))


def train(s: Setup, workdir: str) -> dict:
    """Runs (or resumes) ``s`` in ``workdir``; returns the last metrics (and ``on_end``'s).

    The order matters for exact resume: the data iterator exists before the restore (its
    position is restored with the state), the run spec is compared before any checkpoint is
    read (a refused resume touches nothing), and a fresh state is built only when there is
    no checkpoint.
    """
    from decipher_jax import checkpoint as ckpt
    from decipher_jax import runspec

    cfg = s.cfg
    os.makedirs(workdir, exist_ok=True)
    iterator = s.data()
    mngr = ckpt.manager(layout.RunDir(workdir).checkpoints, max_to_keep=cfg.keep_checkpoints,
                        save_interval_steps=cfg.checkpoint_every, async_save=cfg.async_checkpoints)
    runspec.start(workdir, s.spec(), resume_step=mngr.latest_step(), is_main=jax.process_index() == 0)
    restored = ckpt.restore(mngr, s.abstract_state(), iterator)
    if restored:
        start, state = restored
        print(f"resumed from step {start}", flush=True)
    else:
        start, state = 0, s.init()
    extras = tuple(s.on_start(state, workdir, not restored)) if s.on_start else ()
    jitted = s.jit_step(len(extras))
    steps = start if restored and s.stopped is not None and s.stopped(workdir) else cfg.steps
    state, metrics = run_loop(lambda st, b: jitted(st, b, *extras), state, iterator, s.mesh, mngr, start=start,
                              steps=steps, workdir=workdir, log_every=cfg.log_every,
                              samples_per_step=cfg.data.batch_size, stop_after=cfg.get("stop_after", 0),
                              max_update_ratio=cfg.guard_update_ratio, preemption_grace_s=cfg.preemption_grace_s,
                              log_keys=s.log_keys, after_step=s.after_step)
    if s.on_end is not None:
        metrics = s.on_end(state, metrics, workdir)
    return metrics


def tokenizer_dir(path) -> str:
    """An existing local path made absolute (a run is read later from other working directories)."""
    path = str(path)
    return os.path.abspath(path) if path and "://" not in path and os.path.exists(path) else path
