"""3D convolution forward + backward under XLA:CPU: ``lax.conv_general_dilated`` against the
im2col form of ``decipher_jax.models.layers.conv3d``, beside torch's ``Conv3d`` (oneDNN) on the
same shapes: the conv stem's three stride-2 3^3 convolutions at batch 16 from a 32^3 input.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/conv3d.py [--batch 16] [--reps 10]

Each row times ``grad(sum(sin(conv(x, k))))`` with respect to both ``x`` and ``k`` (jitted in JAX,
eager in torch), after one warm-up call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from decipher_jax.models.layers import conv3d

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"backend {jax.default_backend()}, batch {args.batch}, stride 2, kernel 3^3")
    print("| input | channels | lax.conv (ms) | im2col (ms) | torch Conv3d (ms) | speed-up of im2col | max diff |")
    print("|---|---|---|---|---|---|---|")
    for s, ci, co in ((32, 1, 16), (16, 16, 32), (8, 32, 64)):
        x = jnp.asarray(rng.normal(size=(args.batch, s, s, s, ci)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(3, 3, 3, ci, co)), jnp.float32)
        ms = {}
        for impl in ("xla", "im2col"):
            g = jax.jit(jax.grad(lambda a, b, impl=impl: jnp.sum(jnp.sin(conv3d(a, b, (2, 2, 2), impl))), argnums=(0, 1)))
            jax.block_until_ready(g(x, k))
            t = time.perf_counter()
            for _ in range(args.reps):
                jax.block_until_ready(g(x, k))
            ms[impl] = (time.perf_counter() - t) / args.reps * 1e3
        diff = float(jnp.abs(conv3d(x, k, (2, 2, 2), "xla") - conv3d(x, k, (2, 2, 2), "im2col")).max())
        xt = torch.tensor(np.asarray(x).transpose(0, 4, 1, 2, 3), requires_grad=True)
        kt = torch.tensor(np.asarray(k).transpose(4, 3, 0, 1, 2), requires_grad=True)

        def tstep():
            xt.grad = kt.grad = None
            torch.sin(torch.nn.functional.conv3d(xt, kt, stride=2, padding=1)).sum().backward()

        tstep()
        t = time.perf_counter()
        for _ in range(args.reps):
            tstep()
        ms["torch"] = (time.perf_counter() - t) / args.reps * 1e3
        print(f"| {s}^3 | {ci} -> {co} | {ms['xla']:.1f} | {ms['im2col']:.1f} | {ms['torch']:.1f} | "
              f"{ms['xla'] / ms['im2col']:.0f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
