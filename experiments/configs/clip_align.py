"""Stage 2: align the stage-1 3D ViT and report encoder (CLIP / SigLIP / NeuroBERT regression).

    decipher train --config experiments/configs/clip_align.py:tiny --workdir outputs/clip_tiny
    decipher train --config experiments/configs/clip_align.py:tiny,siglip --workdir W
    decipher train --config experiments/configs/clip_align.py:lit --workdir W       # locked image tower
    decipher train --config experiments/configs/clip_align.py:tiny,locktext --workdir W  # locked report encoder
    decipher train --config experiments/configs/clip_align.py:regress --workdir W   # MSE to frozen text

The argument is a comma-separated list: ``tiny``; an objective ``clip`` (default), ``siglip``
or ``regress``; ``lit`` (image tower locked: one optimiser rule); ``locktext`` (the report
encoder locked and the image tower at the full lr: each training report is encoded once and
looked up, ``data.cache_text``, so a tiny step costs ~0.07 s against ~0.6 s with the text
forward and ~1.6 s training both; the demo's stage 2). Defaults follow open_clip
(temperature 1/0.07 learnt, clamped at 100; AdamW betas (0.9, 0.98), weight decay 0.1) and
big_vision SigLIP (t' = log 10, b = -10), with a linear warm-up and cosine decay.
"""

import ml_collections as mlc


def get_config(arg=None):
    opts = {o for o in (arg or "").split(",") if o}
    unknown = opts - {"tiny", "clip", "siglip", "regress", "lit", "locktext"}
    if unknown:
        raise ValueError(f"unknown config options {sorted(unknown)}")
    tiny = "tiny" in opts
    objective = "siglip" if "siglip" in opts else "regress" if "regress" in opts else "clip"

    c = mlc.ConfigDict()
    c.seed = 0
    # FSDP: replicated parameters make every (simulated) device repeat the whole AdamW update.
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    c.steps = (1000 if "locktext" in opts else 80) if tiny else 20_000
    c.stop_after = 0
    # A step whose update exceeds this multiple of the parameters' norm (or leaves a non-finite
    # state) is refused and the run stops with the last good state checkpointed (an AdamW
    # update is ~lr per element: the ratio is ~lr / rms(weight), 0.05 at lr 1e-3).
    c.guard_update_ratio = 1.0
    c.preemption_grace_s = 30.0  # SIGTERM: checkpoint after the current step, within this many seconds
    c.log_every = 5 if tiny else 50
    c.checkpoint_every = 40 if tiny else 1000
    c.keep_checkpoints = 3
    c.async_checkpoints = True

    # Where the towers come from: a vision_ssl workdir (its EMA teacher's backbone) and a HF
    # BERT directory (a text_mlm run's hf_export, PubMedBERT, or "minilm"). "" = random init.
    c.init = mlc.ConfigDict()
    c.init.vision = "outputs/demo/stage1_vision" if tiny else "checkpoints/stage1_vision"
    c.init.vision_from = "teacher"
    c.init.text = "outputs/demo/stage1_text/hf_export" if tiny else "checkpoints/stage1_text/hf_export"

    c.data = mlc.ConfigDict()
    c.data.dir = "outputs/demo/data/prep" if tiny else "data/prep"
    c.data.batch_size = 16 if tiny else 4096
    c.data.num_workers = 0 if tiny else 8
    c.data.max_length = 64 if tiny else 256
    c.data.crop_scale = (0.6, 1.0)  # stage 2 sees most of the series: its report describes all of it
    # A series' text: its description then its study's report, or "report" alone (shared by the
    # study's series, which then teaches the image tower to ignore what tells them apart).
    c.data.text = "description+report"
    c.data.tokenizer = ""  # only needed when init.text is "" (random text tower)
    c.data.cache_text = True  # a locked text tower encodes each training report once (clip_align.text_cache)

    c.model = mlc.ConfigDict()
    # Used when init.vision is "" (random image tower); otherwise the stage-1 run's ViT is read.
    if tiny:
        c.model.vit = dict(dim=64, depth=2, heads=4, mlp_dim=128, patch_size=(8, 8, 8), img_size=(32, 32, 32),
                           stem="linear")
    else:
        c.model.vit = dict(dim=768, depth=12, heads=12, mlp_dim=3072, patch_size=(16, 16, 16), img_size=(96, 96, 96),
                           num_registers=4)
    c.model.vit_overrides = {} if tiny else {"dtype": "bfloat16", "remat": "dots", "scan": True}
    # Used when init.text is "" (random text tower; AOT): HF config.json fields (PubMedBERT-base).
    c.model.bert = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
    c.model.text_overrides = {} if tiny else {"dtype": "bfloat16", "remat": "dots", "scan": True}
    # Tiny: the 30-step stage-1 ViT's mean patch token carries more of the series than its CLS
    # (held-out R@5 0.79-0.87 against 0.67-0.83 with CLS, 60 steps; BENCHMARKS.md / issue notes).
    # Tiny: the channel-wise max over the patch tokens, so the report's findings (a lesion in a
    # few patches) reach the image embedding; frozen finding probes on the stage-2 tower 0.69 ->
    # 0.78 at 400 patients (BENCHMARKS.md, "Stage 2 for the findings").
    c.model.towers = dict(objective=objective, embed_dim=128 if tiny else 512, image_pool="max" if tiny else "cls",
                          # MiniLM (tiny) was trained with mean pooling; BERT-style CLS otherwise.
                          text_pool="mean" if tiny else "cls",
                          # Centre the pooled text features on the training texts' mean (anisotropy).
                          center_text=True,
                          # A series' description weighs this much of its pooled text (data.text).
                          description_weight=0.5,
                          # A residual MLP of this width on the pooled text features (0: none;
                          # towers.TextAdapter; 512 lowered zero-shot 0.60 -> 0.54 at 400 patients).
                          text_adapter=0)
    c.model.drop_path = 0.0 if tiny else 0.1

    c.loss = mlc.ConfigDict()
    c.loss.regression = "mse"  # or "cosine" (objective "regress")
    # The report's sentences as extra positives: each step also aligns every image with every
    # distinct sentence of the batch's reports (positives: the reports that hold it, so "No
    # acute infarct." is a negative of the infarct reports), weighed by this; needs the locked
    # text tower's cache ("locktext").
    # Tiny + locktext: on (every distinct sentence of the batch's reports; zero-shot finding
    # queries 0.56 -> 0.62, frozen finding probes 0.78 -> 0.81 at 400 patients).
    c.loss.sentence_weight = 1.0 if tiny and "locktext" in opts else 0.0
    c.loss.patch_weight = 0.0  # patch-level multiple-instance alignment with the sentences (needs them)

    c.optim = mlc.ConfigDict()
    c.optim.lr = 1e-3 if tiny else 5e-4
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = (30 if "locktext" in opts else 6) if tiny else 600
    c.optim.total_steps = c.get_ref("steps") * 1  # follows an override of `steps` (set it to decouple)
    c.optim.b1, c.optim.b2 = 0.9, 0.98
    c.optim.weight_decay = 0.1 if not tiny else 0.01
    c.optim.weight_decay_end = c.optim.weight_decay
    c.optim.clip_norm = 1.0
    # (regex, lr multiplier or None = frozen), first match wins. The pretrained towers learn 10x
    # slower than the fresh projections; "lit" locks the image tower. (Tiny: with the image tower
    # at the full lr, its embeddings collapsed within 15 steps, std 0.017 -> 0.006.)
    rules = [("image/.*", 0.1), ("text/.*", 0.1)]
    if "lit" in opts:
        rules = [("image/.*", None)] + rules
    if "locktext" in opts:  # the report encoder is a fixed target; the image tower learns at the full lr
        rules = [("text/.*", None), ("image/.*", 1.0)] + rules
    c.optim.lr_rules = rules

    c.eval = mlc.ConfigDict()
    c.eval.splits = ("test",)
    c.eval.before = True  # also evaluate the stage-1 towers with fresh projections (step 0)
    c.eval.batch_size = 16 if tiny else 256
    return c
