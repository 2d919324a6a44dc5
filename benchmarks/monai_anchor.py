"""An outside anchor for the ladder (issue 18, item 3): MONAI networks trained from scratch on the
same prepared records, at the same whole-volume input size as our rungs.

    .venv/bin/python benchmarks/monai_anchor.py --prep outputs/demo/data/prep --size 32
    .venv/bin/python benchmarks/monai_anchor.py --prep ... --net densenet121 --steps 400

- classification: ``monai.networks.nets`` ResNet-10 (``--net resnet10``, stem stride 2;
  DenseNet121's five down-samplings leave 1 voxel of a 32^3 input) or DenseNet121, one sigmoid output per finding
  (binary cross-entropy masked to the body regions where the finding occurs, as our probes and
  fine-tuner are) plus softmax heads for body region and sequence; AdamW, random flips;
- segmentation: ``BasicUNet`` on the lesion masks of the training series that have a lesion,
  DiceCE loss, test Dice over the series that have a lesion.

Test AUROC per task and Dice, printed as a table. Torch on the CPU, ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from decipher_jax import env  # noqa: E402

env.setup(devices=1, platform="cpu")  # sklearn / torch on the CPU; jax only reads the records (no accelerator probe)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", required=True)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--net", choices=("resnet10", "resnet18", "densenet121"), default="resnet10")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seg-steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--findings-only", action="store_true",
                   help="no body-region and sequence heads: the findings' loss alone (as our fine-tuner)")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from monai.losses import DiceCELoss
    from monai.networks import nets

    from benchmarks.common import table
    from benchmarks.learnability import load
    from decipher_jax.eval import probes, suite

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    xtr, ltr, mtr = load(args.prep, "train", args.size)
    xte, lte, mte = load(args.prep, "test", args.size)
    tasks = suite.tasks(mtr, mte, names=("findings",))
    names = [t[0] for t in tasks]
    ytr, yte = np.stack([t[1] for t in tasks], 1), np.stack([t[2] for t in tasks], 1)
    cls = {}
    for k in () if args.findings_only else ("body_region", "sequence"):
        c_tr, c_te, n = probes.metadata_labels(mtr[k], mte[k])
        cls[k] = (c_tr, c_te, n)
    print(f"train {xtr.shape}, test {xte.shape}, {len(names)} findings, loaded in {time.perf_counter() - t0:.0f} s",
          flush=True)
    n_out = len(names) + sum(n for *_, n in cls.values())
    rng = np.random.default_rng(args.seed)

    def flip(x, *ys):
        """The same random flips of every spatial axis for a batch's images (and masks)."""
        axes = [a + 1 for a in range(3) if rng.random() < 0.5]
        return [np.flip(v, axes).copy() if axes else v for v in (x,) + ys]

    if args.net == "densenet121":
        net = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=n_out)
    else:
        # The stem strides 2 as in the standard ResNet (MONAI's default 1 costs 5x the time at 32^3).
        net = getattr(nets, args.net)(spatial_dims=3, n_input_channels=1, num_classes=n_out, conv1_t_stride=2)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)

    def loss_fn(out, yb, cb):
        w = torch.as_tensor(yb >= 0, dtype=torch.float32)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            out[:, : len(names)], torch.as_tensor(np.maximum(yb, 0), dtype=torch.float32), reduction="none")
        loss = (bce * w).sum() / w.sum().clamp(min=1.0)
        o = len(names)
        for (_, _, n), c in zip(cls.values(), cb):
            keep = torch.as_tensor(c >= 0)
            if keep.any():
                loss = loss + torch.nn.functional.cross_entropy(out[keep, o : o + n], torch.as_tensor(c[keep]))
            o += n
        return loss

    def evaluate():
        net.eval()
        with torch.no_grad():
            out = torch.cat([net(torch.as_tensor(xte[i : i + 32, None])) for i in range(0, len(xte), 32)]).numpy()
        net.train()
        res = {}
        for k, n in enumerate(names):
            ok = yte[:, k] >= 0
            res[n] = probes.auroc(out[ok, k], yte[ok, k]) if len(set(yte[ok, k])) == 2 else float("nan")
        o = len(names)
        for key, (_, c_te, n) in cls.items():
            ok = c_te >= 0
            res[key] = probes.macro_auroc(out[ok, o : o + n], c_te[ok], n)
            o += n
        return res

    rows, t1 = [], time.perf_counter()
    for s in range(args.steps):
        i = rng.choice(len(xtr), args.batch, replace=False)
        (xb,) = flip(xtr[i])
        loss = loss_fn(net(torch.as_tensor(xb[:, None])), ytr[i], [c[0][i] for c in cls.values()])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (s + 1) % max(args.steps // 4, 1) == 0:
            res = evaluate()
            f = np.nanmean([res[n] for n in names])
            rows.append([args.net, str(s + 1), f"{float(loss):.3f}", f"{time.perf_counter() - t1:.0f}", f"{f:.3f}",
                         f"{res.get('body_region', float('nan')):.2f}", f"{res.get('sequence', float('nan')):.2f}"]
                        + [f"{res[n]:.2f}" for n in names])
            print(rows[-1], flush=True)
    short = [n.removeprefix(suite.FINDING) for n in names]
    print(table(["net", "step", "train loss", "s", "mean finding AUROC", "region", "sequence"] + short, rows))

    if ltr is None or not args.seg_steps:
        return 0
    # Lesion segmentation: BasicUNet on the training series with a lesion.
    # MONAI's usual recipe: two classes, softmax, Dice + cross-entropy (a one-channel sigmoid
    # DiceCE predicted no lesion voxel in 400 steps).
    unet = nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(16, 16, 32, 64, 128, 16))
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    seg_rows, t1, bs = [], time.perf_counter(), max(args.batch // 2, 1)
    pos_te = np.flatnonzero(lte.reshape(len(lte), -1).any(1))
    pos_tr = np.flatnonzero(ltr.reshape(len(ltr), -1).any(1))
    for s in range(args.seg_steps):
        i = rng.choice(pos_tr, bs, replace=False)
        xb, lb = flip(xtr[i], ltr[i].astype(np.float32))
        loss = dice_ce(unet(torch.as_tensor(xb[:, None])), torch.as_tensor(lb[:, None]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (s + 1) % max(args.seg_steps // 4, 1) == 0:
            unet.eval()
            with torch.no_grad():
                pred = torch.cat([unet(torch.as_tensor(xte[pos_te[j : j + 16], None])) for j in range(0, len(pos_te), 16)])
            unet.train()
            pr, gt = pred.numpy().argmax(1) == 1, lte[pos_te]
            inter = (pr & gt).reshape(len(gt), -1).sum(1)
            dice = 2 * inter / np.maximum(pr.reshape(len(gt), -1).sum(1) + gt.reshape(len(gt), -1).sum(1), 1)
            seg_rows.append(["BasicUNet", str(s + 1), f"{float(loss):.3f}", f"{time.perf_counter() - t1:.0f}",
                             f"{dice.mean():.3f}", f"{np.median(dice):.3f}", str(len(pos_te))])
            print(seg_rows[-1], flush=True)
    print(table(["net", "step", "train loss", "s", "mean Dice", "median Dice", "test lesion series"], seg_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
