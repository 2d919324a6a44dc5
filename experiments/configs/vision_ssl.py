"""Stage 1 vision: DINOv2-style self-distillation of a 3D ViT (DINO + iBOT + KoLeo).

    decipher train --config experiments/configs/vision_ssl.py       --workdir gs://.../ssl_b16
    decipher train --config experiments/configs/vision_ssl.py:tiny  --workdir outputs/ssl_tiny

Defaults follow dinov2/configs/ssl_default_config.yaml adapted to 3D (see shared/REFERENCES.md):
65536 prototypes, bottleneck 256, iBOT sharing the DINO head, loss weights 1 / 1 / 0.1,
teacher temperature 0.04 -> 0.07, student 0.1, centre momentum 0.9, EMA 0.992 -> 1,
AdamW (0.9, 0.999), weight decay 0.04 -> 0.4, lr 0.004 * sqrt(batch / 1024), clip 3.0 per
submodule, last layer frozen for the first "epoch", layer-wise decay 0.9, drop path 0.3,
LayerScale 1e-5, crops 2 global (scale 0.32-1) + 8 local (0.05-0.32), masks on half the global
crops with ratio in [0.1, 0.5].
"""

import math

import ml_collections as mlc


def get_config(arg=None):
    tiny = arg == "tiny"
    c = mlc.ConfigDict()
    c.seed = 0
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.log_every = 1 if tiny else 20
    c.checkpoint_every = 10 if tiny else 1000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.stop_after = 0  # > 0: stop (as if pre-empted) after this step, with a checkpoint
    # A step whose update exceeds this multiple of the parameters' norm (or leaves a non-finite
    # state) is refused and the run stops with the last good state checkpointed (an AdamW
    # update is ~lr per element: the ratio is ~lr / rms(weight), 0.05 at lr 1e-3).
    c.guard_update_ratio = 1.0
    c.preemption_grace_s = 30.0  # SIGTERM: checkpoint after the current step, within this many seconds

    c.data = mlc.ConfigDict()
    c.data.dir = "outputs/demo/data/prep" if tiny else "data/prep"
    c.data.batch_size = 8 if tiny else 1024
    c.data.num_workers = 0 if tiny else 8
    c.data.global_size = (32, 32, 32) if tiny else (96, 96, 96)
    c.data.local_size = (16, 16, 16) if tiny else (48, 48, 48)
    c.data.n_local = 2 if tiny else 8
    c.data.global_scale = (0.32, 1.0)
    c.data.local_scale = (0.05, 0.32)
    c.data.mask_probability = 0.5
    c.data.mask_ratio = (0.1, 0.5)

    c.model = mlc.ConfigDict()
    if tiny:
        vit = dict(dim=64, depth=2, heads=4, mlp_dim=128, patch_size=(8, 8, 8), img_size=(32, 32, 32), stem="linear")
        head = dict(out_dim=256, hidden=128, bottleneck=64, n_layers=3, batch_norm=True)
    else:
        vit = dict(dim=768, depth=12, heads=12, mlp_dim=3072, patch_size=(16, 16, 16), img_size=(96, 96, 96),
                   dtype="bfloat16", remat="dots", scan=True)
        head = dict(out_dim=65536, hidden=2048, bottleneck=256, n_layers=3, dtype="bfloat16", batch_norm=False)
    # LayerScale 1e-5 starts every residual branch at ~0: the CLS token does not see the image
    # until the gammas grow, which takes far longer than a tiny run (CLS std across samples
    # was 2e-6 at init). Tiny runs use no LayerScale.
    c.model.vit = dict(vit, num_registers=0 if tiny else 4, layerscale=None if tiny else 1e-5, pos_embed="learned")
    # Tiny runs put BN in the head's MLP (DINO's use_bn_in_head): the tiny ViT's CLS features
    # have a mean cosine of 0.95 across images at init, so without it the centred teacher
    # logits barely depend on the image and the teacher drifts to uniform.
    c.model.head = head
    c.model.drop_path = 0.0 if tiny else 0.3

    c.steps = 30 if tiny else 125_000
    c.ssl = mlc.ConfigDict()
    c.ssl.centering = "centering"  # or "sinkhorn"
    c.ssl.student_temp = 0.1
    # Tiny runs: a flat 0.04 teacher and a slow EMA teacher (0.99 -> 1). With the 0.04 -> 0.07
    # warm-up or a fast teacher (0.9) the teacher's per-sample entropy climbs to log K within
    # 30-90 steps (the uniform collapse); see BENCHMARKS.md, "Stage 1 at tiny scale".
    c.ssl.teacher_temp = 0.04 if tiny else 0.07
    c.ssl.teacher_temp_start = 0.04
    c.ssl.teacher_temp_warmup_steps = 10 if tiny else 37_500
    c.ssl.center_momentum = 0.9
    c.ssl.momentum_start = 0.99 if tiny else 0.992
    c.ssl.dino_weight = 1.0
    c.ssl.ibot_weight = 1.0
    c.ssl.koleo_weight = 0.1

    c.optim = mlc.ConfigDict()
    c.optim.lr = 0.004 * math.sqrt(c.data.batch_size / 1024) if not tiny else 1e-3
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = 5 if tiny else 12_500
    c.optim.total_steps = c.get_ref("steps") * 1  # follows an override of `steps` (set it to decouple)
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay = 0.04
    c.optim.weight_decay_end = 0.4
    c.optim.clip_norm = 3.0
    c.optim.clip_groups = ("backbone", "head")
    c.optim.layer_decay = 0.9
    c.optim.freeze_last_layer_steps = 2 if tiny else 1250
    c.optim.lr_rules = [("backbone/patch_.*", 0.2)]
    return c
