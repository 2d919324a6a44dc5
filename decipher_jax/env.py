"""The process environment, set in one place: offline Hugging Face, simulated CPU devices, absl.

    from decipher_jax import env

    env.setup(devices=8)   # before importing jax: 8 simulated CPU devices, offline, absl parsed
    import jax

:func:`setup` is what the CLI, the demo, the tests, the benchmarks and the notebook call. It

- sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` unless already set (``offline``);
- with ``devices`` (and a CPU or unspecified platform), appends
  ``--xla_force_host_platform_device_count=N`` to ``XLA_FLAGS``, unless ``XLA_FLAGS`` already
  sets a count (the caller's environment wins);
- with ``platform``, sets ``JAX_PLATFORMS``;
- marks absl's flags parsed (grain reads them).

It never imports jax. Environment variables only reach jax before its backends start (the first
``jax.devices()`` or array), so when jax already started them with another device count or
platform, :func:`setup` warns (:class:`DeviceSetupWarning`) with what to do instead of silently
doing nothing. For a child process, :func:`subprocess_env` returns the same settings as an
environment dict.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Mapping, MutableMapping

COUNT_FLAG = "--xla_force_host_platform_device_count"
_COUNT_RE = re.compile(r"--xla_force_host_platform_device_count=(\d+)")
_GPU = {"cuda": "gpu", "rocm": "gpu"}  # JAX_PLATFORMS names -> jax.default_backend()


class DeviceSetupWarning(RuntimeWarning):
    """The device settings came too late: jax had already started its backends."""


def forced_device_count(xla_flags: str | None) -> int | None:
    """The host device count an ``XLA_FLAGS`` value sets (the last one), else None."""
    found = _COUNT_RE.findall(xla_flags or "")
    return int(found[-1]) if found else None


def with_device_count(xla_flags: str | None, devices: int) -> str:
    """``xla_flags`` with ``--xla_force_host_platform_device_count=devices`` appended, unless it
    already sets a count (then unchanged)."""
    xla_flags = xla_flags or ""
    if forced_device_count(xla_flags) is not None:
        return xla_flags
    return (xla_flags + f" {COUNT_FLAG}={devices}").strip()


def _without(xla_flags: str | None, prefix: str) -> str:
    return " ".join(f for f in (xla_flags or "").split() if not f.startswith(prefix))


def without_device_count(xla_flags: str | None) -> str:
    """``xla_flags`` without its ``--xla_force_host_platform_device_count`` settings."""
    return _without(xla_flags, COUNT_FLAG + "=")


CPU_FLAG_PREFIX = "--xla_cpu_"


def cpu_only_flags_removed(xla_flags: str | None) -> str:
    """``xla_flags`` without its ``--xla_cpu_*`` flags. libtpu's compiler parses ``XLA_FLAGS``
    itself at its first compile and aborts the process on a flag it does not know, which the
    XLA:CPU ones are (an AOT compile for a TPU pod on a CPU host that tunes XLA:CPU)."""
    return _without(xla_flags, CPU_FLAG_PREFIX)


def before_tpu_compile() -> None:
    """Drops XLA:CPU's flags from ``XLA_FLAGS`` before libtpu reads it, once the CPU backend has
    started with them (it reads them at start, so it keeps them). Imports jax."""
    flags = os.environ.get("XLA_FLAGS", "")
    if not any(f.startswith(CPU_FLAG_PREFIX) for f in flags.split()):
        return
    import jax

    try:
        jax.devices("cpu")  # the CPU backend starts (if it had not) with the flags it was given
    except RuntimeError:  # no CPU platform in JAX_PLATFORMS: nothing reads the CPU flags
        pass
    os.environ["XLA_FLAGS"] = cpu_only_flags_removed(flags)


def _cpu_platform(platform: str | None, environ: Mapping[str, str]) -> bool:
    """Whether the simulated host devices can matter: CPU asked for, or the platform unknown."""
    wanted = platform if platform is not None else environ.get("JAX_PLATFORMS", "")
    return not wanted or "cpu" in wanted.lower().split(",")


def prepare(environ: MutableMapping[str, str], devices: int | None = None, platform: str | None = None,
            offline: bool = True) -> MutableMapping[str, str]:
    """Applies :func:`setup`'s environment variables to ``environ`` (a dict or ``os.environ``)."""
    if offline:
        environ.setdefault("HF_HUB_OFFLINE", "1")
        environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if platform is not None:
        environ["JAX_PLATFORMS"] = platform
    if devices is not None and _cpu_platform(platform, environ):
        environ["XLA_FLAGS"] = with_device_count(environ.get("XLA_FLAGS"), int(devices))
    return environ


def subprocess_env(devices: int | None = None, platform: str | None = None, offline: bool = True,
                   base: Mapping[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) without the ``drop`` variables, prepared as
    :func:`setup` would: the ``env=`` of a child process that imports jax itself. ``devices``
    is the child's device count: it replaces the one inherited in ``XLA_FLAGS``, whose other
    flags the child keeps."""
    environ = {k: v for k, v in (os.environ if base is None else base).items() if k not in drop}
    if devices is not None and "XLA_FLAGS" in environ:
        environ["XLA_FLAGS"] = without_device_count(environ["XLA_FLAGS"])
    return dict(prepare(environ, devices=devices, platform=platform, offline=offline))


def mark_flags_parsed() -> None:
    """absl's flags marked parsed (grain reads them; nothing here has an absl ``main``)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def jax_started() -> bool:
    """Whether jax is imported and has initialised its backends (then XLA_FLAGS / JAX_PLATFORMS
    no longer take effect in this process). Never imports jax."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a jax without the private module
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    if started is None:  # pragma: no cover - older jax
        return bool(getattr(xla_bridge, "_backends", {}))
    return bool(started())


def _check_started(devices: int | None, platform: str | None) -> None:
    """Warns when jax already runs with another device count or platform than asked for."""
    if not jax_started():
        return  # not imported, or imported but not started: the environment still takes effect
    import jax

    args = ([f"devices={devices}"] if devices is not None else []) + (
        [f"platform={platform!r}"] if platform is not None else [])
    asked = f"decipher_jax.env.setup({', '.join(args)})"
    problems = []
    backend = jax.default_backend()
    if platform is not None and backend not in {_GPU.get(p, p) for p in platform.lower().split(",")}:
        problems.append(f"it already runs on {backend!r}, not {platform!r}")
    want = forced_device_count(os.environ.get("XLA_FLAGS"))
    if devices is not None and want is not None and _cpu_platform(platform, os.environ):
        try:
            have = len(jax.devices("cpu"))
        except RuntimeError:  # no CPU backend in this process (JAX_PLATFORMS without cpu)
            have = None
        if have is not None and have != want:
            problems.append(f"it already started with {have} CPU device(s), not {want}")
    if problems:
        variable = f"XLA_FLAGS={COUNT_FLAG}={want}" if want is not None else f"JAX_PLATFORMS={platform}"
        warnings.warn(
            f"jax was imported before {asked} and {'; '.join(problems)}: the setting cannot take effect in this "
            f"process. Restart the kernel (or the process) and call decipher_jax.env.setup() before importing "
            f"jax, or set {variable} in the environment before Python starts.", DeviceSetupWarning, stacklevel=3)


def setup(devices: int | None = None, platform: str | None = None, offline: bool = True) -> None:
    """Sets the process environment for decipher_jax (see the module docstring); idempotent.

    ``devices``: simulated CPU devices (ignored when ``platform`` / ``JAX_PLATFORMS`` names no
    CPU). ``platform``: ``JAX_PLATFORMS`` (e.g. ``"cpu"``). ``offline``: no Hugging Face downloads.
    Call it before importing jax; after jax started its backends it can only warn.
    """
    prepare(os.environ, devices=devices, platform=platform, offline=offline)
    mark_flags_parsed()
    _check_started(devices, platform)
