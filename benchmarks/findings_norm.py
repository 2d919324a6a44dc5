"""The normalisation, not the width: one small torch CNN on the findings at 32^3 with BatchNorm,
a per-sample norm (GroupNorm with one group, as a LayerNorm over the feature map) or none.

    .venv/bin/python benchmarks/findings_norm.py --prep W/data/prep --norm bn --widths 16,32,64 [--steps 600]

The CNN: stride-2 3^3 convs of ``--widths`` channels, each followed by the norm and GELU, one
more conv, global mean, one logit per finding. Masked BCE on the finding's body regions,
AdamW 1e-3 (weight decay 0.01), batch 16, the same random flips for a batch (as
``benchmarks/monai_anchor.py``). Prints the mean training loss of the last 300 steps and the test
AUROC per finding. The records and the labels come from ``benchmarks/findings_arch.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", required=True)
    p.add_argument("--norm", choices=("bn", "ln", "none"), default="bn")
    p.add_argument("--widths", default="16,32,64")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    from findings_arch import FINDINGS, load  # also sets up the (CPU) environment

    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = load(args.prep)
    (xtr, ytr, mtr), (xte, yte, mte) = d["train"], d["test"]
    norm = {"bn": nn.BatchNorm3d, "ln": lambda c: nn.GroupNorm(1, c), "none": lambda c: nn.Identity()}[args.norm]
    layers, cin = [], 1
    for c in (int(w) for w in args.widths.split(",")):
        layers += [nn.Conv3d(cin, c, 3, stride=2, padding=1), norm(c), nn.GELU()]
        cin = c
    layers += [nn.Conv3d(cin, cin, 3, padding=1), norm(cin), nn.GELU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
               nn.Linear(cin, len(FINDINGS))]
    net = nn.Sequential(*layers)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    rng, hist, t0 = np.random.default_rng(0), [], time.perf_counter()
    print("| norm | widths | step | train loss (last 300) | s | test mean AUROC | " + " | ".join(FINDINGS) + " |")
    for s in range(1, args.steps + 1):
        i = rng.choice(len(xtr), 16, replace=False)
        x = xtr[i].astype(np.float32)
        axes = [a + 1 for a in range(3) if rng.random() < 0.5]
        x = np.flip(x, axes).copy() if axes else x
        m = torch.as_tensor(mtr[i])
        loss = (nn.functional.binary_cross_entropy_with_logits(net(torch.as_tensor(x[:, None])), torch.as_tensor(ytr[i]),
                                                               reduction="none") * m).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(float(loss.detach()))
        if s % 300 == 0 or s == args.steps:
            net.eval()
            with torch.no_grad():
                prob = torch.cat([net(torch.as_tensor(xte[j: j + 64, None].astype(np.float32)))
                                  for j in range(0, len(xte), 64)]).numpy()
            net.train()
            au = [roc_auc_score(yte[mte[:, k] > 0, k], prob[mte[:, k] > 0, k]) for k in range(len(FINDINGS))]
            print(f"| {args.norm} | {args.widths} | {s} | {np.mean(hist[-300:]):.3f} | {time.perf_counter() - t0:.0f} | "
                  f"{np.mean(au):.3f} | " + " | ".join(f"{a:.2f}" for a in au) + " |", flush=True)


if __name__ == "__main__":
    main()
