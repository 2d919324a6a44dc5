"""Report generation and visual question answering: a decoder trained on the frozen stage-2 image
tower's tokens (:class:`decipher_jax.models.captioner.Captioner`).

    decipher train --config experiments/configs/caption.py:tiny --workdir W --config.init.align=STAGE2
    decipher train --config experiments/configs/caption.py:tiny,prior --workdir W2   # no image: the language prior

Each training example is a series' report or one of its templated questions
(:mod:`decipher_jax.data.captions`), with the answer from the record's facts. The image tower is
the ``init.align`` run's (frozen by the rule ``image/.*``; a regex rule can slow it instead); the
resampler, the projector and the decoder learn. With ``model.captioner.anomaly_bank = K`` the
captioner also holds a memory (:class:`decipher_jax.models.captioner.Memory`): the tower's patch
tokens of K training series without findings (:func:`memory_bank`, filled at init, frozen by the
rule ``memory/bank``), against which each image's patches are scored. The decoder is trained
from scratch over a compact vocabulary of the report tokenizer's word pieces (``vocab`` in the
run spec). The evaluation (:mod:`decipher_jax.captioning`) generates on held-out patients.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np

from decipher_jax import optim, runs, runspec
from decipher_jax.data import captions as C
from decipher_jax.data import pipelines as P
from decipher_jax.data import transforms as T
from decipher_jax.eval import textgen
from decipher_jax.models.captioner import Captioner, CaptionerConfig
from decipher_jax.models.decoder import DecoderConfig
from decipher_jax.models.vit3d import ViTConfig
from decipher_jax.trainers import common
from decipher_jax.trainers.finetune import Best


def token_loss(logits, labels, mask):
    """Next-token cross-entropy averaged over the masked positions with the mask's weights, and the
    (unweighted) accuracy there."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
    on = (mask > 0).astype(jnp.float32)
    acc = ((logits.argmax(-1) == labels) * on).sum() / jnp.maximum(on.sum(), 1.0)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1e-6), acc


def vit_config(cfg) -> ViTConfig | None:
    """The ``init.align`` run's image tower (its run spec), else ``model.vit``; None without the image."""
    if not cfg.model.use_image:
        return None
    if cfg.init.align:
        return runs.align_vit_config(runs.read_spec(cfg.init.align))
    return ViTConfig(**runs.from_json(dict(cfg.model.vit)))


def tokenizer_path(cfg) -> str:
    """The report tokenizer: the align run's, else ``data.tokenizer`` (``minilm``: the packaged one)."""
    from decipher_jax.trainers.text_mlm import resolve_model_path

    if cfg.init.align:
        return runs.read_spec(cfg.init.align)["tokenizer"]
    if not cfg.data.tokenizer:
        raise ValueError("caption: set init.align (a stage-2 run) or data.tokenizer")
    return resolve_model_path(cfg.data.tokenizer)


def train_reports(source) -> list[str]:
    """The training split's report texts (one metadata pass)."""
    out = []
    for i in range(len(source)):
        r = source[i].get("report", b"")
        out.append(r.decode("utf-8") if isinstance(r, bytes) else str(r))
    return out


def decoder_config(cfg, vocab_size: int) -> DecoderConfig:
    return DecoderConfig(**dict(cfg.model.decoder), vocab_size=vocab_size, bos_token_id=C.BOS, eos_token_id=C.EOS,
                         pad_token_id=C.PAD)


def make_step(cfg, model: common.Model, tx, freeze_image: bool):
    def step(state, batch):
        def loss_fn(params):
            logits = model(params)(batch["image"], batch["ids"], batch["ids"] != C.PAD, freeze_image=freeze_image)
            return token_loss(logits, batch["labels"], batch["loss_mask"])

        (value, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        new, guard = common.guard_update(value, {"step": state["step"] + 1, "params": params, "opt": opt}, state,
                                         params=state["params"], new_params=params,
                                         max_update_ratio=cfg.guard_update_ratio)
        return new, {"loss": value, "token_acc": acc, **guard, "grad_norm": common.tree_norm(grads),
                     **optim.current_hparams(opt)}

    return step


def val_examples(cfg, vocab: C.SubVocab, size) -> dict[str, np.ndarray]:
    """Every val series' report and every one of its questions as examples (in order, the same
    at every evaluation), with the retrieved context when the run uses one."""
    src = P.data_source(cfg.data.dir, "val")
    context = None
    if cfg.data.get("retrieve", 0):
        from decipher_jax.captioning import retrieved_reports

        context = retrieved_reports(cfg.init.align, cfg.data.dir, "val", int(cfg.data.retrieve))
    out: dict[str, list] = {k: [] for k in ("image", "ids", "labels", "loss_mask", "is_question")}
    for i in range(len(src)):
        ex = T.Resize(size).map(C.DecodeWithFacts().map(src[i]))
        tasks = ([("", ex["report"])] if ex.get("report", "").strip() else []) + \
            [(textgen.QUESTIONS[k], a) for k, a in sorted(ex["qa"].items())]
        for q, a in tasks:
            if context is not None:
                q = C.with_context(q, context.get(ex["series_id"], ""))
            ids, labels, mask = C.sequence(vocab, q, a, cfg.data.max_length)
            for k, v in (("image", ex["image"]), ("ids", ids), ("labels", labels), ("loss_mask", mask),
                         ("is_question", np.float32(bool(a != ex.get("report"))))):
                out[k].append(v)
    return {k: np.stack(v) for k, v in out.items()}


class BestVal(Best):
    """Early stopping on the val split's answer-token loss (its negation is the score to maximise):
    the best step's parameters are kept in ``best/`` (``CaptionModel`` reads them), and the run
    stops after ``eval.patience`` evaluations without improvement. A decoder on a few hundred
    templated reports memorises them long before its steps run out. ``eval.select``: ``"all"``
    (every answer token, reports included: mostly report tokens) or ``"answers"`` (the questions'
    answers alone)."""

    label = "caption"

    def __init__(self, cfg, model, mesh, vocab, size):
        self.cfg, self.model, self.mesh, self.vocab, self.size = cfg, model, mesh, vocab, size
        self.workdir, self.examples = None, None
        self.record = {"step": None, "score": None, "evals": {}}
        self.spec = types.SimpleNamespace(task="-(answer-token loss)")
        self._loss = jax.jit(lambda p, b: token_loss(model(p)(b["image"], b["ids"], b["ids"] != C.PAD), b["labels"],
                                                     b["loss_mask"])[0] * jnp.maximum(b["loss_mask"].sum(), 1.0))

    def evaluate(self, params, split):
        from decipher_jax import sharding as sh
        from decipher_jax.eval import embed

        if self.examples is None:
            self.examples = val_examples(self.cfg, self.vocab, self.size)
            if self.cfg.eval.get("select", "all") == "answers":  # the questions' answers alone
                self.examples["loss_mask"] = self.examples["loss_mask"] * self.examples["is_question"][:, None]
            self.examples.pop("is_question")
        n, bs = len(self.examples["ids"]), embed.round_batch(self.cfg.eval.batch_size, self.mesh)
        total = 0.0
        with jax.set_mesh(self.mesh):
            for lo in range(0, n, bs):
                b = {k: v[lo: lo + bs] for k, v in self.examples.items()}
                pad = bs - len(b["ids"])
                if pad:  # padded rows carry no loss
                    b = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
                total += float(self._loss(params, sh.shard_batch(b, self.mesh)))
        loss = total / max(float(self.examples["loss_mask"].sum()), 1.0)
        return {"score": -loss, "loss": loss}, {}

    def finish(self, state) -> dict:
        step = self.record["step"]
        return {"best_step": int(step) if step is not None else int(state["step"]),
                "val_loss": -self.record["score"] if self.record["score"] is not None else float("nan")}


def memory_bank(model: common.Model, params, source, k: int, size, mesh, seed: int = 0) -> tuple[np.ndarray, int]:
    """``(K, N, D)``: the image tower's patch tokens of ``k`` training series without findings
    (:func:`decipher_jax.eval.localisation.normal_index`: at most ``k`` of each body region and
    sequence, then ``k`` of them drawn with ``seed``; fewer than ``k`` are repeated, which leaves
    every nearest distance as it is), and how many such series there were."""
    from decipher_jax.eval import embed
    from decipher_jax.eval import localisation as L

    idx = L.normal_index(source, per_group=k, seed=seed)
    if len(idx) < 2:  # a series in the bank is not its own neighbour: one alone would have none
        raise ValueError("caption: model.captioner.anomaly_bank needs at least 2 training series without findings; "
                         f"the training split ({len(source)} series) has {len(idx)}")
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(idx, k, replace=False)) if len(idx) > k else [idx[i % len(idx)] for i in range(k)]
    fn = jax.jit(lambda p, b: {"tokens": model(p).image(b["image"])["patch"].astype(jnp.float32)})
    bs = embed.round_batch(16, mesh)
    batches = embed.scan_split(P.Subset(source, rows), [T.Decode(), T.Resize(size)], bs)
    out = embed.apply(functools.partial(fn, params), batches, mesh, ["image"], meta_keys=())
    return out["tokens"], len(idx)


def setup(cfg, mesh) -> common.Setup:
    """The caption trainer on ``mesh``; reads the training split's reports (the vocabulary) and no
    weights until ``init``."""
    fixed_vocab = int(cfg.model.get("vocab_size", 0))
    if fixed_vocab:  # ahead-of-time compilation at a given vocabulary size: no data, no tokenizer
        train_src = tok_path = vocab = None
    else:
        train_src = P.data_source(cfg.data.dir, "train")
        tok_path = tokenizer_path(cfg)
        vocab = C.SubVocab.build(tok_path, train_reports(train_src))
    vit = vit_config(cfg)
    dec = decoder_config(cfg, fixed_vocab or len(vocab))
    ccfg = CaptionerConfig(**dict(cfg.model.captioner), use_image=bool(cfg.model.use_image))
    model = common.Model(lambda r: Captioner(vit, dec, ccfg, rngs=r), mesh)
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    tx = optim.build(cfg.optim, params_shape)
    shardings, shapes = common.params_state(model, tx, mesh, params_shape)
    freeze = optim.frozen_towers(cfg.optim, params_shape, ["image"]).get("image", False)
    size = tuple(vit.img_size) if vit else tuple(cfg.model.vit["img_size"])

    if ccfg.use_image and ccfg.anomaly_bank:
        frozen_bank = optim.first_match("memory/bank", [tuple(r) for r in cfg.optim.get("lr_rules", ())], 1.0) is None
        if not frozen_bank:
            raise ValueError("caption: model.captioner.anomaly_bank needs the rule ('memory/bank', None) in "
                             "optim.lr_rules: the bank holds the frozen tower's tokens and must not train")
        if vit is not None and (vit.dtype, vit.param_dtype) != ("float32", "float32"):
            raise ValueError("caption: model.captioner.anomaly_bank needs a float32 image tower: a training series "
                             "in the bank is recognised by its recomputed tokens matching the bank's (cosine within "
                             f"1e-5), which {vit.dtype} / {vit.param_dtype} compute does not promise")
        if not freeze:
            raise ValueError("caption: model.captioner.anomaly_bank compares the image tower's tokens with a bank "
                             "of its initial tokens, so the tower must stay frozen (rule ('image/.*', None)); "
                             "set model.captioner.anomaly_bank=0 (caption.py:tiny,nomemory) to train the tower")

    def init():
        params = model.init(jax.random.key(cfg.seed))
        if vit is not None and cfg.init.align:
            from decipher_jax.trainers.finetune import backbone_params

            params["image"], where = backbone_params(cfg.init.align, params_shape["image"], model.shardings["image"])
            print(f"caption: image tower <- {where}", flush=True)
        if ccfg.use_image and ccfg.anomaly_bank and train_src is not None:
            bank, n_normal = memory_bank(model, params, train_src, ccfg.anomaly_bank, size, mesh, cfg.seed)
            params["memory"]["bank"] = jax.device_put(bank, model.shardings["memory"]["bank"])
            print(f"caption: memory bank of {ccfg.anomaly_bank} rows from {n_normal} training series without "
                  "findings", flush=True)
        opt = jax.jit(tx.init, out_shardings=shardings["opt"])(params)
        return {"step": jnp.zeros([], jnp.int32), "params": params, "opt": opt}

    def data():
        if vocab is None:
            raise ValueError("caption: model.vocab_size is for ahead-of-time compilation only; training builds the "
                             "vocabulary from the training split (set model.vocab_size = 0)")
        print(f"caption: {len(train_src)} training series, vocabulary {len(vocab)} ids "
              f"({'image prefix of ' + str(ccfg.num_latents) + ' latents' if vit else 'no image: language prior'})",
              flush=True)
        loader = P.LoaderConfig(batch_size=cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers)
        ds, per_host = P._base(train_src, loader)
        ds = ds.map(C.DecodeWithFacts()).map(T.Resize(size))
        context = None
        if cfg.data.get("retrieve", 0):
            from decipher_jax.captioning import retrieved_reports

            if not cfg.init.align:
                raise ValueError("caption: data.retrieve needs init.align (the stage-2 run that retrieves)")
            context = retrieved_reports(cfg.init.align, cfg.data.dir, "train", int(cfg.data.retrieve))
        ds = ds.random_map(C.Examples(vocab, cfg.data.max_length, cfg.data.report_fraction, context,
                                      float(cfg.data.get("answer_weight", 1.0))))
        return iter(P._finish(ds.map(P.DropStrings()), per_host, loader))

    def run_spec():
        return runspec.RunSpec("caption", {**runspec.as_json(cfg), "vocab": list(vocab.pieces)}, vit=vit,
                               tokenizer=common.tokenizer_dir(tok_path), preprocessing=runspec.preprocessing(cfg.data.dir))

    b, t = cfg.data.batch_size, cfg.data.max_length
    batch_spec = {"image": ((b, *size, 1), jnp.float32), "ids": ((b, t), jnp.int32), "labels": ((b, t), jnp.int32),
                  "loss_mask": ((b, t), jnp.float32)}
    s = common.Setup("caption", cfg, mesh, model, tx, shardings, shapes, make_step(cfg, model, tx, freeze), batch_spec,
                     init, data, run_spec, log_keys=("loss", "token_acc"), vit=vit)
    s.frozen = {"image": freeze}
    if vocab is not None and cfg.eval.get("every", 0):
        best = BestVal(cfg, model, mesh, vocab, size)

        def stopped(workdir):
            best.open(workdir)
            return best.record.get("stopped", False)

        s.on_start = lambda state, workdir, fresh: (best.open(workdir), ())[1]
        s.after_step, s.stopped = best.after_step, stopped
        s.on_end = lambda state, metrics, workdir: {**metrics, **best.finish(state)}
    return s


@common.locked
def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) the caption / VQA decoder; returns the last metrics."""
    return common.train(setup(cfg, common.make_mesh(cfg, "caption")), workdir)


def summary(cfg, m: dict, seconds: float) -> str:
    what = "image-conditioned decoder" if cfg.model.use_image else "language-prior decoder (no image)"
    best = f"; best val answer-token loss {m['val_loss']:.3f} at step {m['best_step']}" if "val_loss" in m else ""
    if "loss" not in m:  # a finished run resumed: no step ran
        return f"{what}: already trained to step {cfg.steps} (or stopped early before it){best}"
    return (f"{what}, {cfg.steps} steps at most, in {seconds:.0f} s: training answer-token loss {m['loss']:.3f}, "
            f"accuracy {m['token_acc']:.3f}{best}")
