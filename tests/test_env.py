"""decipher_jax.env: one setup of the process environment (offline, simulated devices, absl),
idempotent, and loud when jax started before it."""

import os
import subprocess
import sys
import warnings

from absl import flags

from decipher_jax import env

COUNT = "--xla_force_host_platform_device_count"


def _run(code: str, **kw) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose environment has no XLA_FLAGS (not the session's 8 devices)."""
    e = env.subprocess_env(platform="cpu", drop=("XLA_FLAGS",), **kw)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)


def test_setup_sets_the_environment_once(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "JAX_PLATFORMS"):
        monkeypatch.delenv(k, raising=False)  # restored after the test
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the session's jax (8 CPU devices) agrees: no warning
        for _ in range(3):
            env.setup(devices=8, platform="cpu")
    assert os.environ["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {COUNT}=8"
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    assert flags.FLAGS.is_parsed()


def test_prepare_keeps_what_the_caller_set():
    e = env.prepare({"HF_HUB_OFFLINE": "0", "XLA_FLAGS": f"{COUNT}=2"}, devices=8)
    assert e == {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1", "XLA_FLAGS": f"{COUNT}=2"}
    assert env.prepare(dict(e), devices=8) == e  # idempotent
    assert env.prepare({}, devices=4, platform="cpu", offline=False) == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{COUNT}=4"}
    # Simulated host devices only where the CPU is (or may be) the platform.
    assert "XLA_FLAGS" not in env.prepare({}, devices=4, platform="tpu")
    assert "XLA_FLAGS" not in env.prepare({"JAX_PLATFORMS": "cuda"}, devices=4)
    assert env.prepare({"JAX_PLATFORMS": "cpu,tpu"}, devices=4)["XLA_FLAGS"] == f"{COUNT}=4"
    assert env.forced_device_count(f"--a=1 {COUNT}=3 --b") == 3 and env.forced_device_count(None) is None
    # libtpu aborts on XLA:CPU flags; the rest stays (tests/test_aot.py compiles with them set).
    assert env.cpu_only_flags_removed(f"--xla_cpu_use_fusion_emitters=false --a=1 {COUNT}=8") == f"--a=1 {COUNT}=8"
    assert env.without_device_count(f"--a=1 {COUNT}=3 --b {COUNT}=8") == "--a=1 --b"


def test_subprocess_env_is_a_prepared_copy(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"{COUNT}=8")
    e = env.subprocess_env(devices=2, drop=("XLA_FLAGS",))
    assert e["XLA_FLAGS"] == f"{COUNT}=2" and e["HF_HUB_OFFLINE"]
    assert os.environ["XLA_FLAGS"] == f"{COUNT}=8"  # the parent's environment is untouched
    # A child's count replaces the inherited one; its other XLA flags stay (the multi-host test).
    monkeypatch.setenv("XLA_FLAGS", f"--a=1 {COUNT}=8 --b")
    assert env.subprocess_env(devices=2)["XLA_FLAGS"] == f"--a=1 --b {COUNT}=2"
    assert env.subprocess_env()["XLA_FLAGS"] == f"--a=1 {COUNT}=8 --b"  # no count asked: inherited


def test_setup_before_jax_gives_the_devices():
    r = _run("import warnings; warnings.simplefilter('error')\n"
             "from decipher_jax import env\nenv.setup(devices=4)\nimport jax\nprint(jax.device_count())")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "4"


def test_setup_after_import_jax_but_before_its_backends_still_works():
    r = _run("import warnings; warnings.simplefilter('error')\n"
             "import jax\nfrom decipher_jax import env\nenv.setup(devices=4)\nprint(jax.device_count())")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "4"


def test_setup_after_jax_started_says_what_to_do():
    r = _run("import jax\njax.devices()\nfrom decipher_jax import env\nenv.setup(devices=8)\n"
             "print(jax.device_count())")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "1"  # too late: jax keeps its one CPU device ...
    msg = " ".join(r.stderr.split())
    assert "DeviceSetupWarning" in msg  # ... and says so
    assert "jax was imported before decipher_jax.env.setup(devices=8)" in msg
    assert "1 CPU device(s), not 8" in msg
    assert "Restart the kernel" in msg and f"XLA_FLAGS={COUNT}=8" in msg


def test_the_warning_can_be_made_an_error():
    r = _run("import warnings\nfrom decipher_jax import env\nwarnings.simplefilter('error', env.DeviceSetupWarning)\n"
             "import jax\njax.devices()\nenv.setup(devices=8)")
    assert r.returncode != 0 and "DeviceSetupWarning" in r.stderr
