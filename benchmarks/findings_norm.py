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


NORMS = ("bn", "ln", "none", "in", "bncentre", "bnscale", "frozen")


def make_norm(name, c):
    """The norm after each conv. ``bn`` BatchNorm; ``ln`` GroupNorm(1) (per sample); ``in``
    InstanceNorm (GroupNorm(c), per sample and channel); ``bncentre`` / ``bnscale`` BatchNorm's
    centring or its scaling alone (batch statistics in training, running ones at eval);
    ``frozen`` per-channel statistics measured once on training batches at init and fixed
    thereafter (a data-dependent init: no batch coupling during training)."""
    import torch
    from torch import nn

    if name in ("bn", "ln", "none", "in"):
        return {"bn": nn.BatchNorm3d, "ln": lambda c: nn.GroupNorm(1, c), "in": lambda c: nn.GroupNorm(c, c),
                "none": lambda c: nn.Identity()}[name](c)

    class Partial(nn.Module):
        def __init__(self, centre, scale, frozen):
            super().__init__()
            self.centre, self.scale, self.frozen, self.calibrating = centre, scale, frozen, False
            self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
            self.register_buffer("mean", torch.zeros(c))
            self.register_buffer("var", torch.ones(c))

        def forward(self, x):
            dims = (0, 2, 3, 4)
            if (self.training and not self.frozen) or self.calibrating:
                mean, var = x.mean(dims), x.var(dims, unbiased=False)
                with torch.no_grad():
                    if self.calibrating:  # an average over the calibration batches
                        self.n = getattr(self, "n", 0) + 1
                        self.mean += (mean - self.mean) / self.n
                        self.var += (var - self.var) / self.n
                    else:
                        self.mean.lerp_(mean, 0.1)
                        self.var.lerp_(var, 0.1)
            else:
                mean, var = self.mean, self.var
            sh = (1, -1, 1, 1, 1)
            if self.centre:
                x = x - mean.view(sh)
            if self.scale:
                x = x * torch.rsqrt(var.view(sh) + 1e-5)
            return x * self.weight.view(sh) + self.bias.view(sh)

    return Partial(centre=name in ("bncentre", "frozen"), scale=name in ("bnscale", "frozen"), frozen=name == "frozen")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", required=True)
    p.add_argument("--norm", choices=NORMS, default="bn")
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
    norm = lambda c: make_norm(args.norm, c)  # noqa: E731
    layers, cin = [], 1
    for c in (int(w) for w in args.widths.split(",")):
        layers += [nn.Conv3d(cin, c, 3, stride=2, padding=1), norm(c), nn.GELU()]
        cin = c
    layers += [nn.Conv3d(cin, cin, 3, padding=1), norm(cin), nn.GELU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
               nn.Linear(cin, len(FINDINGS))]
    net = nn.Sequential(*layers)
    if args.norm == "frozen":  # measure each norm's statistics layer by layer on 8 training batches
        cal = np.random.default_rng(1)
        norms = [m for m in net if hasattr(m, "calibrating")]
        for layer in norms:
            layer.calibrating = True
            with torch.no_grad():
                for _ in range(8):
                    net(torch.as_tensor(xtr[cal.choice(len(xtr), 16, replace=False), None].astype(np.float32)))
            layer.calibrating = False
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
