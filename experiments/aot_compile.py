"""Ahead-of-time compile training steps for TPU pod topologies on this CPU machine.

Needs the ``tpu-aot`` extra (``libtpu``). Prints per-chip memory against HBM and FLOPs.

    JAX_PLATFORMS=cpu python experiments/aot_compile.py                       # defaults below
    JAX_PLATFORMS=cpu python experiments/aot_compile.py --variant L/16 --size 128 \
        --topology v5p:8x8x8 --mesh fsdp=-1 --per-chip-batch 2 --markdown out.md

Later stages register their real train steps here (``--step``); for now: a ViT forward /
backward + AdamW update on an objective over CLS and patch tokens.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU, never run on one

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from decipher_jax import aot  # noqa: E402
from decipher_jax.models.vit3d import ViT3D, vit_config  # noqa: E402

DEFAULT_TOPOLOGIES = ("v5e:2x2", "v5e:16x16", "v5p:8x8x8")


def parse_mesh(s: str, chips: int, dim: int) -> dict:
    """'auto': FSDP over the largest chip count dividing the embedding dim, data over the rest."""
    if s == "auto":
        fsdp = math.gcd(chips, dim)
        return {"data": chips // fsdp, "fsdp": fsdp}
    return {k: int(v) for k, v in (kv.split("=") for kv in s.split(","))}


def vit_step(args, topology: str) -> aot.AotResult:
    cfg = vit_config(args.variant, img_size=args.size, dtype="bfloat16", remat=args.remat, scan=args.scan)
    chips = len(aot.topology_mesh(topology, {"data": -1})[1])
    batch = args.per_chip_batch * chips
    spatial = cfg.img_size

    def loss(model, b):
        out = model(b["image"])
        return jnp.mean(jnp.square(out["cls"].astype(jnp.float32))) + jnp.mean(out["patch"].astype(jnp.float32))

    return aot.compile_train_step(
        f"ViT-{args.variant} fwd/bwd+AdamW {args.size}^3 b{batch}",
        lambda r: ViT3D(cfg, rngs=r),
        loss,
        {"image": ((batch,) + spatial + (cfg.in_channels,), jnp.bfloat16)},
        topology,
        parse_mesh(args.mesh, chips, cfg.dim),
        analytic_flops=aot.vit_train_flops(cfg, batch, spatial),
    )


STEPS = {"vit": vit_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", choices=sorted(STEPS), default="vit")
    p.add_argument("--variant", default="B/16")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--per-chip-batch", type=int, default=4)
    p.add_argument("--remat", default="dots", choices=["none", "dots", "full"])
    # XLA's cost analysis counts a while-loop body once: with --scan its FLOPs are per layer.
    p.add_argument("--scan", action="store_true", help="scan over layers (FLOP column then counts one layer)")
    p.add_argument("--mesh", default="auto", help="'auto' or e.g. 'data=-1,fsdp=4' (-1 takes the remaining chips)")
    p.add_argument("--topology", action="append", help=f"repeatable; default {DEFAULT_TOPOLOGIES}")
    p.add_argument("--markdown", help="append the table to this file")
    args = p.parse_args(argv)
    rows = []
    print(aot.TABLE_HEADER, flush=True)
    for topo in args.topology or DEFAULT_TOPOLOGIES:
        r = STEPS[args.step](args, topo)
        rows.append(r.row())
        print(r.row(), flush=True)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(aot.TABLE_HEADER + "\n" + "\n".join(rows) + "\n")
    print(f"# {aot.versions_note()}; command: {' '.join(sys.argv)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
