"""Multi-parametric pretraining (BrainMVP's objectives on the multi-sequence 3D ViT).

    decipher train --config experiments/configs/multiparam.py:tiny         --workdir outputs/mp_tiny
    decipher train --config experiments/configs/multiparam.py:tiny,single  --workdir outputs/mp_single
    decipher train --config experiments/configs/multiparam.py              --workdir gs://.../mp_b16

Arguments (comma-separated): ``tiny`` (the demo's scale: the embedded multi-sequence corpus at
32^3), ``single`` (the single-sequence encoder: each view seen alone, as BrainMVP's encoder sees
one channel; the reference the multi-sequence encoder must beat), ``nocon`` (no contrastive
term), ``brainmvp`` (BrainMVP's own settings: temperature 1.0, loss over every voxel, the
contrastive term from two thirds of the run, the templates learnt through the reconstruction alone).

Defaults follow BrainMVP's code (shaohao011/BrainMVP) where it has them: 8^3 blocks, 80% masked
(the paper; its main.py defaults to 0.875), loss weights 10 (template-filled view) / 1
(cross-filled) / 1 (contrastive), AdamW 3e-4. Where we differ, on purpose: the contrastive
negatives span the global batch (BrainMVP: 3 cases per GPU) with temperature 0.1 (BrainMVP 1.0,
at which a batch of 8 barely separates), the contrastive term from step 0, and the reconstruction
loss on the masked voxels only (MAE); ``brainmvp`` restores theirs.
"""

import ml_collections as mlc

SEQUENCES = ("T1", "T2", "FLAIR", "DWI")
OPTIONS = ("tiny", "single", "nocon", "brainmvp")


def get_config(arg=None):
    opts = [o for o in (arg or "").split(",") if o]
    unknown = set(opts) - set(OPTIONS)
    if unknown:
        raise ValueError(f"multiparam.py:{arg}: unknown options {sorted(unknown)}; expected some of {OPTIONS}")
    tiny = "tiny" in opts
    c = mlc.ConfigDict()
    c.seed = 0
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.steps = 300 if tiny else 100_000
    c.log_every = 10 if tiny else 50
    c.checkpoint_every = 100 if tiny else 1000
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    c.stop_after = 0
    c.guard_update_ratio = 1.0
    c.preemption_grace_s = 30.0

    c.data = mlc.ConfigDict()
    c.data.dir = "outputs/demo/multiparam/prep" if tiny else "data/multiparam/prep"
    c.data.sequences = SEQUENCES
    c.data.batch_size = 8 if tiny else 256
    c.data.num_workers = 0 if tiny else 8
    c.data.size = (32, 32, 32) if tiny else (96, 96, 96)
    # The whole study, resized (the templates live on this grid; a crop would misalign them).
    c.data.crop_scale = (1.0, 1.0)
    c.data.flip_axes = (0,)  # left-right flips only, for the same reason
    c.data.drop = 0.25  # each present sequence dropped with this probability (at least one kept)

    c.model = mlc.ConfigDict()
    c.model.vit = (dict(dim=64, depth=2, heads=4, mlp_dim=128, patch_size=(8, 8, 8), img_size=(32, 32, 32),
                        num_registers=0, layerscale=None, pos_embed="learned", stem="linear") if tiny else
                   dict(dim=768, depth=12, heads=12, mlp_dim=3072, patch_size=(16, 16, 16), img_size=(96, 96, 96),
                        dtype="bfloat16", remat="dots", scan=True, num_registers=4, layerscale=1e-5))
    c.model.proj_dim = 64 if tiny else 256
    c.model.decoder_hidden = 0  # 0: the ViT's width
    # > 0: the input view's voxels also reach the decoder, through a per-voxel MLP of this width
    # that the token conditions (MultiParamModel.decode); 0: BrainMVP's decoder without skips.
    c.model.voxel_skip = 0

    c.pretrain = mlc.ConfigDict()
    c.pretrain.context = "target" if "single" in opts else "all"
    c.pretrain.block = 8 if tiny else 16
    c.pretrain.mask_ratio = 0.8
    c.pretrain.loss_on = "masked"
    # The decoder predicts the correction to its input view (output = view + decoder), so it starts
    # from copying the fill; BrainMVP predicts the voxels outright.
    c.pretrain.residual = True
    c.pretrain.template_weight = 10.0
    c.pretrain.cross_weight = 1.0
    c.pretrain.contrastive_weight = 0.0 if "nocon" in opts else 1.0
    c.pretrain.temperature = 0.1
    c.pretrain.contrastive_start = 0
    # Each view drops the study's other sequences independently with this probability, so the two
    # views show different subsets and the contrastive term asks for one representation of the
    # study whichever sequences are present (0: BrainMVP's views, the same study but the fill).
    c.pretrain.view_drop = 0.5
    # "fit": each template is the least-squares fill of its sequence's masked voxels (its mean
    # image); "reconstruction": BrainMVP's, learnt through the reconstruction loss alone.
    c.pretrain.templates = "fit"
    if "brainmvp" in opts:
        c.pretrain.temperature = 1.0
        c.pretrain.loss_on = "all"
        c.pretrain.residual = False
        c.pretrain.contrastive_start = int(c.steps * 2 / 3)
        c.pretrain.templates = "reconstruction"
        c.pretrain.view_drop = 0.0

    c.eval = mlc.ConfigDict()
    c.eval.split = "val"  # on_end: the reconstruction against the copy baselines (heldout.json)

    c.optim = mlc.ConfigDict()
    c.optim.lr = 1e-3 if tiny else 3e-4
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = 20 if tiny else 2000
    c.optim.total_steps = c.get_ref("steps") * 1
    c.optim.weight_decay = 0.05
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.clip_norm = 1.0
    # The templates are images in [0, 1] that start at zero: 30x the lr moves them there in a short run.
    c.optim.lr_rules = [("templates", 30.0)]
    # The templates are volumes, not weights: no decay pulls them back to zero.
    c.optim.no_decay = (r".*(bias|_bias|/scale|ln\d_scale|ls\d|pos_embed|cls|registers|mask_token|seq_embed"
                        r"|templates|stem_norm|skip_pos|skip_gain).*")
    return c
