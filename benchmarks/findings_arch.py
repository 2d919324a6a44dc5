"""Why the supervised rung stays at chance on the findings: small JAX models of several kinds,
the same data, loss, optimiser and steps, beside a sanity target and a voxel logistic regression.

    .venv/bin/python benchmarks/findings_arch.py --prep W/data/prep --variant linear8 [--steps 1200]

Variants (all dim 64, mean-pooled, a linear head of one logit per finding, masked BCE on the
finding's body regions as the fine-tuner's, AdamW with warm-up + cosine, batch 16, random flips):
``linear8`` / ``linear4``: our ViT3D (depth 2, 4 heads) with its linear patch stem of 8^3 / 4^3
voxels; ``conv``: three stride-2 3^3 conv blocks (16, 32, 64 channels) to a 4^3 grid, then the
same transformer; ``cnn``: the same conv stem, one more conv, global mean; ``widecnn``: the CNN
with 64, 128 and 256 channels; ``bncnn`` / ``bnconv``: the CNN / the conv-stem ViT with BatchNorm
in the stem instead of LayerNorm; ``incnn`` / ``inconv``: the same with InstanceNorm; ``stem8`` /
``stem4``: the library's ViT3D with ``stem="conv"`` (InstanceNorm'd, im2col convolutions);
``hmlp`` / ``lnhmlp``: a hierarchical-MLP stem (three non-overlapping 2^3 merges) with
InstanceNorm / LayerNorm; ``linear8tn`` / ``linear4tn``: the linear stem with an InstanceNorm over
the tokens after it; ``jcnn``: the InstanceNorm CNN in JAX on the library's conv stem (no
transformer). For ``stem*``: ``--depth``, ``--pool mean|max``, ``--layerscale``, ``--no-final-norm``
(any of them reads the tokens out without a CLS token); ``--recipe torch``: ``findings_norm.py``'s
constant lr, weight decay 0.01 and one flip per batch. ``--sanity``: the body
region as the target (learnable by anything). ``--voxel-lr``: scikit-learn logistic regression
on the flattened 32^3 voxels instead of a network. Prints the mean training loss of the last
300 steps and the test AUROC per finding.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from decipher_jax import env  # noqa: E402

env.setup(devices=1, platform="cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

FINDINGS = ("absent_kidney", "acl_tear", "cord_lesion", "effusion", "fracture", "infarct", "liver_lesion", "mass")
REGION = {"absent_kidney": "abdomen", "liver_lesion": "abdomen", "acl_tear": "knee", "effusion": "knee",
          "cord_lesion": "spine", "fracture": "spine", "infarct": "brain", "mass": "brain"}


def load(prep: str, size: int = 32) -> dict:
    """Volumes resized whole to ``size``^3 (as the evaluations), finding labels and region masks."""
    from decipher_jax.data import pipelines as P
    from decipher_jax.data import transforms as T

    out = {}
    for split in ("train", "test"):
        src, dec, rs = P.data_source(prep, split), T.Decode(), T.Resize((size,) * 3)
        xs, ys, ms = [], [], []
        for i in range(len(src)):
            ex = rs.map(dec.map(src[i]))
            if ex.get("role", "") == "template" or ex["body_region"] not in REGION.values():
                continue
            fs = set(str(ex["findings"]).split(";")) - {""}
            xs.append(ex["image"][..., 0].astype(np.float16))
            ys.append([f in fs for f in FINDINGS])
            ms.append([REGION[f] == ex["body_region"] for f in FINDINGS])
        out[split] = (np.stack(xs), np.array(ys, np.float32), np.array(ms, np.float32))
    return out


class InstanceNorm(nnx.Module):
    """Each channel standardised over the spatial (or token) axes of its own sample, then a
    learned per-channel affine: no batch statistics, a pure function of one sample."""

    def __init__(self, c: int, axes=(1, 2, 3)):
        self.axes = axes
        self.scale, self.bias = nnx.Param(jnp.ones((c,))), nnx.Param(jnp.zeros((c,)))

    def __call__(self, x):
        from decipher_jax.models.layers import instance_norm

        return instance_norm(x, self.scale[...], self.bias[...], axes=self.axes)


class ConvStem(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs, widths=(16, 32), norm: str = "ln"):
        ch = (*widths, dim)
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3, 3), strides=2, padding="SAME", rngs=rngs)
                               for a, b in zip((1,) + ch[:-1], ch)])
        make = {"bn": lambda c: nnx.BatchNorm(c, momentum=0.9, rngs=rngs), "ln": lambda c: nnx.LayerNorm(c, rngs=rngs),
                "in": InstanceNorm}[norm]
        self.norms = nnx.List([make(c) for c in ch])

    def __call__(self, x):
        for c, n in zip(self.convs, self.norms):
            x = jax.nn.gelu(n(c(x)))
        return x


class HMLPStem(nnx.Module):
    """Touvron et al.'s hierarchical-MLP stem in 3D: three non-overlapping 2^3 patch merges
    (kernel = stride convolutions, computed as reshape + matmul), each followed by a norm and
    GELU, so an 8^3 patch becomes one token through local nonlinear features."""

    def __init__(self, dim: int, rngs: nnx.Rngs, widths=(16, 32), norm: str = "in"):
        ch = (1, *widths, dim)
        init = jax.nn.initializers.lecun_normal()
        self.kernels = nnx.List([nnx.Param(init(rngs.params(), (2, 2, 2, a, b))) for a, b in zip(ch[:-1], ch[1:])])
        self.biases = nnx.List([nnx.Param(jnp.zeros((b,))) for b in ch[1:]])
        self.norms = nnx.List([InstanceNorm(c) if norm == "in" else nnx.LayerNorm(c, rngs=rngs) for c in ch[1:]])

    def __call__(self, x):
        for k, b, n in zip(self.kernels, self.biases, self.norms):
            B, D, H, W, C = x.shape
            x = x.reshape(B, D // 2, 2, H // 2, 2, W // 2, 2, C)
            x = jnp.einsum("bipjqkrc,pqrce->bijke", x, k[...]) + b[...]
            x = jax.nn.gelu(n(x))
        return x


class JaxCNN(nnx.Module):
    """The torch InstanceNorm CNN of ``findings_norm.py`` in JAX on the library's pieces: the
    conv-stem ViT's own stem (three stride-2 3^3 convolutions, InstanceNorm, GELU; im2col), one
    more 3^3 convolution + InstanceNorm + GELU, a global mean. No transformer."""

    def __init__(self, dim: int, size: int, rngs: nnx.Rngs):
        from decipher_jax.models.vit3d import ViT3D, ViTConfig

        self.vit = ViT3D(ViTConfig(dim=dim, depth=1, heads=4, mlp_dim=dim, patch_size=(8, 8, 8),
                                   img_size=(size,) * 3, stem="conv", stem_channels=(16, 32, dim)), rngs=rngs)
        he = jax.nn.initializers.he_normal(in_axis=(0, 1, 2, 3), out_axis=4)
        self.kernel = nnx.Param(he(rngs.params(), (3, 3, 3, dim, dim)))
        self.bias, self.nb = nnx.Param(jnp.zeros((dim,))), nnx.Param(jnp.zeros((dim,)))
        self.ns = nnx.Param(jnp.ones((dim,)))

    def __call__(self, x):
        from decipher_jax.models.layers import conv3d, instance_norm

        h = conv3d(self.vit.conv_stem(x), self.kernel[...], (1, 1, 1)) + self.bias[...]
        return jax.nn.gelu(instance_norm(h, self.ns[...], self.nb[...]), approximate=False)


class Net(nnx.Module):
    def __init__(self, variant: str, k: int, size: int, rngs: nnx.Rngs, dim: int = 64, depth: int = 2,
                 pool: str = "mean", final_norm: bool = True, layerscale: float | None = None):
        self.depth, self.pool, self.final_norm = depth, pool, final_norm
        # stem* with any of the options below: embed -> blocks -> readout, with no CLS token
        self.readout_path = depth != 2 or pool != "mean" or not final_norm or layerscale is not None
        if variant == "jcnn":  # the JAX InstanceNorm CNN on the library's conv stem
            self.variant, self.cnn = "jcnn", JaxCNN(dim, size, rngs)
            self.tokennorm = False
            self.head = nnx.Linear(dim, k, rngs=rngs)
            return
        from decipher_jax.models.vit3d import ViT3D, ViTConfig

        # bncnn / bnconv: BatchNorm in the conv stem; incnn / inconv: InstanceNorm; hmlp / lnhmlp: the
        # hMLP stem with InstanceNorm / LayerNorm + the 1^3-patch ViT; linear8tn: InstanceNorm over the
        # tokens after the linear patch stem; widecnn: the LayerNorm CNN with 4x the channels.
        self.tokennorm = variant.endswith("tn")
        variant = variant[:-2] if self.tokennorm else variant
        if variant.startswith("stem"):  # stem8 / stem4: our ViT3D with stem="conv" (InstanceNorm'd), the library's
            p = int(variant[len("stem"):])
            self.vit = ViT3D(ViTConfig(dim=dim, depth=max(depth, 1), heads=4, mlp_dim=2 * dim, patch_size=(p,) * 3,
                                       img_size=(size,) * 3, stem="conv", layerscale=layerscale), rngs=rngs)
            variant = "vit"
        elif variant in ("hmlp", "lnhmlp"):
            self.stem, variant = HMLPStem(dim, rngs, norm="in" if variant == "hmlp" else "ln"), "conv"
        elif variant == "widecnn":  # 64 at 16^3, 128 at 8^3, 256 at 4^3
            variant, dim = "cnn", 256
            self.stem = ConvStem(dim, rngs, widths=(64, 128))
        elif variant[2:] in ("conv", "cnn") and variant[:2] in ("bn", "in"):
            self.stem, variant = ConvStem(dim, rngs, norm=variant[:2]), variant[2:]
        elif variant in ("conv", "cnn"):
            self.stem = ConvStem(dim, rngs)
        self.variant = variant
        if variant == "cnn":
            self.conv = nnx.Conv(dim, dim, (3, 3, 3), padding="SAME", rngs=rngs)
        elif variant == "conv":  # a 1^3-patch ViT over the stem's grid
            self.vit = ViT3D(ViTConfig(dim=dim, depth=2, heads=4, mlp_dim=2 * dim, patch_size=(1, 1, 1),
                                       img_size=(size // 8,) * 3, in_channels=dim), rngs=rngs)
        elif variant != "vit":  # (stem8 / stem4 built theirs above)
            p = int(variant[len("linear"):])
            self.vit = ViT3D(ViTConfig(dim=dim, depth=2, heads=4, mlp_dim=2 * dim, patch_size=(p,) * 3,
                                       img_size=(size,) * 3), rngs=rngs)
        if self.tokennorm:
            self.tn = InstanceNorm(dim, axes=(1,))
        self.head = nnx.Linear(dim, k, rngs=rngs)

    def readout(self, tok):
        """(B, N, E) tokens -> (B, E): the final LayerNorm (optional), then the mean or max over
        tokens."""
        tok = self.vit.norm(tok) if self.final_norm else tok
        return tok.max(1) if self.pool == "max" else tok.mean(1)

    def __call__(self, x):
        if self.variant == "jcnn":
            h = self.cnn(x)
            return self.head(h.max((1, 2, 3)) if self.pool == "max" else h.mean((1, 2, 3)))
        if self.variant == "vit" and self.readout_path:
            tok, _ = self.vit.embed(x)  # depth 0: the stem's tokens straight to the readout
            if self.depth:
                tok, _ = self.vit.blocks(tok)
            return self.head(self.readout(tok))
        if self.variant == "cnn":
            return self.head(jax.nn.gelu(self.conv(self.stem(x))).mean((1, 2, 3)))
        h = self.stem(x) if self.variant == "conv" else x
        if self.tokennorm:
            tok, _ = self.vit.embed(h)
            tok, _ = self.vit.blocks(self.tn(tok))
            return self.head(self.vit.norm(tok).mean(1))
        return self.head(self.vit(h)["patch"].mean(1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", required=True)
    p.add_argument("--variant", default="linear8", help="linear8 | linear4 | conv | cnn")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-flips", action="store_true")
    p.add_argument("--sanity", action="store_true")
    p.add_argument("--voxel-lr", action="store_true")
    p.add_argument("--depth", type=int, default=2, help="stem*: transformer blocks (0: the stem's tokens read out)")
    p.add_argument("--pool", choices=("mean", "max"), default="mean", help="stem* / jcnn: the readout over tokens")
    p.add_argument("--layerscale", type=float, default=None, help="stem*: LayerScale's initial value")
    p.add_argument("--no-final-norm", action="store_true", help="stem*: no LayerNorm before the readout")
    p.add_argument("--recipe", choices=("jax", "torch"), default="jax",
                   help="jax: warm-up + cosine, weight decay 0.05, per-sample flips; torch: findings_norm.py's "
                        "constant lr, weight decay 0.01, one flip per batch")
    args = p.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    d = load(args.prep)
    (xtr, ytr, mtr), (xte, yte, mte) = d["train"], d["test"]
    if args.sanity:
        ytr, yte, mtr, mte = mtr, mte, np.ones_like(mtr), np.ones_like(mte)

    def aurocs(prob):
        out = []
        for k in range(ytr.shape[1]):
            sel = mte[:, k] > 0
            out.append(roc_auc_score(yte[sel, k], prob[sel, k]) if 0 < yte[sel, k].sum() < sel.sum() else np.nan)
        return np.array(out)

    if args.voxel_lr:
        from sklearn.linear_model import LogisticRegression

        a, b = xtr.reshape(len(xtr), -1).astype(np.float32), xte.reshape(len(xte), -1).astype(np.float32)
        prob = np.zeros_like(yte)
        for k in range(ytr.shape[1]):
            sel = mtr[:, k] > 0
            prob[:, k] = LogisticRegression(C=0.01, max_iter=300).fit(a[sel], ytr[sel, k]).predict_proba(b)[:, 1]
        au = aurocs(prob)
        print(f"voxel LR: test mean AUROC {np.nanmean(au):.3f} {np.round(au, 2).tolist()}")
        return
    model = Net(args.variant, ytr.shape[1], xtr.shape[1], nnx.Rngs(0), depth=args.depth, pool=args.pool,
                final_norm=not args.no_final_norm, layerscale=args.layerscale)
    if args.recipe == "torch":
        opt = nnx.Optimizer(model, optax.adamw(args.lr, weight_decay=0.01), wrt=nnx.Param)
    else:
        sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, 50, args.steps)
        opt = nnx.Optimizer(model, optax.adamw(sched, weight_decay=0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y, m):
        def loss_fn(model):
            return (optax.sigmoid_binary_cross_entropy(model(x), y) * m).sum() / jnp.maximum(m.sum(), 1.0)

        loss, g = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, g)
        return loss

    predict = nnx.jit(lambda model, x: jax.nn.sigmoid(model(x)))
    model.train()  # BatchNorm (bn* variants): batch statistics in training, running ones at test
    rng, hist, t0 = np.random.default_rng(0), [], time.perf_counter()
    print("| variant | step | train loss (last 300) | s | test mean AUROC | " + " | ".join(FINDINGS) + " |")
    for s in range(1, args.steps + 1):
        idx = rng.choice(len(xtr), 16, replace=False)
        x = xtr[idx].astype(np.float32)
        if not args.no_flips and args.recipe == "torch":
            axes = [a + 1 for a in range(3) if rng.random() < 0.5]
            x = np.flip(x, axes).copy() if axes else x
        elif not args.no_flips:
            for ax in (1, 2, 3):
                f = rng.random(16) < 0.5
                x[f] = np.flip(x[f], axis=ax)
        hist.append(float(step(model, opt, jnp.asarray(x[..., None]), jnp.asarray(ytr[idx]), jnp.asarray(mtr[idx]))))
        if s % 300 == 0 or s == args.steps:
            model.eval()
            prob = np.concatenate([np.asarray(predict(model, jnp.asarray(xte[i: i + 64, ..., None], jnp.float32)))
                                   for i in range(0, len(xte), 64)])
            model.train()
            au = aurocs(prob)
            print(f"| {args.variant} | {s} | {np.mean(hist[-300:]):.3f} | {time.perf_counter() - t0:.0f} | "
                  f"{np.nanmean(au):.3f} | " + " | ".join(f"{a:.2f}" for a in au) + " |", flush=True)


if __name__ == "__main__":
    main()
