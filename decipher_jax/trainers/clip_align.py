"""Stage 2: contrastive alignment of the stage-1 3D ViT with the stage-1 report encoder.

    decipher train --config experiments/configs/clip_align.py:tiny --workdir W
    decipher train --config experiments/configs/clip_align.py:tiny,siglip --workdir W
    decipher train --config experiments/configs/clip_align.py:tiny,lit --workdir W      # locked image tower
    decipher train --config experiments/configs/clip_align.py:tiny,regress --workdir W  # NeuroBERT-style

Objectives (``model.towers.objective``): ``clip`` (symmetric InfoNCE, learnt temperature),
``siglip`` (sigmoid, learnt temperature and bias) and ``regress`` (the image embedding regresses
the frozen pooled text embedding of its report, MSE or cosine). Negatives are the whole global
batch: the loss is computed on the global (sharded) arrays, never per device. The text of a
series (``data.text``) is its study's report, or its series description followed by the report
(the default; a series without a description gets the report alone); pairs with equal text
ids (``pair_id_hash``: the study, or study + description) are all positives. The pooled text
of a series with a description mixes in the description line alone
(``model.towers.description_weight``), so a few description tokens are not lost in the mean
over a long report.

With ``loss.sentence_weight`` (and a locked text tower) the report's sentences are extra
positives: each step also aligns the images with every distinct sentence of the batch's reports
(:func:`batch_sentences`, :func:`sentence_loss`), a sentence being a positive of each report
that holds it, so "No joint effusion." is a negative of the effusion reports in the batch. This
is what a zero-shot query scores against: one sentence, not a whole report. With
``loss.patch_weight`` the same objective is also applied at the patch level: an image's score for a
sentence is its best patch's cosine (:func:`patch_sentence_sim`), so a finding's sentence must be
matched by some patch of the images that report it (multiple-instance alignment, for text-guided
localisation; BENCHMARKS.md, "Anomaly localisation").

Towers start from stage 1: the vision tower from a ``vision_ssl`` workdir (the EMA teacher's
backbone, as DINOv2 evaluates it; its architecture is read from the run's ``run_spec.json``),
the text tower from a Hugging Face directory (a ``text_mlm`` run's ``hf_export``, PubMedBERT, or
"minilm"). Freezing or slowing a tower is an optimiser rule (``("image/.*", None)``: LiT); a
frozen tower's output is also cut from the backward pass, and a locked text tower's output for
each training report is computed once and looked up by the step (:func:`text_cache`). At the start and at the end the
run evaluates image<->report retrieval on the held-out split (``eval_<split>.json``).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax import checkpoint as ckpt
from decipher_jax import layout, losses, optim, runs, runspec
from decipher_jax.data import pipelines as P
from decipher_jax.interop import hf_bert
from decipher_jax.models import bert
from decipher_jax.models.towers import TowersConfig, TwoTowers, normalise
from decipher_jax.models.vit3d import ViTConfig
from decipher_jax.runs import from_json
from decipher_jax.trainers import common

TOWERS = ("image", "text")


# -- configuration of the towers ----------------------------------------------------------------

def text_path(cfg) -> str | None:
    from decipher_jax.trainers.text_mlm import resolve_model_path

    return resolve_model_path(cfg.init.text) if cfg.init.get("text") else None


def vit_config(cfg) -> ViTConfig:
    """The stage-1 run's ViT (from its run_spec.json) when initialising from one, else ``model.vit``."""
    d = dict(cfg.model.vit)
    if cfg.init.get("vision"):
        stage1 = runs.read_spec(cfg.init.vision)  # init.vision: a vision_ssl workdir
        d = stage1.get("vit") or stage1["config"]["model"]["vit"]  # (a spec without the shared schema)
    d.update(dict(cfg.model.get("vit_overrides", {})))
    return ViTConfig(**from_json(d))


def bert_config(cfg) -> bert.BertConfig:
    """From the text checkpoint's config.json, else from ``model.bert`` (HF field names; AOT)."""
    over = dict(cfg.model.get("text_overrides", {}))
    path = text_path(cfg)
    if path:
        return bert.read_config(path, mlm_head=False, **over)
    return bert.BertConfig.from_hf(dict(cfg.model.bert), mlm_head=False, **over)


def towers_config(cfg) -> TowersConfig:
    return TowersConfig(**dict(cfg.model.towers))


# -- the step -----------------------------------------------------------------------------------

def batch_loss(m: TwoTowers, batch, *, objective: str, frozen: dict, regression: str = "mse",
               drop_path: float = 0.0, key=None, sentence_w: float = 0.0, patch_w: float = 0.0):
    """``(loss, aux)`` of one global batch; used by the step and by the parity tests. With
    ``sent_feats`` / ``sent_valid`` / ``sent_pos`` in the batch (:func:`batch_sentences`) the
    loss adds ``sentence_w`` times the same objective between the images and every distinct
    sentence of the batch's reports (:func:`sentence_loss`), and ``patch_w`` times it at the
    patch level: an image's score for a sentence is its best-matching patch's
    (:func:`patch_sentence_sim`), so a finding's sentence has to be found in some patch of the
    images that report it and in none of the others' (multiple-instance alignment, for
    text-guided localisation)."""
    fi, fp = m.image_features(batch["image"], freeze=frozen.get("image", False), drop_path=drop_path, key=key)
    if "text_feats" in batch:  # a locked text tower's features, looked up (see text_cache)
        ft = jax.lax.stop_gradient(batch["text_feats"])
    else:
        ft = m.pair_text_features(batch["input_ids"], batch["attention_mask"], batch.get("desc_ids"),
                                  batch.get("desc_mask"), batch.get("has_desc"),
                                  freeze=frozen.get("text", False) or objective == "regress")
    zi, zt = m.project_image(fi), m.project_text(ft)
    zi_n, zt_n = normalise(zi), normalise(zt)
    pos = losses.positives(batch["pair_id_hash"])
    if objective == "clip":
        loss = losses.clip_loss(zi_n, zt_n, m.logit_scale[...], pos)
    elif objective == "siglip":
        loss = losses.siglip_loss(zi_n, zt_n, m.logit_scale[...], m.logit_bias[...], pos)
    else:  # regress: the raw projection against the frozen text embedding
        loss = losses.regression_loss(zi, zt, regression)
    aux = {}
    if "sent_feats" in batch:  # the batch's report sentences, positives by membership
        zs_n = normalise(m.project_text(jax.lax.stop_gradient(batch["sent_feats"])))
        sl = sentence_loss(zi_n, zs_n, batch["sent_valid"], batch["sent_pos"], m.logit_scale[...],
                           m.logit_bias[...] if objective == "siglip" else None)
        loss = loss + sentence_w * sl
        aux["sentence_loss"] = sl
        if patch_w:
            sim = patch_sentence_sim(normalise(m.project_image(fp)), zs_n)
            pl = sentence_loss(None, None, batch["sent_valid"], batch["sent_pos"], m.logit_scale[...],
                               m.logit_bias[...] if objective == "siglip" else None, sim=sim)
            loss = loss + patch_w * pl
            aux["patch_loss"] = pl
    sim = zi_n @ zt_n.T
    hit = jnp.take_along_axis(pos, jnp.argmax(sim, axis=1)[:, None], axis=1)[:, 0]
    aux |= {"i2t_acc": hit.mean(), "positives_per_row": pos.sum(1).mean(),
           "temperature": jnp.exp(jnp.minimum(m.logit_scale[...], losses.LOG_MAX_SCALE)), "bias": m.logit_bias[...],
           "embed_std": zi_n.std(axis=0).mean()}
    return loss, aux


def batch_sentences(bags):
    """Every distinct report sentence of the batch and which rows' reports hold it: the
    sentence rows ``(C,)`` (``C = B K``; -1 marks an unused column) and the positives ``(B, C)``,
    ``pos[i, c]`` when sentence ``c`` is in row ``i``'s report ("No acute infarct." is a
    positive of every report that says it, and a negative of the ones that report an infarct).
    ``bags``: ``(B, K)`` sentence rows, each row sorted with its -1 padding first
    (:func:`sentence_table`)."""
    b, k = bags.shape
    cols = jnp.unique(bags.reshape(-1), size=b * k, fill_value=-1)  # sorted; -1 first (padding) and last (fill)
    at = jax.vmap(lambda row: jnp.searchsorted(row, cols))(bags)  # (B, C)
    pos = (jnp.take_along_axis(bags, jnp.clip(at, 0, k - 1), axis=1) == cols[None, :]) & (cols >= 0)[None, :]
    return cols, pos


def patch_sentence_sim(zp_n, zs_n):
    """``(B, C)``: each image's best patch cosine with each sentence; ``zp_n`` ``(B, N, d)``
    normalised patch embeddings, ``zs_n`` ``(C, d)``."""
    return jnp.max(jnp.einsum("bnd,cd->bnc", zp_n.astype(jnp.float32), zs_n.astype(jnp.float32)), axis=1)


def sentence_loss(zi_n, zs_n, valid, pos, log_scale, bias=None, *, sim=None):
    """Stage 2's objective between ``B`` images and ``C`` sentences (``valid``: the columns in
    use) with several positives per row and per column: CLIP's symmetric multi-positive
    InfoNCE (:func:`decipher_jax.losses.clip_loss`, over the valid columns), or with ``bias``
    SigLIP's sigmoid loss over the valid pairs. ``sim``: the ``(B, C)`` cosines when they are
    not ``zi_n @ zs_n.T`` (:func:`patch_sentence_sim`)."""
    if sim is None:
        sim = zi_n.astype(jnp.float32) @ zs_n.astype(jnp.float32).T
    if bias is not None:
        logits = losses.scaled_logits(sim, log_scale, bias, max_log_scale=None)
        labels = 2.0 * pos.astype(jnp.float32) - 1.0
        return -jnp.sum(jnp.where(valid[None, :], jax.nn.log_sigmoid(labels * logits), 0.0)) / sim.shape[0]
    logits = losses.scaled_logits(sim, log_scale)
    neg = jnp.finfo(jnp.float32).min
    p = pos.astype(jnp.float32)
    li = jax.nn.log_softmax(jnp.where(valid[None, :], logits, neg), axis=1)
    ni = p.sum(1)
    row = -(jnp.where(pos, li, 0.0).sum(1) / jnp.maximum(ni, 1.0)) - jnp.log(jnp.maximum(ni, 1.0))
    lt = jax.nn.log_softmax(logits, axis=0)
    nt = p.sum(0)
    col = -(jnp.where(pos, lt, 0.0).sum(0) / jnp.maximum(nt, 1.0)) - jnp.log(jnp.maximum(nt, 1.0))
    has_i, has_t = ni > 0, valid & (nt > 0)
    return (jnp.sum(jnp.where(has_i, row, 0.0)) / jnp.maximum(has_i.sum(), 1)
            + jnp.sum(jnp.where(has_t, col, 0.0)) / jnp.maximum(has_t.sum(), 1)) / 2


def make_step(cfg, model: common.Model, tx, frozen: dict):
    objective = cfg.model.towers.objective
    seed_key = jax.random.key(cfg.seed + 1)

    def step(state, batch, cache=None):
        """``cache``: :func:`text_cache`'s table of a locked text tower (else the tower runs)."""
        key = jax.random.fold_in(seed_key, state["step"])
        extra = {}
        if cache is not None:
            idx = jnp.clip(jnp.searchsorted(cache["hash"], batch["pair_id_hash"]), 0, cache["hash"].shape[0] - 1)
            batch = {**batch, "text_feats": cache["feats"][idx]}
            # A text missing from the table would silently borrow a neighbour's: count them.
            extra["text_cache_misses"] = jnp.sum(cache["hash"][idx] != batch["pair_id_hash"])
            if "bags" in cache:
                cols, pos = batch_sentences(cache["bags"][idx])
                batch = {**batch, "sent_feats": cache["sent_feats"][jnp.maximum(cols, 0)], "sent_valid": cols >= 0,
                         "sent_pos": pos}

        def loss_fn(params):
            return batch_loss(model(params), batch, objective=objective, frozen=frozen,
                              regression=cfg.loss.regression, drop_path=cfg.model.drop_path, key=key,
                              sentence_w=sentence_weight(cfg), patch_w=patch_weight(cfg))

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        live = lambda tree: {k: v for k, v in tree.items() if not frozen.get(k)}  # noqa: E731  (locked towers)
        new, guard = common.guard_update(loss, {"step": state["step"] + 1, "params": params, "opt": opt}, state,
                                         params=live(state["params"]), new_params=live(params),
                                         check={"params": live(params), "opt": opt},
                                         max_update_ratio=cfg.guard_update_ratio)
        norms = {f"grad_norm_{t}": common.tree_norm(grads[t]) for t in TOWERS}
        return new, {"loss": loss, **aux, **guard, **norms, **extra, "grad_norm": common.tree_norm(grads), **optim.current_hparams(opt)}

    return step


def setup(cfg, mesh) -> common.Setup:
    """The stage-2 trainer on ``mesh``; no weights are read until ``init`` (AOT-safe)."""
    vit, bcfg, tcfg = vit_config(cfg), bert_config(cfg), towers_config(cfg)
    model = common.Model(lambda r: TwoTowers(vit, bcfg, tcfg, rngs=r), mesh)
    params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    oc = cfg.optim.copy_and_resolve_references()
    rules = [tuple(r) for r in oc.get("lr_rules", ())]
    if tcfg.objective == "regress":
        rules.insert(0, ("text/.*", None))  # the regression target is the frozen text embedding
    if tcfg.center_text:
        rules.insert(0, ("text_center", None))  # a fixed statistic (set_text_center), never trained
    oc.lr_rules = rules
    tx = optim.build(oc, params_shape)
    frozen = optim.frozen_towers(oc, params_shape, TOWERS)
    shardings, shapes = common.params_state(model, tx, mesh, params_shape)
    s = common.Setup("clip_align", cfg, mesh, model, tx, shardings, shapes, make_step(cfg, model, tx, frozen),
                     batch_spec(cfg, vit), init=None, data=None, spec=None, vit=vit, bert=bcfg, towers=tcfg,
                     frozen=frozen)
    # The training texts' features, when a fresh start computes them for the text centre:
    # reused as a locked tower's cache.
    table = []

    def init():
        params = initial_params(cfg, s)
        if "text_center" in params:  # towers.center_text (no text projection, so no centre, with "regress")
            table.append(text_table(cfg, s, params, mesh))
            params = set_text_center(cfg, s, params, mesh, table[0])
            print(f"clip_align: text features centred on the mean of {len(table[0][0])} training texts", flush=True)
        opt = jax.jit(tx.init, out_shardings=shardings["opt"])(params)
        return {"step": jnp.zeros([], jnp.int32), "params": params, "opt": opt}

    def data():
        if frozen["image"] or frozen["text"]:
            print(f"clip_align: frozen towers {[t for t, f in frozen.items() if f]}", flush=True)
        loader = P.LoaderConfig(batch_size=cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers)
        return iter(P.pairs(P.data_source(cfg.data.dir, "train"), loader, vit.img_size, tokenizer_path(cfg),
                            max_length=cfg.data.max_length, train=True, crop_scale=tuple(cfg.data.crop_scale),
                            text=cfg.data.get("text", "report")))

    def spec():
        return runspec.RunSpec("clip_align", cfg, vit=vit, bert=bcfg, towers=tcfg,
                               tokenizer=common.tokenizer_dir(str(tokenizer_path(cfg))),
                               preprocessing=runspec.preprocessing(cfg.data.dir))

    def on_start(state, workdir, fresh):
        if fresh and cfg.eval.before:
            evaluate(cfg, s, state["params"], workdir, "before")
        cache = text_cache(cfg, s, state["params"], mesh, table=table[0] if table else None)
        if cache is None:
            return ()
        print(f"clip_align: locked text tower; {cache['hash'].shape[0]} training texts encoded once"
              + (f", and their {cache['sent_feats'].shape[0]} distinct report sentences" if "bags" in cache else ""),
              flush=True)
        return (cache,)

    def on_end(state, metrics, workdir):
        if int(state["step"]) == cfg.steps:
            metrics.update({f"eval/{k}": v for k, v in evaluate(cfg, s, state["params"], workdir, "after").items()})
        return metrics

    s.init, s.data, s.spec, s.on_start, s.on_end = init, data, spec, on_start, on_end
    return s


def batch_spec(cfg, vit: ViTConfig) -> dict:
    b, t = cfg.data.batch_size, cfg.data.max_length
    spec = {"image": ((b, *vit.img_size, vit.in_channels), jnp.float32), "input_ids": ((b, t), jnp.int32),
            "attention_mask": ((b, t), jnp.int32), "pair_id_hash": ((b,), jnp.int32),
            "study_id_hash": ((b,), jnp.int32)}
    if cfg.data.get("text", "report") == "description+report":
        d = P.DESCRIPTION_LENGTH
        spec |= {"desc_ids": ((b, d), jnp.int32), "desc_mask": ((b, d), jnp.int32), "has_desc": ((b,), jnp.float32)}
    return spec


def initial_params(cfg, s: common.Setup) -> dict:
    """Fresh projections; towers from stage 1 where configured, all born on the model's shardings."""
    model = s.model
    params = model.init(jax.random.key(cfg.seed))
    if cfg.init.get("vision"):
        src = cfg.init.get("vision_from", "teacher")
        sub = {src: {"backbone": common.abstract(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                             params["image"]), model.shardings["image"])}}
        step, restored = ckpt.restore_subtree(layout.RunDir(cfg.init.vision).checkpoints, sub)
        params["image"] = restored[src]["backbone"]
        print(f"clip_align: image tower <- {cfg.init.vision} ({src} backbone, step {step})", flush=True)
    path = text_path(cfg)
    if path:
        host = hf_bert.from_pretrained(path, mlm_head=False, seed=cfg.seed, **dict(cfg.model.get("text_overrides", {})))
        params["text"] = jax.device_put(nnx.to_pure_dict(nnx.state(host)), model.shardings["text"])
        print(f"clip_align: text tower <- {path}", flush=True)
    return params


def text_cache(cfg, s: common.Setup, params, mesh, split: str = "train", table=None) -> dict | None:
    """A locked text tower's pooled features of every stage-2 text of ``split`` (PairText),
    computed once: ``{"hash": (R,) sorted pair_id hashes, "feats": (R, Dt)}``, replicated;
    ``None`` when the text tower trains or ``data.cache_text`` is off. The tower is
    deterministic and frozen, so its output for a text never changes: the step looks it up by
    ``pair_id_hash`` instead of running the tower forward again (most of a tiny step's time).
    ``table``: :func:`text_table`'s output for these params when already computed.

    With ``loss.sentence_weight`` or ``loss.patch_weight`` the cache also holds the report sentences
    (:func:`sentence_table`): ``"sent_feats"`` ``(S, Dt)``, one row per distinct sentence, and
    ``"bags"`` ``(R, K)``, each text's sentence rows sorted, padded with -1."""
    locked = s.frozen["text"] or s.towers.objective == "regress"
    if not (locked and cfg.data.get("cache_text", True)):
        if uses_sentences(cfg):
            raise ValueError("loss.sentence_weight and loss.patch_weight need a locked text tower with data.cache_text "
                             "(clip_align.py:tiny,locktext): the report sentences are encoded once, into the text cache")
        return None
    hashes, feats = table if table is not None else text_table(cfg, s, params, mesh, split)
    rep = common.replicated(mesh)
    out = {"hash": hashes, "feats": feats}
    if uses_sentences(cfg):
        out["bags"], out["sent_feats"] = sentence_table(cfg, s, params, mesh, hashes, split)
    return {k: jax.device_put(v, rep) for k, v in out.items()}


def sentence_weight(cfg) -> float:
    return float(cfg.get("loss", {}).get("sentence_weight", 0.0))


def patch_weight(cfg) -> float:
    return float(cfg.get("loss", {}).get("patch_weight", 0.0))


def uses_sentences(cfg) -> bool:
    """The steps read the report sentences (the text cache holds them)."""
    return bool(sentence_weight(cfg) or patch_weight(cfg))


def _split_texts(cfg, split: str) -> dict[int, tuple[str, str, str]]:
    """``{pair_id hash: (text, description line, report)}`` of every distinct stage-2 text of ``split``."""
    from decipher_jax.data import transforms as T

    source = P.data_source(cfg.data.dir, split)
    texts: dict[int, tuple[str, str, str]] = {}
    decode, pair, ids = T.Decode(), P.PairText(cfg.data.get("text", "report")), P.ToIds()
    for i in range(len(source)):
        ex = decode.map(source[i])
        if not ex.get("report", "").strip():
            continue
        ex = pair.map(ex)
        h = int(ids.map({"pair_id": ex["pair_id"]})["pair_id_hash"])
        if texts.setdefault(h, (ex["text"], ex["desc_text"], ex["report"]))[0] != ex["text"]:
            raise ValueError(f"{cfg.data.dir} ({split}): two different stage-2 texts share the pair_id hash {h} "
                             f"(study {ex['study_id']!r}); set data.cache_text=False")
    return texts


def _encode(fn, params, mesh, enc: list[dict], keys, bs: int = 32):
    import numpy as np

    feats = []
    for lo in range(0, len(enc), bs):
        chunk = enc[lo : lo + bs]
        pad = chunk + [chunk[-1]] * (bs - len(chunk))
        with jax.set_mesh(mesh):
            out = fn(params, {k: np.stack([e[k] for e in pad]) for k in keys})
        feats.append(np.asarray(jax.device_get(out), np.float32)[: len(chunk)])
    return np.concatenate(feats)


def text_table(cfg, s: common.Setup, params, mesh, split: str = "train"):
    """``(hashes, feats)``: the text tower's pooled features ``(R, Dt)`` (NumPy) of every distinct
    stage-2 text of ``split`` (``TwoTowers.pair_text_features``), sorted by ``pair_id`` hash."""
    import numpy as np

    texts = _split_texts(cfg, split)
    hashes = np.array(sorted(texts), np.int32)
    tok = P.Tokenize(tokenizer_path(cfg), cfg.data.max_length, field="text")
    dtok = P.Tokenize(tokenizer_path(cfg), P.DESCRIPTION_LENGTH, field="desc_text", names=("desc_ids", "desc_mask"))
    enc = [dtok.map(tok.map({"text": texts[int(h)][0], "desc_text": texts[int(h)][1],
                             "has_desc": np.float32(bool(texts[int(h)][1]))})) for h in hashes]
    model = s.model
    fn = jax.jit(lambda p, e: model(p).pair_text_features(e["input_ids"], e["attention_mask"], e["desc_ids"],
                                                          e["desc_mask"], e["has_desc"]))
    return hashes, _encode(fn, params, mesh, enc, ("input_ids", "attention_mask", "desc_ids", "desc_mask", "has_desc"))


def sentence_table(cfg, s: common.Setup, params, mesh, hashes, split: str = "train"):
    """``(bags, feats)``: every distinct report sentence of ``split``
    (:func:`decipher_jax.data.pipelines.report_sentences`, compared without case) encoded once by
    the text tower alone (``TwoTowers.text_features``, as a zero-shot query is), ``(S, Dt)``;
    and per text of ``hashes`` its sentences' rows, sorted, padded with -1 to the longest
    report, ``(R, K)`` int32."""
    import numpy as np

    texts = _split_texts(cfg, split)
    rows: dict[str, int] = {}
    first: list[str] = []
    bags = []
    for h in hashes:
        bag = set()
        for t in P.report_sentences(texts[int(h)][2]):
            if t.lower() not in rows:
                rows[t.lower()] = len(first)
                first.append(t)
            bag.add(rows[t.lower()])
        bags.append(sorted(bag))
    k = max(1, max(map(len, bags)))
    out = np.full((len(bags), k), -1, np.int32)
    for i, b in enumerate(bags):
        out[i, k - len(b):] = b  # -1 first: each row stays sorted for the step's searchsorted
    tok = P.Tokenize(tokenizer_path(cfg), cfg.data.max_length, field="text")
    model = s.model
    fn = jax.jit(lambda p, e: model(p).text_features(e["input_ids"], e["attention_mask"]))
    return out, _encode(fn, params, mesh, [tok.map({"text": t}) for t in first], ("input_ids", "attention_mask"))


def set_text_center(cfg, s: common.Setup, params, mesh, table=None) -> dict:
    """``params`` with ``text_center`` = the mean pooled feature of the distinct training texts
    (``table``: :func:`text_table`'s output when already computed). See ``TowersConfig.center_text``."""
    _, feats = table if table is not None else text_table(cfg, s, params, mesh)
    center = feats.mean(0).astype(params["text_center"].dtype)
    return {**params, "text_center": jax.device_put(center, s.model.shardings["text_center"])}


def tokenizer_path(cfg) -> str:
    """The text tower's tokenizer: its checkpoint directory, else ``data.tokenizer`` (random tower)."""
    return text_path(cfg) or cfg.data.tokenizer


# -- training -----------------------------------------------------------------------------------

@common.locked
def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) stage 2; returns the last metrics plus held-out retrieval (``eval/...``)."""
    return common.train(setup(cfg, common.make_mesh(cfg, "clip_align")), workdir)


def evaluate(cfg, s: common.Setup, params, workdir: str, tag: str) -> dict:
    """Held-out retrieval of ``params`` on ``cfg.eval.splits`` (the retrieval evaluator's metrics,
    :func:`decipher_jax.eval.evaluators.pair_metrics`), kept under ``tag`` in ``eval_<split>.json``."""
    from decipher_jax.eval import evaluators, retrieval

    out = {}
    for split in cfg.eval.splits:
        try:
            source = evaluators.open_split(cfg.data.dir, split)
        except evaluators.MissingSplit as e:  # a corpus without that split
            print(f"clip_align: no {split!r} split to evaluate ({e})", flush=True)
            continue
        m = evaluators.pair_metrics(s.model, params, source, s.mesh, image_size=s.vit.img_size,
                                    tokenizer=tokenizer_path(cfg), max_length=cfg.data.max_length,
                                    batch_size=cfg.eval.batch_size)
        path = layout.RunDir(workdir).heldout(split)
        prev = {}
        if os.path.exists(path):
            with open(path) as f:
                prev = json.load(f)
        prev[tag] = m
        if jax.process_index() == 0:
            with open(path, "w") as f:
                json.dump(prev, f, indent=1)
        print(f"clip_align [{tag}] {split}: " + retrieval.summary(m), flush=True)
        out.update({f"{split}/{k}": v for k, v in m.items() if k != "examples"})
    return out


def summary(cfg, m: dict, seconds: float) -> str:
    objective = {"clip": "CLIP", "siglip": "SigLIP", "regress": "regression"}[cfg.model.towers.objective]
    text = {"description+report": "each series paired with its description and its study's report",
            "report": "each series paired with its study's report"}[cfg.data.get("text", "report")]
    rules = [tuple(r) for r in cfg.optim.get("lr_rules", ())]
    locked = optim.first_match("text/encoder", rules, 1.0) is None and objective != "regression"  # as optim.build
    return (f"stage 2 ({objective} over the global batch, {cfg.steps} steps, {text}"
            f"{', report encoder locked' if locked else ''}) in {seconds:.0f} s: "
            f"loss {m['loss']:.3f}, temperature {m['temperature']:.1f}")


# The stage-2 run loader lives in decipher_jax.runs (zero-shot and evaluation read runs there).
load = runs.load_align
