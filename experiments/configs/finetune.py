"""Fine-tuning the 3D ViT on one task (:mod:`decipher_jax.trainers.finetune`).

    decipher train --config experiments/configs/finetune.py:findings,tiny --workdir W --config.init=outputs/demo/stage2
    decipher train --config experiments/configs/finetune.py:age --workdir W --config.init=gs://.../ssl_b16
    decipher train --config experiments/configs/finetune.py:sex,tiny --workdir W --config.init=    # from scratch

Arguments: a task (findings, abnormal, body_region, sequence, sex, age), ``tiny`` (the demo's
scale: the demo's ViT when training from scratch), ``frozen`` (train the head only: a linear
probe trained by SGD, for comparison), ``anomaly`` (the head also reads the anomaly pool,
training crops are whole volumes, unflipped, and from a pretrained run LP-FT:
``optim.pretrained``, the head starting as the linear probe of the pretrained features:
``model.head_init``). ``init`` is a vision_ssl or clip_align workdir, or "" for random init
(the supervised reference); with an init run the ViT is that run's.

Recipe (as BEiT / DINOv2 fine-tuning, shortened): AdamW, warm-up then cosine, layer-wise lr
decay 0.75, weight decay 0.05, drop path 0.1, gradient clipping at 1.0, random-resized crops, the
backbone frozen for the first ``freeze_backbone_steps`` (the head settles before the features
move). ``tiny`` drops the decay, the clipping, the crops and drop path, which each slowed a
depth-2 ViT learning small lesions (BENCHMARKS.md, "The ViT's readout"). The head reads the CLS
token and the patch tokens' mean and max (``model.pool``).
"""

import ml_collections as mlc

from decipher_jax.models.classifier import DEFAULT_POOL
from decipher_jax.trainers.finetune import TASKS


def get_config(arg=None):
    opts = [o for o in (arg or "").split(",") if o]
    tasks = [o for o in opts if o in TASKS]
    unknown = set(opts) - set(TASKS) - {"tiny", "frozen", "anomaly"}
    if unknown or len(tasks) > 1:
        raise ValueError(f"finetune.py:{arg}: one task of {list(TASKS)} plus tiny / frozen / anomaly")
    tiny, frozen, anomaly = "tiny" in opts, "frozen" in opts, "anomaly" in opts
    c = mlc.ConfigDict()
    c.task = tasks[0] if tasks else "findings"
    c.init = ""  # a vision_ssl or clip_align workdir; "" = random init
    c.seed = 0
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.steps = 300 if tiny else 20_000
    c.log_every = 10 if tiny else 50
    c.checkpoint_every = 100 if tiny else 1000
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    c.stop_after = 0
    c.guard_update_ratio = 1.0
    c.preemption_grace_s = 30.0

    c.data = mlc.ConfigDict()
    c.data.dir = "outputs/demo/data/prep" if tiny else "data/prep"
    c.data.batch_size = 16 if tiny else 256
    c.data.num_workers = 0 if tiny else 8
    c.data.label_fraction = 1.0  # of the training patients
    c.data.label_seed = 0
    # Tiny: the whole volume (flips and intensity jitter only). A crop of 60 % can cut a small
    # lesion out of a positive series; at 400 patients it cost 0.09 val AUROC (BENCHMARKS.md, "The
    # ViT's readout").
    c.data.crop_scale = (1.0, 1.0) if tiny or anomaly else (0.6, 1.0)
    # Each axis flipped with this probability. The anomaly pool compares each patch with the normal
    # bank's patches at the same grid position (or one step away), unflipped and uncropped: it
    # trains on whole volumes without flips.
    c.data.flip_p = 0.0 if anomaly else 0.5

    c.model = mlc.ConfigDict()
    # From scratch: this ViT (the demo's stage-1 ViT at tiny scale); with init, the run's.
    c.model.vit = (dict(dim=64, depth=2, heads=4, mlp_dim=128, patch_size=(8, 8, 8), img_size=(32, 32, 32),
                        num_registers=0, layerscale=None, pos_embed="learned", stem="linear") if tiny else
                   dict(dim=768, depth=12, heads=12, mlp_dim=3072, patch_size=(16, 16, 16), img_size=(96, 96, 96),
                        dtype="bfloat16", remat="dots", scan=True, num_registers=4, layerscale=1e-5))
    c.model.vit_overrides = {}
    # The head's features: the CLS token and the patch tokens' mean and max (a finding in a few
    # patches moves the max; the mean dilutes it by the token count; BENCHMARKS.md, "The ViT's
    # readout").
    # ``anomaly``: the head reads the anomaly pool beside them, the probes' readout of the findings
    # (decipher_jax.models.classifier; its bank: the initial encoder's tokens of the training split's
    # normal series).
    c.model.pool = (*DEFAULT_POOL, "anomaly") if anomaly else DEFAULT_POOL
    c.model.drop_path = 0.0 if tiny else 0.1
    # From a pretrained run: "probe" fits the head first on the initial encoder's features, as
    # the probes fit theirs (LP-FT's linear probe; the fitted head is scored on val as step 0, a
    # candidate for the best step); "random" starts it at random. From random init (the
    # supervised reference) the head always starts at random. ``anomaly``: "probe" (at the demo's
    # scale it lifted the fine-tuned rung with all labels from 0.666 to 0.718 over three draws;
    # BENCHMARKS.md, "The fine-tuned head starts as the probe").
    c.model.head_init = "probe" if anomaly else "random"

    c.optim = mlc.ConfigDict()
    c.optim.lr = 1e-3 if tiny else 5e-4
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = 50 if tiny else 1000
    c.optim.total_steps = c.get_ref("steps") * 1
    c.optim.weight_decay = 0.05
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    # Tiny: no clipping and no layer-wise decay. A depth-2 ViT's stem has to learn the lesions'
    # local contrast, and decay 0.75 slows it to 0.42x the head's lr; together with clipping at
    # 1.0 (gradient norms 2-3) they cost 0.08-0.14 val AUROC at 1200 steps (BENCHMARKS.md).
    c.optim.clip_norm = 0.0 if tiny else 1.0
    c.optim.layer_decay = 0.0 if tiny else 0.75
    c.optim.freeze_backbone_steps = 0 if tiny else 500
    c.optim.lr_rules = [("backbone/.*", None)] if frozen else []
    # From a pretrained run (``init``), these replace the settings above (lr_rules: added to them).
    # With the anomaly pool: LP-FT (Kumar et al. 2022), the head first on the frozen features for
    # half the steps, then the backbone at 0.1x the head's lr, so that the bank (the initial
    # encoder's tokens) keeps describing the tokens it is compared with. At the demo's scale
    # full-lr fine-tuning from stage 2 read 0.53 with all labels, the supervised rung's chance
    # level, where the frozen probe reads 0.74 (BENCHMARKS.md). The supervised reference (init "")
    # keeps the full lr.
    c.optim.pretrained = mlc.ConfigDict({"freeze_backbone_steps": c.get_ref("steps") // 2,
                                         "lr_rules": [("backbone/.*", 0.1)]} if anomaly else {})

    c.eval = mlc.ConfigDict()
    c.eval.every = 50 if tiny else 1000  # val-split score cadence (0: no early stopping)
    c.eval.patience = 3 if tiny else 5  # evaluations without improvement before stopping
    c.eval.batch_size = 16 if tiny else 256
    return c
