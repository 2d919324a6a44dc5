"""Training-step throughput and MFU: our 3D ViT vs MONAI's ViT, and the full stage-1 SSL step.

    python benchmarks/train_step.py                                   # CPU-sized defaults
    python benchmarks/train_step.py --variant B/16 --size 128 --batch 32 --dtype bfloat16 --compile   # on a GPU

Rows:
- backbone: ViT forward + backward + AdamW on (batch, size^3, 1) volumes, ours (jax.jit; the
  layers under ``lax.scan`` and unrolled, ``--layers``) vs
  MONAI ``ViT`` (torch, eager; ``--compile`` adds ``torch.compile`` rows, with MONAI's attention
  as shipped and with its ``use_flash_attention`` switch on), same shapes, dtype and optimizer.
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
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU's memory to torch too

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import machine, random_batch, table  # noqa: E402

VARIANTS = {"Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096)}


def timeit(fn, warmup=2, iters=5):
    """Median seconds per call over ``iters`` calls (each call synchronises) after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_peak(dtype, n=8192 if jax.default_backend() != "cpu" else 1024, reps=8):
    """The measured matmul rate, the best of JAX's and torch's on the same device.

    Random operands (zeros and ones run faster than real data), ``reps`` products chained inside
    one jit so that dispatch stays out of the time.
    """
    a = jax.random.normal(jax.random.key(0), (reps + 1, n, n), dtype) / np.sqrt(n)

    @jax.jit
    def chain(a):
        return jax.lax.fori_loop(0, reps, lambda i, acc: acc + a[i] @ a[i + 1], jnp.zeros((n, n), dtype))

    rates = {"jax": 2 * n**3 * reps / timeit(lambda: chain(a).block_until_ready(), warmup=2, iters=10)}
    try:
        import torch

        if jax.default_backend() == "gpu" and torch.cuda.is_available():
            tdt = {jnp.bfloat16: torch.bfloat16}.get(dtype, torch.float32)
            x = [torch.randn(n, n, device="cuda", dtype=tdt) for _ in range(reps + 1)]

            def run():
                for i in range(reps):
                    x[i] @ x[i + 1]
                torch.cuda.synchronize()

            rates["torch"] = 2 * n**3 * reps / timeit(run, warmup=2, iters=10)
            del x
    except ImportError:
        pass
    return max(rates.values()), rates


def ours_backbone(args, batch, dim, depth, heads, mlp):
    compiled, run, cfg = ours_backbone_step(args, batch, dim, depth, heads, mlp, with_cfg=True)
    from decipher_jax.aot import vit_train_flops

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    dt = timeit(run, iters=args.iters)
    return dt, vit_train_flops(cfg, batch, (args.size,) * 3), float(cost.get("flops", np.nan))


def ours_backbone_step(args, batch, dim, depth, heads, mlp, with_cfg=False):
    """(the compiled step, a call of it that waits for the result[, the ViT config])."""
    import optax
    from flax import nnx

    from decipher_jax.models.vit3d import ViT3D, ViTConfig
    from decipher_jax.state import merge_pure

    p = int(args.variant.split("/")[1])
    cfg = ViTConfig(dim=dim, depth=depth, heads=heads, mlp_dim=mlp, patch_size=p, img_size=args.size, cls_token=False,
                    qkv_bias=False, dtype=args.dtype, remat=args.remat, scan=args.scan,
                    attention_impl="cudnn" if jax.default_backend() == "gpu" and args.dtype == "bfloat16" else None)
    graphdef, state = nnx.split(ViT3D(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    tx = optax.adamw(1e-4)
    opt = tx.init(params)
    x = jax.random.normal(jax.random.key(1), (batch, args.size, args.size, args.size, 1), jnp.float32)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # as in the trainers: update in place
    def step(params, opt, x):
        def loss(p):
            return jnp.mean(merge_pure(graphdef, state, p)(x)["patch"].astype(jnp.float32) ** 2)

        l, g = jax.value_and_grad(loss)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, l

    compiled = step.lower(params, opt, x).compile()
    box = [params, opt]

    def run():
        box[0], box[1], l = compiled(box[0], box[1], x)
        l.block_until_ready()

    return (compiled, run, cfg) if with_cfg else (compiled, run)


def monai_backbone(args, batch, dim, depth, heads, mlp, *, compile=False, flash=False):
    import torch
    from monai.networks.nets import ViT

    p = int(args.variant.split("/")[1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = ViT(1, (args.size,) * 3, (p,) * 3, hidden_size=dim, mlp_dim=mlp, num_layers=depth, num_heads=heads,
            dropout_rate=0.0).to(dev)
    for blk in m.blocks:  # MONAI's own switch to torch's fused SDPA kernels (off by default in ViT)
        blk.attn.use_flash_attention = flash
    opt = torch.optim.AdamW(m.parameters(), 1e-4)
    fwd = torch.compile(m) if compile else m
    x = torch.randn(batch, 1, args.size, args.size, args.size, device=dev)
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

    return timeit(run, iters=args.iters)


def ssl_step(args):
    from decipher_jax import sharding as sh
    from decipher_jax.aot import vit_train_flops
    from decipher_jax.trainers import common, vision_ssl

    cfg = common.load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                                          "vision_ssl.py") + ":tiny")
    dim, depth, heads, mlp = VARIANTS[args.variant.split("/")[0]]
    cfg.model.vit.update(dim=dim, depth=depth, heads=heads, mlp_dim=mlp, dtype=args.dtype, scan=args.scan)
    cfg.data.batch_size = args.batch
    mesh = sh.make_mesh({"data": -1})
    b = vision_ssl.setup(cfg, mesh)
    state = b.init()
    batch = jax.device_put(random_batch(vision_ssl.batch_spec(cfg), np.random.default_rng(0)))
    f = jax.jit(b.step, donate_argnums=(0,))
    box = [state]

    def run():
        box[0], m = f(box[0], batch)
        m["loss"].block_until_ready()

    dt = timeit(run, iters=args.iters)
    vit = b.vit
    fwd = lambda n, s: vit_train_flops(vit, n, s) / 3  # noqa: E731
    flops = fwd(2 * args.batch, cfg.data.global_size) * 4 + fwd(cfg.data.n_local * args.batch, cfg.data.local_size) * 3
    return dt, flops, cfg


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="S/16")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", default="2", help="comma-separated backbone batch sizes; the SSL step uses the first")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--iters", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the MONAI model (eager is always timed)")
    p.add_argument("--skip-monai", action="store_true")
    p.add_argument("--skip-ssl", action="store_true")
    p.add_argument("--layers", default="scan,unrolled",
                   help="our backbone's layer loop(s), timed side by side: scan (lax.scan) and / or unrolled")
    args = p.parse_args(argv)
    batches = [int(b) for b in str(args.batch).split(",")]
    args.batch = batches[0]
    dims = VARIANTS[args.variant.split("/")[0]]
    peak, rates = matmul_peak(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), {args.dtype}; measured matmul peak "
          f"{peak / 1e12:.1f} TFLOP/s ({', '.join(f'{k} {v / 1e12:.1f}' for k, v in rates.items())}); "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {machine()}", flush=True)
    rows = []
    for batch in batches:
        dt = None
        for i, loop in enumerate(args.layers.split(",")):
            args.scan = loop == "scan"
            ldt, flops, xla = ours_backbone(args, batch, *dims)
            dt = ldt if dt is None else min(dt, ldt)
            rows.append([f"backbone ViT-{args.variant} {args.size}^3, batch {batch}" if i == 0 else "",
                         f"decipher_jax (jax.jit, {loop} layers)", f"{1 / ldt:.2f}", f"{batch / ldt:.1f}",
                         f"{flops / ldt / peak:.1%}", f"{flops / 1e9:.0f} / {xla / 1e9:.0f}"])
            print(rows[-1], flush=True)
        if args.skip_monai:
            continue
        variants = [("MONAI ViT (eager)", False, False)]
        if args.compile:
            variants += [("MONAI ViT (torch.compile)", True, False), ("MONAI ViT (torch.compile + SDPA)", True, True)]
        best = None
        for name, comp, flash in variants:
            mdt = monai_backbone(args, batch, *dims, compile=comp, flash=flash)
            best = mdt if best is None else min(best, mdt)
            rows.append(["", name, f"{1 / mdt:.2f}", f"{batch / mdt:.1f}", f"{flops / mdt / peak:.1%}", ""])
            print(rows[-1], flush=True)
        rows.append(["", "speed-up of our fastest over the fastest MONAI", f"{best / dt:.2f}x", "", "", ""])
    if not args.skip_ssl:
        for i, loop in enumerate(args.layers.split(",")):
            args.scan = loop == "scan"
            sdt, sflops, cfg = ssl_step(args)
            rows.append([f"stage-1 SSL step ViT-{args.variant.split('/')[0]}/8, batch {args.batch}, "
                         f"2x{cfg.data.global_size[0]}^3 + {cfg.data.n_local}x{cfg.data.local_size[0]}^3" if i == 0
                         else "", f"decipher_jax ({loop} layers)", f"{1 / sdt:.2f}", f"{args.batch / sdt:.1f}",
                         f"{sflops / sdt / peak:.1%}", f"{sflops / 1e9:.0f} / -"])
    print(table(["step", "implementation", "steps/s", "volumes/s", "MFU", "GFLOP/step analytic / XLA"], rows))
    print(f"# command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
