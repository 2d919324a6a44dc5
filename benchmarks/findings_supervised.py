"""Upper bound for the finding probes: the demo's tiny ViT trained *supervised* on the labels.

    .venv/bin/python benchmarks/findings_supervised.py --prep outputs/demo/data/prep --size 32 --steps 1500
    .venv/bin/python benchmarks/findings_supervised.py --prep outputs/demo/data/prep --task region  # sanity

The stage-1 tiny architecture (dim 64, depth 2, 8^3 patches) plus one linear layer on the
mean patch token is trained from scratch with AdamW on the training split's labels: one
sigmoid output per finding (binary cross-entropy, masked to the body regions where the
finding occurs, as the probes are), or one per body region (``--task region``). Test AUROC
per task is printed every fifth of the run. If supervision on the labels themselves cannot
lift a finding above chance, no pretraining of this encoder at this scale can be expected to.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from decipher_jax import env  # noqa: E402

env.setup(devices=1)  # before jax: one CPU device (unless XLA_FLAGS sets a count)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", required=True)
    p.add_argument("--size", type=int, default=32, help="whole-volume resize (a multiple of 8)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--task", choices=("findings", "region"), default="findings")
    p.add_argument("--pool", choices=("mean", "max"), default="mean", help="how the head pools the patch tokens")
    args = p.parse_args(argv)

    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from benchmarks import learnability
    from benchmarks.common import table
    from decipher_jax.eval import probes, suite
    from decipher_jax.models.vit3d import ViT3D, ViTConfig

    size = (args.size,) * 3

    def load(split):
        x, _, meta = learnability.load(args.prep, split, args.size, masks=False)
        return x[..., None], meta

    xtr, mtr = load("train")
    xte, mte = load("test")
    if args.task == "findings":
        tasks = suite.tasks(mtr, mte, names=("findings",))
        names = [t[0] for t in tasks]
        ytr, yte = np.stack([t[1] for t in tasks], 1), np.stack([t[2] for t in tasks], 1)
    else:
        names = sorted(set(mtr["body_region"]))
        ytr = np.stack([(mtr["body_region"] == r).astype(int) for r in names], 1)
        yte = np.stack([(mte["body_region"] == r).astype(int) for r in names], 1)
    print(f"train {xtr.shape}, test {xte.shape}, tasks {names}", flush=True)

    cfg = ViTConfig(dim=64, depth=2, heads=4, mlp_dim=128, patch_size=(8, 8, 8), img_size=size)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.vit = ViT3D(cfg, rngs=rngs)
            self.head = nnx.Linear(cfg.dim, len(names), rngs=rngs)

        def __call__(self, x):
            patch = self.vit(x)["patch"]
            return self.head(patch.max(1) if args.pool == "max" else patch.mean(1))

    net = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(net, optax.adamw(args.lr, weight_decay=0.01), wrt=nnx.Param)

    @nnx.jit
    def step(net, opt, x, y):
        def loss_fn(net):
            w = (y >= 0).astype(jnp.float32)
            ce = optax.sigmoid_binary_cross_entropy(net(x), jnp.maximum(y, 0).astype(jnp.float32))
            return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)

        loss, grads = nnx.value_and_grad(loss_fn)(net)
        opt.update(net, grads)
        return loss

    predict = nnx.jit(lambda net, x: net(x))
    rng, rows, t0 = np.random.default_rng(0), [], time.perf_counter()
    for s in range(args.steps):
        i = rng.choice(len(xtr), args.batch, replace=False)
        loss = step(net, opt, jnp.asarray(xtr[i]), jnp.asarray(ytr[i]))
        if (s + 1) % max(args.steps // 5, 1) == 0:
            score = np.concatenate([np.asarray(predict(net, jnp.asarray(xte[j : j + 32]))) for j in range(0, len(xte), 32)])
            aucs = []
            for k in range(len(names)):
                ok = yte[:, k] >= 0
                aucs.append(probes.auroc(score[ok, k], yte[ok, k]) if len(set(yte[ok, k])) == 2 else float("nan"))
            rows.append([s + 1, f"{float(loss):.3f}", f"{time.perf_counter() - t0:.0f}", f"{np.nanmean(aucs):.3f}"]
                        + [f"{a:.2f}" for a in aucs])
            print(rows[-1], flush=True)
    print(table(["step", "train loss", "s", "mean AUROC"] + [n.removeprefix(suite.FINDING) for n in names], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
