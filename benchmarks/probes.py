"""Linear-probe sweep: P logistic probes in one jitted vmap vs a scikit-learn loop.

    JAX_PLATFORMS=cpu python benchmarks/probes.py                 # 256 probes, 10k x 768
    python benchmarks/probes.py --probes 256 --n 10000 --dim 768 --sklearn-sample 8

Features: a Gaussian mixture with class-dependent means (10k x 768, float32); 256 binary probes
= 16 tasks (random label directions) x 4 C values x 4 seeds (each a 70% subset). Both sides run
L-BFGS for the same number of iterations (``max_iter``) on the same standardised features.
scikit-learn fits ``--sklearn-sample`` probes of the grid and the loop time is extrapolated
linearly to all P (each fit is independent; printed as such). Prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probes", type=int, default=256)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--sklearn-sample", type=int, default=8)
    args = p.parse_args(argv)

    import jax
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from benchmarks.common import machine, table
    from decipher_jax.eval import probes

    r = np.random.default_rng(0)
    tasks = 16
    dirs = r.normal(size=(tasks, args.dim))
    x = r.normal(size=(args.n, args.dim)).astype(np.float32)
    ys_task = ((x @ dirs.T + 0.5 * r.normal(size=(args.n, tasks))) > 0).astype(np.int32).T  # (T, n)
    (x,) = probes.standardise(x)
    per_task = args.probes // tasks
    cs = 10.0 ** np.linspace(-3, 0, 4)
    grid = [(t, cs[i % len(cs)], i // len(cs)) for t in range(tasks) for i in range(per_task)]
    ys = np.stack([ys_task[t] for t, _, _ in grid])
    ws = np.stack([(np.random.default_rng(s).random(args.n) < 0.7).astype(np.float32) for _, _, s in grid])
    c = np.array([ci for _, ci, _ in grid])
    masks = np.ones((len(grid), 2), bool)

    t0 = time.perf_counter()
    out = probes.fit_many(x, ys, ws, c, masks, iters=args.iters)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(probes.fit_many(x, ys, ws, c, masks, iters=args.iters))
    ours = time.perf_counter() - t0

    idx = np.linspace(0, len(grid) - 1, args.sklearn_sample).astype(int)
    t0 = time.perf_counter()
    agree = []
    for i in idx:
        keep = ws[i] > 0
        sk = LogisticRegression(C=2 * c[i], max_iter=args.iters, tol=0.0).fit(x[keep], ys[i][keep])
        w = np.asarray(out["w"][i])
        agree.append(np.mean((x @ (w[:, 1] - w[:, 0]) + float(out["b"][i][1] - out["b"][i][0]) > 0)
                             == sk.predict(x)))
    sk_each = (time.perf_counter() - t0) / len(idx)
    sk_all = sk_each * len(grid)
    rows = [[f"JAX, one batched call ({jax.devices()[0].platform})", len(grid), f"{ours:.2f}", f"{first:.2f}", "1.0x"],
            [f"scikit-learn loop ({len(idx)} fits timed, x{len(grid) / len(idx):.0f})", len(grid), f"{sk_all:.2f}", "-",
             f"{sk_all / ours:.1f}x slower"]]
    print(f"# {machine()}; {args.n} x {args.dim} features, {len(grid)} binary probes, {args.iters} L-BFGS iterations")
    print(table(["implementation", "probes", "fit s", "first call s (compile)", "relative"], rows))
    print(f"# JAX / scikit-learn agreement on predictions (sampled probes): {np.mean(agree):.4f}")
    print(f"# speed-up: {sk_all / ours:.1f}x (command: {' '.join(sys.argv)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
