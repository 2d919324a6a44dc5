"""Ahead-of-time compile training steps for TPU pod topologies on this CPU machine.

Needs the ``tpu-aot`` extra (``libtpu``). Prints per-chip memory against HBM and FLOPs.

    JAX_PLATFORMS=cpu python experiments/aot_compile.py                       # defaults below
    JAX_PLATFORMS=cpu python experiments/aot_compile.py --variant L/16 --size 128 \
        --topology v5p:8x8x8 --mesh fsdp=-1 --per-chip-batch 2 --markdown out.md

Steps (``--step``): ``vit`` (a ViT forward / backward + AdamW on an objective over CLS and patch
tokens) and ``vision_ssl`` (the real stage-1 step of ``experiments/configs/vision_ssl.py``:
student + EMA teacher, DINO / iBOT heads with 65536 prototypes, 2 global + 8 local crops) and
``clip_align`` (the real stage-2 step of ``experiments/configs/clip_align.py``: ViT + BERT-base
towers, the contrastive loss over the whole global batch, AdamW with the towers' lr rules) and
``text_mlm`` (the real stage-1 text step of ``experiments/configs/text_mlm.py``: BERT-base MLM with
the tied decoder at the masked slots, AdamW; ``--text-layers`` shrinks it for a quick check) and
``caption`` (report generation, ``experiments/configs/caption.py``: a Llama-3.2-1B-sized decoder
with LoRA adapters over a frozen ViT's tokens) and ``multiparam`` (multi-parametric pretraining,
``experiments/configs/multiparam.py``: the multi-sequence ViT on four sequences, two views).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU, never run on one


import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

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


def vision_ssl_step(args, topology: str) -> aot.AotResult:
    """The real stage-1 step (student + EMA teacher, DINO/iBOT heads, AdamW) from the config."""
    from decipher_jax.trainers import common, vision_ssl

    cfg = common.load_config(os.path.join(os.path.dirname(__file__), "configs", "vision_ssl.py"))
    dim, depth, heads, mlp = {"B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096)}[args.variant.split("/")[0]]
    cfg.model.vit.update(dim=dim, depth=depth, heads=heads, mlp_dim=mlp, remat=args.remat, scan=args.scan)
    chips = len(aot.topology_mesh(topology, {"data": -1})[1])
    cfg.data.batch_size = args.per_chip_batch * chips
    mesh, devices = aot.topology_mesh(topology, parse_mesh(args.mesh, chips, dim))
    b = vision_ssl.setup(cfg, mesh)
    vit = b.vit
    n_glob, n_loc = 2 * cfg.data.batch_size, cfg.data.n_local * cfg.data.batch_size
    fwd = lambda n, size: aot.vit_train_flops(vit, n, size) / 3  # noqa: E731
    h = cfg.model.head
    head_macs = vit.dim * h.hidden + h.hidden * h.hidden + h.hidden * h.bottleneck + h.bottleneck * h.out_dim
    masked = int(np.ceil(cfg.data.mask_ratio[1] * vision_ssl.n_tokens(cfg)))
    head = 2 * head_macs * (n_glob * (1 + masked) * (1 + 3) + n_loc * 3)  # teacher fwd + student fwd/bwd
    analytic = fwd(n_glob, cfg.data.global_size) * 4 + fwd(n_loc, cfg.data.local_size) * 3 + head
    name = (f"stage-1 SSL ViT-{args.variant} {cfg.data.global_size[0]}^3 + {cfg.data.n_local}x"
            f"{cfg.data.local_size[0]}^3, K={h.out_dim}, b{cfg.data.batch_size}")
    return aot.compile_and_measure(name, topology, mesh, devices, b.jit_step(), (b.abstract_state(), b.abstract_batch()), analytic)


def clip_align_step(args, topology: str) -> aot.AotResult:
    """The real stage-2 step (ViT + PubMedBERT-base towers, CLIP over the global batch, AdamW)."""
    from decipher_jax.trainers import clip_align, common

    arg = "siglip" if args.objective == "siglip" else ""
    cfg = common.load_config(os.path.join(os.path.dirname(__file__), "configs", "clip_align.py") + f":{arg}",
                             {"init.vision": "", "init.text": ""})
    dim, depth, heads, mlp = {"B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096)}[args.variant.split("/")[0]]
    cfg.model.vit.update(dim=dim, depth=depth, heads=heads, mlp_dim=mlp, img_size=(args.size,) * 3)
    cfg.model.vit_overrides.update(remat=args.remat, scan=args.scan)
    cfg.model.text_overrides.update(remat=args.remat, scan=args.scan)
    chips = len(aot.topology_mesh(topology, {"data": -1})[1])
    cfg.data.batch_size = args.per_chip_batch * chips
    # Both towers shard their embedding axis over fsdp: it must divide the ViT's and BERT's width.
    mesh, devices = aot.topology_mesh(topology, parse_mesh(args.mesh, chips, math.gcd(dim, 768)))
    b = clip_align.setup(cfg, mesh)
    n, t, bc = cfg.data.batch_size, cfg.data.max_length, b.bert
    text = 3.0 * n * bc.num_layers * (2 * t * bc.hidden_size * 4 * bc.hidden_size + 4 * t * t * bc.hidden_size
                                      + 4 * t * bc.hidden_size * bc.intermediate_size)
    logits = 3.0 * 2 * n * n * cfg.model.towers.embed_dim
    analytic = aot.vit_train_flops(b.vit, n, b.vit.img_size) + text + logits
    name = (f"stage-2 {cfg.model.towers.objective.upper()} ViT-{args.variant} {args.size}^3 + BERT-base "
            f"{t} tokens, global batch {n}")
    return aot.compile_and_measure(name, topology, mesh, devices, b.jit_step(), (b.abstract_state(), b.abstract_batch()), analytic)


def text_mlm_step(args, topology: str) -> aot.AotResult:
    """The real stage-1 text step (BERT-base MLM with the tied decoder at the masked slots, AdamW)."""
    from decipher_jax.trainers import common, text_mlm

    cfg = common.load_config(os.path.join(os.path.dirname(__file__), "configs", "text_mlm.py"), {"model.path": ""})
    cfg.model.update(remat=args.remat, scan=args.scan)
    cfg.model.bert["num_hidden_layers"] = args.text_layers
    chips = len(aot.topology_mesh(topology, {"data": -1})[1])
    cfg.data.batch_size = args.per_chip_batch * chips
    mesh, devices = aot.topology_mesh(topology, parse_mesh(args.mesh, chips, cfg.model.bert["hidden_size"]))
    b = text_mlm.setup(cfg, mesh)
    n, t, bc = cfg.data.batch_size, cfg.data.max_length, b.bert
    encoder = 3.0 * n * bc.num_layers * (2 * t * bc.hidden_size * 4 * bc.hidden_size + 4 * t * t * bc.hidden_size
                                         + 4 * t * bc.hidden_size * bc.intermediate_size)
    decoder = 3.0 * 2 * n * cfg.data.max_predictions * bc.hidden_size * (bc.hidden_size + bc.vocab_size)
    name = f"stage-1 text MLM BERT-base ({bc.num_layers} layers) {t} tokens, {cfg.data.max_predictions} predictions, b{n}"
    return aot.compile_and_measure(name, topology, mesh, devices, b.jit_step(), (b.abstract_state(), b.abstract_batch()), encoder + decoder)


def caption_step(args, topology: str) -> aot.AotResult:
    """The report-generation step (trainers/caption.py) at scale: a Llama-3.2-1B-sized decoder
    (vocabulary 128256, GQA 32/8 heads, tied embeddings) with LoRA rank 16 on every projection
    and its base weights frozen, over a frozen ViT image tower's tokens through the resampler."""
    from decipher_jax.trainers import caption, common

    cfg = common.load_config(os.path.join(os.path.dirname(__file__), "configs", "caption.py"), {"init.align": ""})
    dim, depth, heads, mlp = {"B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096)}[args.variant.split("/")[0]]
    patch = int(args.variant.split("/")[1])
    cfg.model.vit = dict(dim=dim, depth=depth, heads=heads, mlp_dim=mlp, patch_size=(patch,) * 3,
                         img_size=(args.size,) * 3, num_registers=4, dtype="bfloat16", remat=args.remat, scan=args.scan)
    cfg.model.vocab_size = 128256
    cfg.model.decoder = dict(family="llama", hidden_size=2048, num_layers=args.decoder_layers, num_heads=32, num_kv_heads=8, head_dim=64,
                             intermediate_size=8192, max_position=131072, norm_eps=1e-5, rope_theta=500000.0,
                             rope_llama3=(32.0, 1.0, 4.0, 8192), tie_embeddings=True, dtype="bfloat16",
                             remat=args.remat, scan=args.scan, lora_rank=16,
                             lora_targets=("q", "k", "v", "o", "gate", "up", "down"))
    cfg.optim.lr_rules = [("image/.*", None), ("decoder/(?!.*_lora_).*", None)]
    cfg.data.max_length = args.text_length
    chips = len(aot.topology_mesh(topology, {"data": -1})[1])
    cfg.data.batch_size = args.per_chip_batch * chips
    mesh, devices = aot.topology_mesh(topology, parse_mesh(args.mesh, chips, math.gcd(dim, 2048)))
    b = caption.setup(cfg, mesh)
    n, t = cfg.data.batch_size, cfg.data.max_length + cfg.model.captioner["num_latents"]
    d = cfg.model.decoder
    per_token = 2 * d["num_layers"] * (d["hidden_size"] * 64 * (32 + 2 * 8) + 32 * 64 * d["hidden_size"]
                                       + 3 * d["hidden_size"] * d["intermediate_size"]) + 2 * d["hidden_size"] * 128256
    # Frozen base weights still need the backward through the activations (2x forward), not the weight gradients.
    analytic = aot.vit_train_flops(b.vit, n, b.vit.img_size) / 3 + 3.0 * n * t * per_token
    name = (f"caption: Llama-3.2-1B-sized decoder, LoRA r16 (base frozen), {t} slots + frozen ViT-{args.variant} "
            f"{args.size}^3, b{n}")
    return aot.compile_and_measure(name, topology, mesh, devices, b.jit_step(), (b.abstract_state(), b.abstract_batch()), analytic)


def multiparam_step(args, topology: str) -> aot.AotResult:
    """The multi-parametric pretraining step (trainers/multiparam.py): the multi-sequence ViT over
    four sequences' tokens (4 x the single-volume sequence), two views per study, the decoder,
    the templates and the global-batch InfoNCE."""
    from decipher_jax.trainers import common, multiparam

    cfg = common.load_config(os.path.join(os.path.dirname(__file__), "configs", "multiparam.py"))
    dim, depth, heads, mlp = {"B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096)}[args.variant.split("/")[0]]
    patch = int(args.variant.split("/")[1])
    cfg.model.vit.update(dim=dim, depth=depth, heads=heads, mlp_dim=mlp, patch_size=(patch,) * 3,
                         img_size=(args.size,) * 3, remat=args.remat, scan=args.scan)
    cfg.data.size = (args.size,) * 3
    cfg.pretrain.block = patch
    chips = len(aot.topology_mesh(topology, {"data": -1})[1])
    cfg.data.batch_size = args.per_chip_batch * chips
    mesh, devices = aot.topology_mesh(topology, parse_mesh(args.mesh, chips, dim))
    b = multiparam.setup(cfg, mesh)
    s, n = len(cfg.data.sequences), cfg.data.batch_size
    tokens = s * (args.size // patch) ** 3 + b.vit.num_prefix
    per_token = 2 * depth * (4 * dim * dim + 2 * dim * mlp) + 2 * depth * 2 * tokens * dim  # matmuls + attention
    analytic = 2 * 3.0 * n * tokens * per_token  # two views, forward + backward
    name = f"multiparam: {s}-sequence ViT-{args.variant} {args.size}^3 ({tokens} tokens), 2 views, b{n}"
    return aot.compile_and_measure(name, topology, mesh, devices, b.jit_step(), (b.abstract_state(), b.abstract_batch()), analytic)


STEPS = {"caption": caption_step, "multiparam": multiparam_step, "vit": vit_step, "vision_ssl": vision_ssl_step, "clip_align": clip_align_step, "text_mlm": text_mlm_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", choices=sorted(STEPS), default="vit")
    p.add_argument("--variant", default="B/16")
    p.add_argument("--objective", default="clip", choices=["clip", "siglip"], help="clip_align step only")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=12, help="text_mlm step only: BERT layers")
    p.add_argument("--text-length", type=int, default=256, help="caption step only: text slots after the image prefix")
    p.add_argument("--decoder-layers", type=int, default=16, help="caption step only: decoder layers (Llama-3.2-1B: 16)")
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
