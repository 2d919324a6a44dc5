"""Report generation and VQA from the frozen stage-2 image tower (:mod:`decipher_jax.trainers.caption`).

    decipher train --config experiments/configs/caption.py:tiny --workdir W --config.init.align=outputs/demo/stage2
    decipher train --config experiments/configs/caption.py:tiny,prior --workdir W2   # the language prior
    decipher caption --workdir W --split test          # generated reports and VQA, with the baselines

Arguments: ``tiny`` (a CPU-sized decoder trained from scratch on the corpus's reports), ``prior``
(the same decoder without the image: the language-prior baseline), ``rag`` (retrieval-augmented:
the stage-2 run's best-ranked training report for the image stands before each question), ``memory`` /
``nomemory`` (each image patch's distance to the nearest patch of training studies without findings enters the
prefix: ``model.captioner.anomaly_bank`` rows, :class:`decipher_jax.models.captioner.Memory`; on by default with
``tiny``, off by default in the full config). The image tower is frozen
(``optim.lr_rules``); the perceiver resampler, the projector and the decoder learn.
"""

import ml_collections as mlc


def get_config(arg=None):
    opts = {o for o in (arg or "").split(",") if o}
    unknown = opts - {"tiny", "prior", "rag", "memory", "nomemory"}
    if unknown or {"prior", "rag"} <= opts or {"prior", "memory"} <= opts or {"memory", "nomemory"} <= opts:
        raise ValueError(f"caption.py:{arg}: options tiny, memory or nomemory, and prior or rag")
    tiny = "tiny" in opts
    c = mlc.ConfigDict()
    c.seed = 0
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.steps = 1000 if tiny else 50_000
    c.log_every = 50 if tiny else 100
    c.checkpoint_every = 500 if tiny else 2000
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    c.stop_after = 0
    c.guard_update_ratio = 1.0
    c.preemption_grace_s = 30.0

    c.init = mlc.ConfigDict()
    c.init.align = "" if "prior" in opts else ("outputs/demo/stage2" if tiny else "checkpoints/stage2")

    c.data = mlc.ConfigDict()
    c.data.dir = "outputs/demo/data/prep" if tiny else "data/prep"
    c.data.tokenizer = "minilm"  # the report tokenizer when there is no align run (the prior)
    c.data.batch_size = 32 if tiny else 256
    c.data.num_workers = 0 if tiny else 8
    # [BOS] question [SEP] answer [EOS], in word pieces: the embedded reports are 52 pieces (median), 80 (90th
    # percentile), 103 at most; a longer one is cut (and loses its end token).
    c.data.max_length = (96 if tiny else 256) * (2 if "rag" in opts else 1)
    c.data.report_fraction = 0.5  # the rest of the examples are templated questions
    # A question's answer tokens weigh this much in the training loss (a report's 1): at 1 the answers are about
    # 3 % of the loss (1-2 word pieces against a report's ~55).
    c.data.answer_weight = 1.0
    # Retrieval-augmented: the training reports the stage-2 run ranks first for the image, before the
    # question (their word pieces count in max_length: a question part is cut to half of it).
    c.data.retrieve = 1 if "rag" in opts else 0

    c.model = mlc.ConfigDict()
    c.model.use_image = "prior" not in opts
    c.model.vocab_size = 0  # 0: the training reports' compact vocabulary; > 0 only to compile ahead of time
    # Without an align run (the prior) the ViT only fixes the input size.
    c.model.vit = dict(dim=64, depth=2, heads=4, mlp_dim=128, patch_size=(8, 8, 8), img_size=(32, 32, 32), stem="linear")
    # anomaly_bank: 0, or the memory's rows (training series without findings; the demo corpus's training split has
    # 101, so 128 holds them all, some twice). On by default at the tiny sizes: on the demo corpus it lifted the
    # image-dependent answers from 0.590 to 0.779 and the finding F1 from 0.33 to 0.57 (BENCHMARKS.md, "The
    # nearest-normal-patch distance"). Its search costs O(B K N^2 D) per step, about a third of the tiny step
    # (N = 64 patches); at the full config's N = 216 and K = 1024 it wants a chunked or approximate search first,
    # so there it is off unless asked for (``memory``).
    if "prior" in opts or "nomemory" in opts:
        bank = 0
    else:
        bank = 128 if tiny else (1024 if "memory" in opts else 0)
    c.model.captioner = dict(num_latents=16 if tiny else 32, resampler_depth=2, resampler_heads=4, anomaly_bank=bank)
    if tiny:
        c.model.decoder = dict(family="llama", hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                               intermediate_size=384, max_position=256)
    else:  # about GPT-2 small, in Llama's layout
        c.model.decoder = dict(family="llama", hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                               intermediate_size=2048, max_position=1024, dtype="bfloat16", remat="dots", scan=True)

    c.optim = mlc.ConfigDict()
    c.optim.lr = 1e-3 if tiny else 3e-4
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 100 if tiny else 1000
    c.optim.total_steps = c.get_ref("steps") * 1
    c.optim.b1, c.optim.b2 = 0.9, 0.98
    c.optim.weight_decay = 0.01
    c.optim.weight_decay_end = c.optim.weight_decay
    c.optim.clip_norm = 1.0
    # The stage-2 image tower stays frozen, and so does the memory's bank of its tokens.
    c.optim.lr_rules = [("image/.*", None)] + ([("memory/bank", None)] if bank else [])

    c.eval = mlc.ConfigDict()
    c.eval.batch_size = 32 if tiny else 256
    # Early stopping on the val split's answer-token loss (the best step's parameters are the run's).
    c.eval.every = 100 if tiny else 1000
    c.eval.patience = 3
    # The val loss of the questions' answers alone picks the step ("all": every answer token, mostly the
    # reports'). On the demo corpus "answers" chose step 400 against 200, and every score rose
    # (BENCHMARKS.md, "Report generation and VQA on the demo corpus").
    c.eval.select = "answers"
    return c
