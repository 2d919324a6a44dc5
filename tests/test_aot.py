"""AOT compilation for a TPU topology on this CPU host (needs libtpu from the tpu-aot extra)."""

import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu")

from decipher_jax import aot  # noqa: E402
from decipher_jax.models.vit3d import ViT3D, ViTConfig  # noqa: E402


def test_vit_step_compiles_for_v5e_with_memory_and_flops():
    cfg = ViTConfig(dim=128, depth=2, heads=4, mlp_dim=512, patch_size=8, img_size=32, dtype="bfloat16")

    def loss(model, b):
        return jnp.mean(model(b["image"])["cls"].astype(jnp.float32) ** 2)

    r = aot.compile_train_step("tiny", lambda k: ViT3D(cfg, rngs=k), loss,
                               {"image": ((8, 32, 32, 32, 1), jnp.bfloat16)}, "v5e:2x2", {"data": 2, "fsdp": 2},
                               analytic_flops=aot.vit_train_flops(cfg, 8, (32, 32, 32)))
    assert r.chips == 4 and r.mesh == {"data": 2, "fsdp": 2, "tensor": 1}
    assert r.hbm_bytes == 16 * 2**30
    # Parameters + AdamW moments (fp32) sharded 2-way over fsdp bound the argument bytes from below.
    n_params = 2 * (3 * 128 * 128 + 128 * 128 + 2 * 128 * 512) + 8**3 * 128 + 4**3 * 128
    assert r.argument_bytes >= 3 * 4 * n_params / 2
    # XLA's count of the per-chip program agrees with the analytic matmul count.
    assert 0.8 < r.xla_flops_per_chip / r.analytic_flops_per_chip < 1.3
    assert r.row().startswith("| tiny | v5e:2x2 | 4 | 2x2x1 |")


def test_batch_that_does_not_divide_is_refused():
    cfg = ViTConfig(dim=64, depth=1, heads=4, mlp_dim=128, patch_size=8, img_size=16)
    with pytest.raises(ValueError, match="batch/image"):
        aot.compile_train_step("bad", lambda k: ViT3D(cfg, rngs=k), lambda m, b: 0.0,
                               {"image": ((6, 16, 16, 16, 1), jnp.float32)}, "v5e:2x2", {"data": 4})


def _aot_script():
    """experiments/aot_compile.py as a module (it is a script, not part of the package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "aot_compile.py")
    spec = importlib.util.spec_from_file_location("aot_compile_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_text_mlm_step_compiles_from_its_config(tmp_path):
    """The stage-1 text trainer's real step (text_mlm.build), compiled for v5e:2x2 without weights."""
    script = _aot_script()
    out = tmp_path / "aot.md"
    assert script.main(["--step", "text_mlm", "--topology", "v5e:2x2", "--per-chip-batch", "2", "--text-layers", "1",
                        "--mesh", "fsdp=-1", "--markdown", str(out)]) == 0
    row = [line for line in out.read_text().splitlines() if "text MLM" in line]
    assert len(row) == 1 and "| v5e:2x2 | 4 |" in row[0], row


@pytest.mark.slow
def test_caption_step_with_lora_compiles_from_its_config(tmp_path):
    """Report generation's real step (trainers/caption.py) with a Llama-3.2-1B-width decoder (one
    layer here), LoRA adapters and frozen base weights, compiled for v5e:2x2 without data.

    Slow (107 s on CPU-2: the 128256-word vocabulary at width 2048): the caption step itself runs
    sharded in tests/test_caption.py and the LoRA freezing rule in tests/test_decoder.py; the
    full-size compile's figures are in BENCHMARKS.md."""
    script = _aot_script()
    out = tmp_path / "aot.md"
    assert script.main(["--step", "caption", "--topology", "v5e:2x2", "--per-chip-batch", "1", "--decoder-layers", "1",
                        "--size", "32", "--text-length", "16", "--mesh", "fsdp=-1", "--scan", "--markdown", str(out)]) == 0
    row = [line for line in out.read_text().splitlines() if "caption" in line]
    assert len(row) == 1 and "| v5e:2x2 | 4 |" in row[0], row


@pytest.mark.slow
def test_multiparam_step_compiles_from_its_config(tmp_path):
    """Multi-parametric pretraining's real step (trainers/multiparam.py) with a small ViT over four
    sequences, compiled for v5e:2x2 without weights or data (scanned layers: one layer to compile). Slow (57 s on CPU-2); the step
    itself runs sharded on a 2x2x2 mesh in tests/test_multiparam.py."""
    script = _aot_script()
    out = tmp_path / "aot.md"
    assert script.main(["--step", "multiparam", "--variant", "B/16", "--size", "32", "--topology", "v5e:2x2",
                        "--per-chip-batch", "1", "--mesh", "fsdp=-1", "--scan", "--markdown", str(out)]) == 0
    row = [line for line in out.read_text().splitlines() if "multiparam" in line]
    assert len(row) == 1 and "| v5e:2x2 | 4 |" in row[0] and "4-sequence" in row[0], row
