"""Reports and answers from a caption run, and their evaluation with the baselines.

    cm = CaptionModel.from_workdir("W/caption")
    cm.generate(volumes)                                  # reports (volumes: prepared, any size)
    cm.generate(volumes, ["is there a lesion?"] * n)      # answers
    res = evaluate("W/caption", data_dir, "test", prior="W/caption_prior", align="W/stage2")

:func:`evaluate` generates a report and answers every templated question for each series of a
held-out split (patients disjoint from the training split, checked), and scores them
(:mod:`decipher_jax.eval.textgen`): BLEU-4 and ROUGE-L against the series' report, per-finding
clinical F1 against its labelled findings, exact-match VQA accuracy per question type against
the record's facts. Beside the model, the same scores for the baselines: ``retrieval`` (each
series gets the report, and the facts, of the training series whose report the stage-2 tower
ranks first for its image) and ``prior`` (the same decoder trained without the image).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from decipher_jax import checkpoint as ckpt
from decipher_jax import decoding, layout, runs
from decipher_jax.data import captions as C
from decipher_jax.data import transforms as T
from decipher_jax.eval import textgen
from decipher_jax.models.captioner import Captioner, CaptionerConfig
from decipher_jax.models.decoder import DecoderConfig
from decipher_jax.models.vit3d import ViTConfig
from decipher_jax.state import Model, abstract


class CaptionModel:
    """A trained caption run: generation from volumes (and questions), batched under jit."""

    def __init__(self, model: Model, params, spec: dict, vocab: C.SubVocab, mesh, size):
        self.model, self.params, self.spec, self.vocab, self.mesh, self.size = model, params, spec, vocab, mesh, size
        self.max_length = int(spec["config"]["data"]["max_length"])
        self.retrieve = int(spec["config"]["data"].get("retrieve", 0))  # retrieved reports before each question
        self.align = spec["config"]["init"].get("align", "")
        self._prefix = jax.jit(lambda p, x: model(p).prefix(x))
        self._embed = jax.jit(lambda p, ids: model(p).decoder.embed(ids))

    @classmethod
    def from_workdir(cls, workdir: str, mesh=None, step: int | None = None) -> CaptionModel:
        from decipher_jax import sharding as sh

        spec = runs.read_spec(workdir)
        if spec.get("kind") != "caption":
            raise ValueError(f"{workdir}: a {spec.get('kind')!r} run; expected a caption run (trainers/caption.py)")
        cfg = spec["config"]
        vocab = C.SubVocab(spec["tokenizer"], cfg["vocab"])
        vit = ViTConfig(**runs.from_json(spec["vit"])) if spec.get("vit") else None
        dec = DecoderConfig(**runs.from_json(cfg["model"]["decoder"]), vocab_size=len(vocab), bos_token_id=C.BOS,
                            eos_token_id=C.EOS, pad_token_id=C.PAD)
        ccfg = CaptionerConfig(**cfg["model"]["captioner"], use_image=bool(cfg["model"]["use_image"]))
        mesh = mesh or sh.make_mesh({"data": -1})
        model = Model(lambda r: Captioner(vit, dec, ccfg, rngs=r), mesh)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
        # The best val step's parameters when the run kept them (early stopping), else its latest.
        best = os.path.join(workdir, "best")
        folder = best if step is None and os.path.isdir(best) else layout.RunDir(workdir).checkpoints
        step, part = ckpt.restore_subtree(folder, {"params": abstract(shapes, model.shardings)}, step=step)
        size = tuple(vit.img_size) if vit else tuple(cfg["model"]["vit"]["img_size"])
        return cls(model, part["params"], spec | {"step": step}, vocab, mesh, size)

    def generate(self, volumes, questions=None, *, contexts=None, max_new_tokens: int | None = None,
                 method: str = "greedy", num_beams: int = 4, batch_size: int = 32, use_cache: bool = True) -> list[str]:
        """One text per volume: its report (question "" or None) or the answer to its question.
        ``volumes``: prepared arrays ``(X, Y, Z[, 1])`` (resized whole to the model's grid).
        ``contexts``: a retrieval-augmented run's retrieved reports per volume
        (:func:`retrieved_reports`); such a run refuses to generate without them."""
        n = len(volumes)
        questions = [""] * n if questions is None else list(questions)
        if len(questions) != n:
            raise ValueError(f"{len(questions)} questions for {n} volumes")
        if self.retrieve and contexts is None:
            raise ValueError(f"this run reads {self.retrieve} retrieved report(s) before each question: pass contexts")
        if contexts is not None:
            questions = [C.with_context(q, c) for q, c in zip(questions, contexts)]
        max_new = int(max_new_tokens or self.max_length)
        out: list[str] = []
        with jax.set_mesh(self.mesh):
            for lo in range(0, n, batch_size):
                vols = [np.asarray(v, np.float32) for v in volumes[lo: lo + batch_size]]
                x = np.stack([T._resize(v[..., None] if v.ndim == 3 else v, self.size) for v in vols])
                prompts = [C.prompt(self.vocab, q, self.max_length) for q in questions[lo: lo + batch_size]]
                width = max(map(len, prompts))
                ids = np.full((len(prompts), width), C.PAD, np.int32)
                valid = np.zeros((len(prompts), width), bool)
                for i, p in enumerate(prompts):  # left-padded: every row ends in its [SEP]
                    ids[i, width - len(p):], valid[i, width - len(p):] = p, True
                pre = self._prefix(self.params, jnp.asarray(x))
                seq = jnp.concatenate([pre, self._embed(self.params, jnp.asarray(ids))], 1)
                v = np.concatenate([np.ones((len(prompts), pre.shape[1]), bool), valid], 1)
                res = decoding.generate(self.model(self.params).decoder, seq, v, max_new_tokens=max_new, eos_id=C.EOS,
                                        pad_id=C.PAD, method=method, num_beams=num_beams, use_cache=use_cache)
                out += [self.vocab.decode(t) for t in np.asarray(res["tokens"])]
        return out


# -- the held-out evaluation ---------------------------------------------------------------------

def read_split(data_dir: str, split: str, max_series: int | None = None, *, volumes: bool = True) -> dict:
    """Every series of ``split`` with a report: volumes (unless ``volumes=False``), reports,
    findings, facts' questions, ids."""
    from decipher_jax.data import pipelines as P

    src = P.data_source(data_dir, split)
    rows = {k: [] for k in ("volume", "report", "findings", "qa", "series_id", "patient_id")}
    for i in range(len(src)):
        ex = src[i]
        d = T.Decode().map(ex)
        if not d.get("report", "").strip():
            continue
        if volumes:
            rows["volume"].append(np.asarray(d["image"], np.float32))
        rows["report"].append(d["report"])
        rows["findings"].append({f for f in d.get("findings", "").split(";") if f})
        rows["qa"].append(textgen.questions_for(textgen.record_facts(ex)))
        rows["series_id"].append(d["series_id"])
        rows["patient_id"].append(d["patient_id"])
        if max_series and len(rows["report"]) >= max_series:
            break
    return rows


def _questions(rows) -> tuple[list[int], list[str], list[str]]:
    idx, kinds, answers = [], [], []
    for i, qa in enumerate(rows["qa"]):
        for k in sorted(qa):
            idx.append(i)
            kinds.append(k)
            answers.append(qa[k])
    return idx, kinds, answers


def score(reports: list[str], answers: list[str], rows: dict, kinds: list[str], truth: list[str]) -> dict:
    """Text, clinical and VQA scores of generated ``reports`` and ``answers`` for ``rows``."""
    return {"bleu": textgen.bleu4(reports, rows["report"]), "rougeL": textgen.rouge_l(reports, rows["report"]),
            "clinical": textgen.clinical_scores(reports, rows["findings"]),
            "vqa": textgen.vqa_accuracy(kinds, answers, truth)}


def retrieved_reports(align: str, data_dir: str, split: str, k: int) -> dict[str, str]:
    """``{series_id: the k training reports}`` the stage-2 run ranks first for each series' image
    (best first, joined), never from the series' own patient: a training series does not read
    its own report."""
    from decipher_jax import zeroshot

    zs = zeroshot.ZeroShot.from_workdir(align)
    train = zs.embed_pairs(data_dir, "train")
    query = train if split == "train" else zs.embed_pairs(data_dir, split)
    sims = query["image"] @ train["text"].T
    same = query["patient_id"][:, None] == train["patient_id"][None, :]
    sims = np.where(same, -np.inf, sims)
    out = {}
    for i, sid in enumerate(query["series_id"]):
        # Series of one study share a report: take k distinct texts.
        picked: list[str] = []
        for j in np.argsort(-sims[i]):
            r = str(train["report"][j])
            if np.isfinite(sims[i, j]) and r not in picked:
                picked.append(r)
            if len(picked) == k:
                break
        out[str(sid)] = " ".join(picked)
    return out


def retrieval_baseline(align: str, data_dir: str, split: str, rows: dict, kinds, idx) -> tuple[list[str], list[str]]:
    """Each held-out series gets the report of the training series whose report the stage-2 tower
    ranks first for its image, and that training series' answers (``""`` where it has none)."""
    from decipher_jax import zeroshot

    zs = zeroshot.ZeroShot.from_workdir(align)
    train, test = zs.embed_pairs(data_dir, "train"), zs.embed_pairs(data_dir, split)
    order = {s: i for i, s in enumerate(test["series_id"])}
    missing = [s for s in rows["series_id"] if s not in order]
    if missing:
        raise ValueError(f"retrieval baseline: series without stage-2 embeddings: {missing[:5]}")
    sims = test["image"][[order[s] for s in rows["series_id"]]] @ train["text"].T
    nearest = sims.argmax(1)
    train_rows = read_split(data_dir, "train", volumes=False)
    by_series = dict(zip(train_rows["series_id"], train_rows["qa"]))
    reports = [str(train["report"][j]) for j in nearest]
    answers = [by_series.get(str(train["series_id"][nearest[i]]), {}).get(k, "") for i, k in zip(idx, kinds)]
    return reports, answers


def evaluate(caption: str, data_dir: str, split: str = "test", *, prior: str = "", align: str = "",
             others: dict | None = None, method: str = "greedy", num_beams: int = 4, max_series: int | None = None,
             batch_size: int = 32, examples: int = 6) -> dict:
    """The model and its baselines on ``split`` (see the module docstring); ``others``: more caption
    runs to score beside them, ``{name: workdir}`` (e.g. a retrieval-augmented one)."""
    rows = read_split(data_dir, split, max_series)
    train_patients = set(read_split(data_dir, "train", volumes=False)["patient_id"]) if split != "train" else set()
    leaked = sorted(set(rows["patient_id"]) & train_patients)
    if leaked:
        raise ValueError(f"{split} shares patients with train ({leaked[:5]}): a generated-text score would leak")
    idx, kinds, truth = _questions(rows)
    qs = [textgen.QUESTIONS[k] for k in kinds]
    out = {"split": split, "n_series": len(rows["report"]), "n_questions": len(kinds), "method": method,
           "patients_disjoint_from_train": True, "systems": {}}

    def run(name, workdir):
        cm = CaptionModel.from_workdir(workdir)
        ctx = None
        if cm.retrieve:
            found = retrieved_reports(cm.align, data_dir, split, cm.retrieve)
            ctx = [found.get(s, "") for s in rows["series_id"]]
        reports = cm.generate(rows["volume"], contexts=ctx, method=method, num_beams=num_beams, batch_size=batch_size)
        answers = cm.generate([rows["volume"][i] for i in idx], qs, contexts=ctx and [ctx[i] for i in idx],
                              max_new_tokens=4, batch_size=batch_size)
        out["systems"][name] = score(reports, answers, rows, kinds, truth)
        return reports

    generated = run("model", caption)
    for name, workdir in (others or {}).items():
        run(name, workdir)
    if prior:
        run("prior", prior)
    if align:
        reports, answers = retrieval_baseline(align, data_dir, split, rows, kinds, idx)
        out["systems"]["retrieval"] = score(reports, answers, rows, kinds, truth)
    out["examples"] = [{"series_id": rows["series_id"][i], "reference": rows["report"][i], "generated": generated[i],
                        "findings": sorted(rows["findings"][i]),
                        "stated": {f: v for f, v in textgen.mentions(generated[i]).items()}}
                       for i in range(min(examples, len(generated)))]
    return out


def summary(res: dict) -> list[str]:
    """Lines for people: each system's text, clinical and VQA figures."""
    lines = [f"report generation and VQA on {res['n_series']} held-out series ({res['split']}, patients disjoint "
             f"from train; {res['n_questions']} questions; {res['method']} decoding):"]
    for name, s in res["systems"].items():
        v = s["vqa"]
        dep = v.get("image_dependent", {}).get("accuracy", float("nan"))
        per = ", ".join(f"{k} {v[k]['accuracy']:.2f}" for k in textgen.QUESTIONS if k in v)
        lines.append(f"  {name}: BLEU-4 {s['bleu']['bleu4']:.1f}, ROUGE-L {s['rougeL']:.3f}, finding F1 macro "
                     f"{s['clinical']['macro_f1']:.3f} / micro {s['clinical']['micro_f1']:.3f}; VQA image-dependent "
                     f"{dep:.3f} ({per})")
    return lines
