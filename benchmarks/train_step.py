"""Training-step throughput and MFU: our 3D ViT vs MONAI's ViT, and the full stage-1 SSL step.

    python benchmarks/train_step.py                                   # CPU-sized defaults
    python benchmarks/train_step.py --variant B/16 --size 128 --batch 8 --dtype bfloat16 --compile   # on a GPU

Rows:
- backbone: ViT forward + backward + AdamW on (batch, size^3, 1) volumes, ours (jax.jit) vs
  MONAI ``ViT`` (torch; ``--compile`` wraps it in ``torch.compile``), same shapes and dtype.
- stage-1: the real ``vision_ssl`` step (student + EMA teacher, heads, multi-crop) at the
  tiny config's shapes scaled by ``--variant``.
MFU = analytic model FLOPs per second / measured peak (a large matmul in the same dtype on the
same device); XLA's own FLOP count of the compiled step is shown beside the analytic one.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import machine, table  # noqa: E402

VARIANTS = {"Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096)}


def timeit(fn, warmup=2, iters=5):
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def matmul_peak(dtype, n=4096 if jax.default_backend() != "cpu" else 1024):
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    dt = timeit(lambda: f(a).block_until_ready(), iters=10)
    return 2 * n**3 / dt


def ours_backbone(args, dim, depth, heads, mlp):
    import optax
    from flax import nnx

    from decipher_jax.aot import vit_train_flops
    from decipher_jax.models.vit3d import ViT3D, ViTConfig
    from decipher_jax.trainers.common import merge_pure

    p = int(args.variant.split("/")[1])
    cfg = ViTConfig(dim=dim, depth=depth, heads=heads, mlp_dim=mlp, patch_size=p, img_size=args.size, cls_token=False,
                    qkv_bias=False, dtype=args.dtype, remat=args.remat, scan=False,
                    attention_impl="cudnn" if jax.default_backend() == "gpu" and args.dtype == "bfloat16" else None)
    graphdef, state = nnx.split(ViT3D(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    tx = optax.adamw(1e-4)
    opt = tx.init(params)
    x = jnp.ones((args.batch, args.size, args.size, args.size, 1), jnp.float32)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # as in the trainers: update in place
    def step(params, opt, x):
        def loss(p):
            return jnp.mean(merge_pure(graphdef, state, p)(x)["patch"].astype(jnp.float32) ** 2)

        l, g = jax.value_and_grad(loss)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, l

    compiled = step.lower(params, opt, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    box = [params, opt]

    def run():
        box[0], box[1], l = compiled(box[0], box[1], x)
        l.block_until_ready()

    dt = timeit(run)
    return dt, vit_train_flops(cfg, args.batch, (args.size,) * 3), float(cost.get("flops", np.nan))


def monai_backbone(args, dim, depth, heads, mlp):
    import torch
    from monai.networks.nets import ViT

    p = int(args.variant.split("/")[1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = ViT(1, (args.size,) * 3, (p,) * 3, hidden_size=dim, mlp_dim=mlp, num_layers=depth, num_heads=heads,
            dropout_rate=0.0).to(dev)
    opt = torch.optim.AdamW(m.parameters(), 1e-4)
    fwd = torch.compile(m) if args.compile else m
    x = torch.ones(args.batch, 1, args.size, args.size, args.size, device=dev)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def run():
        with amp:
            out, _ = fwd(x)
            loss = (out.float() ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    return timeit(run)


def ssl_step(args):
    from decipher_jax import sharding as sh
    from decipher_jax.aot import vit_train_flops
    from decipher_jax.trainers import common, vision_ssl

    cfg = common.load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                                          "vision_ssl.py") + ":tiny")
    dim, depth, heads, mlp = VARIANTS[args.variant.split("/")[0]]
    cfg.model.vit.update(dim=dim, depth=depth, heads=heads, mlp_dim=mlp, dtype=args.dtype)
    cfg.data.batch_size = args.batch
    mesh = sh.make_mesh({"data": -1})
    b = vision_ssl.build(cfg, mesh)
    state = jax.jit(b["init"], out_shardings=b["state_shardings"])(jax.random.key(0))
    r = np.random.default_rng(0)
    batch = {k: jnp.asarray(r.random(shape) < 0.3 if dt == jnp.bool_ else r.random(shape), dt)
             for k, (shape, dt) in vision_ssl.batch_spec(cfg).items()}
    f = jax.jit(b["step"], donate_argnums=(0,))
    box = [state]

    def run():
        box[0], m = f(box[0], batch)
        m["loss"].block_until_ready()

    dt = timeit(run)
    vit = b["vit"]
    fwd = lambda n, s: vit_train_flops(vit, n, s) / 3  # noqa: E731
    flops = fwd(2 * args.batch, cfg.data.global_size) * 4 + fwd(cfg.data.n_local * args.batch, cfg.data.local_size) * 3
    return dt, flops, cfg


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="S/16")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--compile", action="store_true", help="torch.compile the MONAI model")
    p.add_argument("--skip-monai", action="store_true")
    args = p.parse_args(argv)
    dims = VARIANTS[args.variant.split("/")[0]]
    peak = matmul_peak(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    rows = []
    dt, flops, xla = ours_backbone(args, *dims)
    rows.append([f"backbone ViT-{args.variant} {args.size}^3", "decipher_jax", f"{1 / dt:.2f}", f"{args.batch / dt:.1f}",
                 f"{flops / dt / peak:.1%}", f"{flops / 1e9:.1f} / {xla / 1e9:.1f}"])
    if not args.skip_monai:
        mdt = monai_backbone(args, *dims)
        rows.append(["", f"MONAI ViT{' (torch.compile)' if args.compile else ''}", f"{1 / mdt:.2f}",
                     f"{args.batch / mdt:.1f}", f"{flops / mdt / peak:.1%}", ""])
        rows.append(["", "speed-up", f"{mdt / dt:.2f}x", "", "", ""])
    sdt, sflops, cfg = ssl_step(args)
    rows.append([f"stage-1 SSL step ViT-{args.variant.split('/')[0]}/8, 2x{cfg.data.global_size[0]}^3 + "
                 f"{cfg.data.n_local}x{cfg.data.local_size[0]}^3", "decipher_jax", f"{1 / sdt:.2f}",
                 f"{args.batch / sdt:.1f}", f"{sflops / sdt / peak:.1%}", f"{sflops / 1e9:.1f} / -"])
    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), {args.dtype}, batch {args.batch}; "
          f"measured matmul peak {peak / 1e12:.2f} TFLOP/s; {machine()}")
    print(table(["step", "implementation", "steps/s", "volumes/s", "MFU", "GFLOP/step analytic / XLA"], rows))


if __name__ == "__main__":
    main()
