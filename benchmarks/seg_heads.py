"""Step time of the segmentation heads' vmapped training (seghead.train_heads) on CPU/GPU.

    JAX_PLATFORMS=cpu python benchmarks/seg_heads.py [--n 66] [--size 32]

Per head kind: 4 heads (2 lrs x 2 seeds) x batch 8 trained in one vmapped call; the step time
is (t(30 steps) - t(10 steps)) / 20, so compilation is excluded. Prints a table.
"""

import argparse
import time

import jax
import numpy as np

from decipher_jax.eval import seghead as S


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=66)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    g = args.size // 8
    tok = rng.normal(size=(args.n, g, g, g, 64)).astype(np.float32)
    img = rng.normal(size=(args.n, *(args.size,) * 3, 1)).astype(np.float32)
    lab = rng.integers(0, 3, size=(args.n, *(args.size,) * 3))
    print(f"{jax.devices()[0].platform}: {args.n} windows of {args.size}^3, tokens {tok.shape[1:]}")
    print("| head | s/step (4 heads x batch 8) |\n|---|---|")
    for kind in S.KINDS:
        t = {}
        for steps in (10, 30):
            t0 = time.perf_counter()
            jax.block_until_ready(S.train_heads(tok, lab, kind=kind, classes=3, lrs=(3e-3, 1e-2), seeds=(0, 1),
                                                steps=steps, hidden=32, images=img))
            t[steps] = time.perf_counter() - t0
        print(f"| {kind} | {(t[30] - t[10]) / 20:.3f} |")


if __name__ == "__main__":
    main()
