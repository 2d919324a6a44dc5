"""GPU correctness checks: the same functions on the accelerator and on the host CPU.

    python benchmarks/gpu_checks.py            # on a machine with a GPU (jax[cuda], torch, monai)

Each check draws fresh random inputs and compares the accelerator's result with a float64/float32
CPU reference by relative error ||out - ref|| / ||ref||, against a tolerance fitting the precision:
- ViT3D forward, float32 at 'highest' precision on the GPU vs the CPU:       < 1e-5
- ViT3D forward, bf16 compute with cuDNN attention on the GPU vs CPU fp32:  < 2e-2
- ViT3D on the GPU vs MONAI's ViT on the GPU (weights converted), fp32:      < 1e-5
- the stage-1 SSL step (student, EMA teacher, DINO + iBOT + KoLeo, AdamW), one step on a
  GPU mesh vs a CPU mesh, 5 steps on a fixed batch: float32 at 'highest', losses and final state
  < 1e-3; bf16 compute on the GPU, losses within 5e-2 of the CPU's fp32 ones
- 64 vmapped logistic probes fitted on the GPU vs on the CPU: weights < 1e-3, predictions agree
Prints a table and exits non-zero if a check fails.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import random_batch, table  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def on(device, tree):
    return jax.device_put(tree, device)


def vit_checks(rng, gpu, cpu):
    from flax import nnx

    from decipher_jax.models.vit3d import ViT3D, ViTConfig

    rows = []
    base = dict(dim=384, depth=4, heads=6, mlp_dim=1536, patch_size=16, img_size=64, cls_token=True)
    x = rng.standard_normal((2, 64, 64, 64, 1)).astype(np.float32)

    def forward(cfg, device):
        with jax.default_device(device):
            model = ViT3D(cfg, rngs=nnx.Rngs(0))
            graphdef, state = nnx.split(model)
            f = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v)["patch"].astype(jnp.float32))
            return np.asarray(f(on(device, state), on(device, x)))

    with jax.default_matmul_precision("highest"):
        ref = forward(ViTConfig(**base), cpu)
        g32 = forward(ViTConfig(**base), gpu)
    rows.append(["ViT3D fp32 (highest), GPU vs CPU", f"{rel(g32, ref):.2e}", "1e-5", rel(g32, ref) < 1e-5])
    impl = "cudnn" if gpu.platform == "gpu" else None
    g16 = forward(ViTConfig(**base, dtype="bfloat16", attention_impl=impl), gpu)
    rows.append(["ViT3D bf16 + cuDNN attention, GPU vs CPU fp32", f"{rel(g16, ref):.2e}", "2e-2", rel(g16, ref) < 2e-2])
    return rows


def monai_check(rng, gpu):
    import torch
    from monai.networks.nets import ViT as MonaiViT

    from decipher_jax.interop import monai_vit

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args = dict(in_channels=1, img_size=(64, 64, 64), patch_size=(16, 16, 16), hidden_size=384, mlp_dim=1536,
                num_layers=4, num_heads=6)
    torch.manual_seed(0)
    m = MonaiViT(**args, classification=True, qkv_bias=True, dropout_rate=0.0).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.05 * torch.randn_like(p))
    m = m.cuda()
    x = rng.standard_normal((2, 64, 64, 64, 1)).astype(np.float32)
    with torch.no_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))).cuda()
        h = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embedding(xt)], dim=1)
        for blk in m.blocks:
            h = blk(h)
        ref = m.norm(h)[:, 1:].cpu().numpy()
    sd = {k: v.cpu().numpy() for k, v in m.state_dict().items()}
    cfg = monai_vit.config_from_monai(**args, classification=True, qkv_bias=True)
    with jax.default_device(gpu), jax.default_matmul_precision("highest"):
        ours = np.asarray(monai_vit.load_monai(sd, cfg)(jnp.asarray(x))["patch"])
    return [["ViT3D vs MONAI ViT, both on the GPU, fp32", f"{rel(ours, ref):.2e}", "1e-5", rel(ours, ref) < 1e-5]]


def ssl_checks(rng):
    from decipher_jax import sharding as sh
    from decipher_jax.trainers import common, vision_ssl

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "vision_ssl.py") + ":tiny"
    rows = []

    def run_steps(cfg, devices, batch, steps):
        mesh = sh.make_mesh({"data": -1}, devices=devices)
        with jax.set_mesh(mesh):
            b = vision_ssl.setup(cfg, mesh)
            state = b.init()
            put = jax.device_put(batch, jax.NamedSharding(mesh, jax.P()))
            f = jax.jit(b.step)
            losses = []
            for _ in range(steps):
                state, m = f(state, put)
                losses.append(float(m["loss"]))
            return losses, jax.tree.map(np.asarray, state)

    cfg = common.load_config(path)
    batch = random_batch(vision_ssl.batch_spec(cfg), rng)
    with jax.default_matmul_precision("highest"):
        lc, sc = run_steps(cfg, jax.devices("cpu")[:1], batch, steps=5)
        lg, sg = run_steps(cfg, jax.devices()[:1], batch, steps=5)
    e_loss = max(abs(g - c) / abs(c) for g, c in zip(lg, lc))
    e_par = max(rel(a, b) for a, b in zip(jax.tree.leaves(sg), jax.tree.leaves(sc))
                if np.issubdtype(np.asarray(b).dtype, np.floating) and np.linalg.norm(b) > 0)
    rows.append(["stage-1 SSL, 5 fp32 steps, GPU vs CPU: worst loss", f"{e_loss:.2e}", "1e-3", e_loss < 1e-3])
    rows.append(["stage-1 SSL, 5 fp32 steps, GPU vs CPU: worst state leaf", f"{e_par:.2e}", "1e-3", e_par < 1e-3])
    cfg.model.vit.dtype = "bfloat16"
    lb, _ = run_steps(cfg, jax.devices()[:1], batch, steps=5)
    e16 = max(abs(g - c) / abs(c) for g, c in zip(lb, lc))
    ok = bool(np.all(np.isfinite(lb)) and e16 < 5e-2)
    rows.append(["stage-1 SSL, 5 bf16 steps on the GPU vs CPU fp32: worst loss", f"{e16:.2e}", "5e-2, finite", ok])
    return rows


def probe_check(rng, gpu, cpu):
    from decipher_jax.eval import probes

    n, d, p = 2000, 128, 64
    x = rng.standard_normal((n, d)).astype(np.float32)
    dirs = rng.standard_normal((p, d))
    ys = ((x @ dirs.T + rng.standard_normal((n, p))) > 0).astype(np.int32).T
    ws = (rng.random((p, n)) < 0.7).astype(np.float32)
    c = 10.0 ** rng.uniform(-2, 1, p)
    masks = np.ones((p, 2), bool)
    out = {}
    for name, dev in (("cpu", cpu), ("gpu", gpu)):
        with jax.default_device(dev), jax.default_matmul_precision("highest"):
            out[name] = jax.tree.map(np.asarray, probes.fit_many(x, ys, ws, c, masks, iters=100))
    e = rel(out["gpu"]["w"], out["cpu"]["w"])
    pred = {k: np.argmax(np.einsum("nd,pdc->pnc", x, v["w"]) + v["b"][:, None], -1) for k, v in out.items()}
    agree = float(np.mean(pred["gpu"] == pred["cpu"]))
    return [["64 vmapped L-BFGS probes, GPU vs CPU weights", f"{e:.2e}", "1e-3", e < 1e-3],
            ["  same, prediction agreement", f"{agree:.4f}", ">= 0.999", agree >= 0.999]]


def main() -> int:
    from decipher_jax import env

    env.setup()  # absl flags parsed (grain), offline
    gpu, cpu = jax.devices()[0], jax.devices("cpu")[0]
    print(f"# accelerator: {gpu.device_kind} ({gpu.platform}); jax {jax.__version__}")
    rows = []
    for name, fn in (("vit", lambda r: vit_checks(r, gpu, cpu)), ("monai", lambda r: monai_check(r, gpu)),
                     ("ssl", ssl_checks), ("probes", lambda r: probe_check(r, gpu, cpu))):
        t0 = time.perf_counter()
        try:
            got = fn(np.random.default_rng(int.from_bytes(os.urandom(4), "little")))
        except Exception as e:  # a broken check is a failed check, the others still run
            import traceback

            traceback.print_exc()
            got = [[f"{name}: raised {type(e).__name__}: {str(e)[:120]}", "-", "-", False]]
        rows += got
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(table(["check", "relative error / value", "tolerance", "pass"], rows))
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
