"""Evaluators: one interface, a registry built from ``config.evals``, one runner.

    ctx = Context(out="W", data="W/data/prep", runs={"align": "W/stage2", "ssl_teacher": "W/stage1_vision"})
    results = run_all(from_config({"probes": {}, "zeroshot": {}}), ctx)  # -> W/eval/<name>.json

An evaluator has a ``name``, settings as keyword arguments, ``run(ctx) -> result`` (JSON) and
``summary(result) -> lines`` (the prose the demo and ``decipher eval`` print). It reads what it
needs through the :class:`Context`, which loads each run once: the frozen image encoders
(stable ids ``align``, ``ssl_teacher``, ``random``; :func:`decipher_jax.runs.encoders`), the
align run's :class:`~decipher_jax.zeroshot.ZeroShot`, and the data's splits. A split the data
lack is one kind of failure for every evaluator (:class:`MissingSplit`): the runner records
``{"skipped": reason}`` in its file and goes on. Arrays for figures go to ``W/eval/<name>/``.
The report renders one section per evaluator file (:mod:`decipher_jax.report`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

import numpy as np

from decipher_jax import layout
from decipher_jax.eval.queries import FINDING_QUERIES

REGISTRY: dict[str, type] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


class MissingSplit(LookupError):
    """The prepared data have no such split."""


@dataclasses.dataclass
class Context:
    """What evaluators read: ``out`` (results go to ``out/eval``), ``data`` (a prepared dir),
    ``runs`` (``{"align": workdir, "ssl_teacher": workdir}``; either may be absent), whether to
    add a random-init encoder, and the mesh."""

    out: str
    data: str
    runs: dict = dataclasses.field(default_factory=dict)
    random: bool = True
    mesh: Any = None
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.mesh is None:
            from decipher_jax import sharding as sh

            self.mesh = sh.make_mesh({"data": -1})

    @property
    def dir(self) -> layout.PipelineDir:
        """``out`` as a pipeline workdir: ``dir.result(name)``, ``dir.arrays(name)``."""
        return layout.PipelineDir(self.out)

    @property
    def eval_dir(self) -> str:
        return self.dir.eval

    def encoders(self, ids=None) -> dict:
        """``{id: runs.Encoder}``: every encoder the runs give, or those of ``ids``."""
        if "encoders" not in self._cache:
            from decipher_jax import runs

            self._cache["encoders"] = runs.encoders(align=self.runs.get("align", ""),
                                                    ssl_teacher=self.runs.get("ssl_teacher", ""),
                                                    random=self.random, mesh=self.mesh)
        encs = self._cache["encoders"]
        return {k: v for k, v in encs.items() if ids is None or k in ids}

    def legacy_encoders(self, ids=None) -> tuple[dict, Any]:
        """``({display name: (model, params)}, vit)``, the form the probe and segmentation suites take."""
        encs = self.encoders(ids)
        vit = next(iter(encs.values())).vit
        return {e.name: (e.model, e.params) for e in encs.values()}, vit

    def zeroshot(self):
        """The align run as a :class:`~decipher_jax.zeroshot.ZeroShot` (text queries, embeddings)."""
        if "zeroshot" not in self._cache:
            if not self.runs.get("align"):
                raise MissingSplit("no align (stage-2) run to evaluate")
            from decipher_jax import zeroshot

            # Both towers, replicated and data parallel over every device (the image encoders above
            # use the context's mesh).
            self._cache["zeroshot"] = zeroshot.ZeroShot.from_workdir(self.runs["align"])
        return self._cache["zeroshot"]

    def source(self, split: str):
        return open_split(self.data, split)


def open_split(data: str, split: str):
    """A prepared dataset's split as a data source; :class:`MissingSplit` when it has none."""
    from decipher_jax.data import pipelines as P

    try:
        return P.data_source(data, split)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise MissingSplit(f"{data}: no {split!r} split ({e})") from None


class Evaluator:
    name: ClassVar[str] = ""

    def __init__(self, **settings):
        unknown = set(settings) - set(self.defaults())
        if unknown:
            raise TypeError(f"evaluator {self.name!r}: unknown settings {sorted(unknown)}; "
                            f"it takes {sorted(self.defaults())}")
        self.settings = {**self.defaults(), **settings}

    @classmethod
    def defaults(cls) -> dict:
        return {}

    def run(self, ctx: Context):
        raise NotImplementedError

    def summary(self, result, ctx: Context) -> list[str]:
        return []


def from_config(evals, order=None) -> list[Evaluator]:
    """``{name: settings}`` (a dict or ConfigDict; ``settings["type"]`` picks a registered
    evaluator under another name) -> evaluators, in ``order`` (default: the mapping's; a
    ConfigDict sorts its keys)."""
    out = []
    names = list(order) if order else list(evals.keys())
    missing = set(names) - set(evals.keys())
    if missing:
        raise KeyError(f"order names evaluators without settings: {sorted(missing)}")
    for name in names:
        settings = evals[name]
        settings = dict(settings.to_dict() if hasattr(settings, "to_dict") else settings or {})
        kind = settings.pop("type", name)
        if kind not in REGISTRY:
            raise KeyError(f"unknown evaluator {kind!r}; registered: {sorted(REGISTRY)}")
        e = REGISTRY[kind](**settings)
        e.name = name  # the file name: two probes evaluators may run under two names
        out.append(e)
    return out


def write(ctx: Context, name: str, result) -> str:
    os.makedirs(ctx.eval_dir, exist_ok=True)
    path = ctx.dir.result(name)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    os.replace(path + ".tmp", path)
    return path


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def run_all(evaluators: list[Evaluator], ctx: Context, say=print) -> dict:
    """Runs each evaluator, writes ``eval/<name>.json`` and says its summary; ``{name: result}``."""
    import time

    results = {}
    for e in evaluators:
        t0 = time.perf_counter()
        try:
            result = e.run(ctx)
        except MissingSplit as err:
            result = {"skipped": str(err)}
            say(f"{e.name}: skipped ({err})")
        else:
            for line in e.summary(result, ctx):
                say(line.replace("{seconds}", f"{time.perf_counter() - t0:.0f}"))
        write(ctx, e.name, result)
        results[e.name] = result
    return results


def load_results(out: str) -> dict:
    """``{name: result}`` of the evaluator files under ``out/eval``."""
    d = layout.PipelineDir(out).eval
    res = {}
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else ():
        if f.endswith(".json"):
            with open(os.path.join(d, f)) as fh:
                res[f[:-5]] = json.load(fh)
    return res


# -- the evaluators -------------------------------------------------------------------------------

@register
class Retrieval(Evaluator):
    """Held-out image <-> report retrieval of the align run, per split (with examples)."""

    name = "retrieval"

    @classmethod
    def defaults(cls):
        return {"splits": ("test",), "batch_size": 16}

    def run(self, ctx):
        zs = ctx.zeroshot()
        out = {"splits": {}}
        for split in self.settings["splits"]:
            out["splits"][split] = pair_metrics(zs.model, zs.params, ctx.source(split), zs.mesh,
                                                image_size=zs.image_size, tokenizer=zs.spec["tokenizer"],
                                                max_length=zs.max_length, batch_size=self.settings["batch_size"])
        trained = layout.RunDir(ctx.runs["align"]).heldout("test")  # the trainer's "before" (stage-1 towers)
        if os.path.exists(trained):
            with open(trained) as f:
                before = json.load(f).get("before")
            if before:
                out["before"] = {"test": before}
        return out

    def summary(self, r, ctx):
        from decipher_jax.eval import retrieval

        lines = []
        for split, m in r["splits"].items():
            if split != "test":
                lines.append(f"held-out retrieval ({split}): " + retrieval.summary(m))
                continue
            for tag, e in (("before", r.get("before", {}).get("test")), ("after", m)):
                if e:
                    lines.append(f"  held-out retrieval {tag} stage 2 ({e['n_studies']} test studies): image->report "
                                 f"R@1/R@5 {e['i2t_study/R@1']:.2f}/{e['i2t_study/R@5']:.2f} (study), "
                                 f"{e['i2t_series/R@1']:.2f}/{e['i2t_series/R@5']:.2f} (series); chance R@5 "
                                 f"{e['chance_study_R@5']:.2f}")
        return lines


def pair_metrics(model, params, source, mesh, *, image_size, tokenizer: str, max_length: int,
                 batch_size: int = 16) -> dict:
    """Retrieval metrics (and examples) of a two-tower model on one split: the stage-2 trainer's
    in-loop evaluation and the retrieval evaluator share it."""
    from decipher_jax.eval import embed, retrieval

    e = embed.embed_pairs(model, params, source, mesh, image_size=tuple(image_size), tokenizer=tokenizer,
                          max_length=int(max_length), batch_size=batch_size)
    m = retrieval.evaluate_pairs(e["image"], e["text"], e["study_id"])
    if "report" in e:
        m["examples"] = retrieval.examples(e["image"], e["text"], e["study_id"], e["report"],
                                           series_id=e["series_id"], body_region=e["body_region"])
    return m


@register
class Captioning(Evaluator):
    """Report generation and VQA of a caption run (``runs["caption"]``) on held-out patients, with
    the language prior (``runs["caption_prior"]``) and retrieval-only (``runs["align"]``) baselines
    (:func:`decipher_jax.captioning.evaluate`)."""

    name = "caption"

    @classmethod
    def defaults(cls):
        return {"split": "test", "method": "greedy", "num_beams": 4, "max_series": None}

    def run(self, ctx):
        from decipher_jax import captioning

        if not ctx.runs.get("caption"):
            raise MissingSplit("no caption run to evaluate (runs.caption)")
        ctx.source(self.settings["split"])
        return captioning.evaluate(ctx.runs["caption"], ctx.data, self.settings["split"],
                                   prior=ctx.runs.get("caption_prior", ""), align=ctx.runs.get("align", ""),
                                   method=self.settings["method"], num_beams=self.settings["num_beams"],
                                   max_series=self.settings["max_series"])

    def summary(self, r, ctx):
        from decipher_jax import captioning

        return captioning.summary(r)


@register
class Rerank(Evaluator):
    """Token-level re-ranking of the top k (patch-to-word), its weight chosen on the val split."""

    name = "rerank"

    @classmethod
    def defaults(cls):
        return {"k": 5, "weights": (0.25, 1.0, 4.0), "select": "val", "split": "test"}

    def run(self, ctx):
        from decipher_jax.eval import retrieval

        zs = ctx.zeroshot()
        ctx.source(self.settings["select"]), ctx.source(self.settings["split"])  # both splits, or MissingSplit
        pairs = [zs.embed_pairs(ctx.data, s, tokens=True) for s in (self.settings["select"], self.settings["split"])]
        return retrieval.tune_rerank(*pairs, k=self.settings["k"], weights=tuple(self.settings["weights"]))

    def summary(self, rr, ctx):
        a, b = rr["test"]["first_stage"], rr["test"]["reranked"]
        return [f"token-level re-ranking of the top {rr['test']['k']} (patch-to-word, weight {rr['weight']} chosen on "
                f"val) in {{seconds}} s: held-out series image->report R@1 {a['i2t_series/R@1']:.2f} -> "
                f"{b['i2t_series/R@1']:.2f}, MRR {a['i2t_series/MRR']:.2f} -> {b['i2t_series/MRR']:.2f}"]


# The zero-shot finding queries live in decipher_jax.eval.queries (localisation reads them too).


def finding_queries(zs, e: dict, queries: dict = FINDING_QUERIES) -> dict:
    """Each query's AUROC on the embedded series ``e`` (``ZeroShot.embed_split``) of its body
    region: ``{"queries": {finding: {auroc, n, positive, where}}, "mean_auroc", "table"}``. A
    query whose region has no positive or no negative series is left out."""
    from sklearn.metrics import roc_auc_score

    out, table = {}, {}
    for finding, q in queries.items():
        rows = e["body_region"] == q["region"] if q.get("region") else np.ones(len(e["image"]), bool)
        y = np.array([finding in str(f).split(";") for f in e["findings"]])[rows]
        score = zs.contrast(positive=list(q["positive"]), negative=list(q["negative"]), image_embeddings=e["image"][rows])
        if 0 < y.sum() < len(y):
            auc = float(roc_auc_score(y, score))
            where = f"{q['region']} series" if q.get("region") else "series"
            out[finding] = {"auroc": auc, "n": int(len(y)), "positive": int(y.sum()), "where": where}
            table[f"{q['label']} ({len(y)} {where}, {int(y.sum())} positive)"] = f"AUROC {auc:.2f}"
    res = {"queries": out, "table": table}
    if out:
        res["mean_auroc"] = float(np.mean([q["auroc"] for q in out.values()]))
        table[f"mean over the {len(out)} finding queries"] = f"AUROC {res['mean_auroc']:.2f}"
    return res


@register
class ZeroShotQueries(Evaluator):
    """Zero-shot body region from its name alone, and finding queries (positive vs negated phrasings)."""

    name = "zeroshot"

    @classmethod
    def defaults(cls):
        return {"split": "test", "queries": FINDING_QUERIES}

    def run(self, ctx):
        zs = ctx.zeroshot()
        ctx.source(self.settings["split"])
        e = zs.embed_split(ctx.data, self.settings["split"])
        regions = sorted(set(e["body_region"]) - {""})
        classes = {r: [f"MRI {r}.", f"EXAMINATION: MRI {r}."] for r in regions}
        p, names = zs.classify(classes=classes, image_embeddings=e["image"])
        keep = np.isin(e["body_region"], regions)
        acc = float(np.mean(np.asarray(names)[p.argmax(1)][keep] == e["body_region"][keep]))
        chance = 1 / max(len(regions), 1)
        table = {f"body region from its name ({int(keep.sum())} series, chance {chance:.2f})": f"accuracy {acc:.2f}"}
        out = {"body_region": {"accuracy": acc, "chance": chance, "n": int(keep.sum())}, "table": table}
        q = finding_queries(zs, e, self.settings["queries"])
        table.update(q.pop("table"))
        return out | q

    def summary(self, r, ctx):
        b = r["body_region"]
        lines = [f"zero-shot on {b['n']} held-out series: body region from its name alone, accuracy {b['accuracy']:.2f} "
                 f"(chance {b['chance']:.2f})"]
        for finding, q in r["queries"].items():
            s = self.settings["queries"][finding]
            lines.append(f"  query {s['label']} on {q['n']} {q['where']}: AUROC {q['auroc']:.2f} ({q['positive']} with "
                         f"{s['positives']})")
        if "mean_auroc" in r:
            lines.append(f"  mean AUROC over the {len(r['queries'])} finding queries: {r['mean_auroc']:.2f}")
        return lines


@register
class Localisation(Evaluator):
    """Anomaly localisation against the lesion masks: the finding query's score per patch
    (text-guided) and each patch's distance to normal studies' patches (visual), with a
    random-init ViT's visual map as the floor."""

    name = "localisation"

    @classmethod
    def defaults(cls):
        return {"split": "test", "floor": True, "bank_per_group": 64}

    def run(self, ctx):
        from decipher_jax.eval import localisation

        zs = ctx.zeroshot()
        ctx.source(self.settings["split"])
        e = ctx.encoders(("random",)).get("random") if self.settings["floor"] else None
        floor = None if e is None else (e.model, e.params)
        return localisation.evaluate_split(zs, ctx.data, self.settings["split"], out=ctx.dir.arrays(self.name),
                                           floor=floor, bank_per_group=self.settings["bank_per_group"])

    def summary(self, loc, ctx):
        if not loc.get("n_series"):
            return []
        lines = [f"localisation on {loc['n_series']} held-out lesion series (voxel AUROC in the body, random 0.50; "
                 f"pointing game in the body, a random point {loc['pointing_game_body_random']:.3f}): text-guided "
                 f"{loc['voxel_auroc_body']:.2f} / {loc['pointing_game_body']:.2f}"]
        lines += [f"  visual, {k}: {v['voxel_auroc_body']:.2f} / {v['pointing_game_body']:.2f}"
                  + (f"; detection by the map's maximum on all {v['detection']['n_series']} series, AUROC: any finding "
                     f"{v['detection']['abnormal_auroc']:.2f}, a lesion {v['detection']['lesion_auroc']:.2f}"
                     if "detection" in v else "")
                  for k, v in loc.get("visual", {}).items()]
        return lines


@register
class Probes(Evaluator):
    """Linear probes (logistic; ridge for age) of every frozen encoder, with the paired comparison
    of each pretrained encoder against random init (``eval/compare.json``)."""

    name = "probes"

    @classmethod
    def defaults(cls):
        return {"fractions": (0.1, 0.3, 1.0), "seeds": (0, 1, 2), "feature": "mean+max", "finding_feature": "mean+max|anomaly",
                "encoders": None}

    def run(self, ctx):
        from decipher_jax.eval import suite

        for split in ("train", "test"):
            ctx.source(split)
        s = self.settings
        rows = suite.probe_encoders(ctx.out, ctx.data, fractions=tuple(s["fractions"]), seeds=tuple(s["seeds"]),
                                    mesh=ctx.mesh, feature=s["feature"], finding_feature=s["finding_feature"],
                                    encs=ctx.legacy_encoders(s["encoders"]))
        ids = {e.name: e.id for e in ctx.encoders(s["encoders"]).values()}
        path = ctx.dir.result("compare")
        if os.path.exists(path):  # each pretrained encoder against random init, keyed by ids too
            with open(path) as f:
                cmp = [dict(c, a_id=ids[c["a"]], b_id=ids[c["b"]]) for c in json.load(f)]
            write(ctx, "compare", cmp)
        return [dict(r, encoder_id=ids[r["encoder"]]) for r in rows]

    def summary(self, rows, ctx):
        from decipher_jax.eval import suite

        s = suite.summarise(rows, "auroc", group_findings=True)
        names = sorted({r["encoder"] for r in rows})
        sel = sorted({"the val split" if r.get("selection") == "val" else r.get("selection", "CV") for r in rows})
        lines = [f"linear probes (logistic, and ridge for age; the penalty chosen by {' or '.join(sel)}; {len(rows)} "
                 f"fits of tasks x fractions x seeds) in {{seconds}} s; test AUROC with all labels (findings: the mean "
                 f"over the per-finding probes, each on its body regions):"]
        for task in sorted({k[1] for k in s}, key=suite.task_order):
            lines.append(f"  {task}: " + ", ".join(f"{e} {s[(e, task, 1.0)][0]:.2f}" for e in names
                                                   if (e, task, 1.0) in s))
        path = ctx.dir.result("compare")
        cmp = []
        if os.path.exists(path):
            with open(path) as f:
                cmp = [c for c in json.load(f) if c.get("a_id") == "align"]
        if cmp:
            lines.append(f"  stage 2 minus random init, all labels, with 95% intervals over {cmp[0]['draws']} study-level "
                         f"bootstrap draws of the {cmp[0]['n_studies']} test studies (AUROC; age: MAE in years, positive "
                         f"= stage 2 better; one draw of corpus and training: benchmarks/demo_seeds.py repeats it on "
                         f"other seeds):")
            lines += [f"    {c['task']}: {c['gain']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]" for c in cmp
                      if not c["task"].startswith(suite.FINDING)]
        chose = suite.readout_choices(rows)
        if chose:
            lines.append("  readout chosen with the penalty (the lower held-out log-loss, the findings and abnormal pooled), "
                         "probes per readout: "
                         + "; ".join(f"{e} " + ", ".join(f"{f} {n}" for f, n in c.items()) for e, c in sorted(chose.items())))
        err, floor = suite.summarise(rows, "mae"), suite.summarise(rows, "mae_of_mean")
        for task in sorted({k[1] for k in err}):  # age: ridge probes
            lines.append(f"  {task} (ridge within each body region; test MAE in years, predicting the training mean: "
                         f"{floor[(names[0], task, 1.0)][0]:.1f}): "
                         + ", ".join(f"{e} {err[(e, task, 1.0)][0]:.1f}" for e in names if (e, task, 1.0) in err))
        return lines


@register
class Sweep(Evaluator):
    """A probe sweep (:mod:`decipher_jax.eval.sweep`: pools x tasks x heads x hyper-parameter
    grids) over the frozen encoders of the runs, or over the precomputed feature sets it names.
    ``sweep``: a sweep file (``experiments/sweeps/probes.py``); ``grid``: the same dict inline."""

    name = "sweep"

    @classmethod
    def defaults(cls):
        return {"sweep": "", "grid": None, "encoders": None}

    def run(self, ctx):
        from decipher_jax.eval import suite, sweep

        s = self.settings
        sw = dict(s["grid"] or {}) if not s["sweep"] else sweep.load_sweep(s["sweep"])
        if not sw.get("tasks"):
            raise ValueError(f"evaluator {self.name!r}: the sweep names no tasks (set sweep or grid)")
        if sw.get("features"):  # precomputed feature sets; else the runs' encoders (a sweep's pipeline is ignored)
            sets = sweep.feature_sets({"features": sw["features"]}, ctx.out)
        else:
            for split in ("train", "test"):
                ctx.source(split)
            encs, vit = ctx.legacy_encoders(s["encoders"])
            sets = sweep.encoder_sets(encs, vit, suite.split_sources(ctx.data))
        return sweep.grid(sw, sets)

    def summary(self, rows, ctx):
        cells = {(r["features"], r["pool"], r["task"]) for r in rows}
        return [f"probe sweep: {len(rows)} results over {len(cells)} (features, pool, task) cells in {{seconds}} s "
                f"({ctx.dir.result(self.name)})"]


@register
class Segmentation(Evaluator):
    """Segmentation heads (linear, decoder, unetr) on frozen tokens: brain tissue and lesions.

    ``steps``, ``batch``, ``lrs``, ``seeds``: both tasks' heads; ``lesion_steps``,
    ``lesion_batch``, ``lesion_lrs`` (0 or empty: the same) and ``lesion_kinds`` (empty: all
    three) set the lesion task's alone; ``lesion_anomaly``: the lesion heads also read each
    patch's distance to the nearest normal training patch (``segtasks.with_distance``). The
    lesion heads need the longer schedule (600 steps at batch 8 reach 0.52 Dice at 400 patients
    where 150 x 4 reach 0.18-0.27, without the distance; BENCHMARKS.md) while brain tissue is
    fitted at 150 x 4."""

    name = "segmentation"

    @classmethod
    def defaults(cls):
        # skip_convs: the unetr head's image skip, one 3^3 convolution or UNETR's two (seghead).
        return {"encoders": ("align", "random"), "steps": 150, "batch": 4, "lrs": (1e-2, 3e-2), "seeds": (0,),
                "skip_convs": 1, "lesion_steps": 0, "lesion_batch": 0, "lesion_lrs": (), "lesion_kinds": (),
                "lesion_anomaly": True}

    def __init__(self, **settings):
        super().__init__(**settings)
        from decipher_jax.eval import segtasks

        if self.settings["lesion_kinds"]:  # checked before any evaluator runs, not after the others have
            segtasks.check_kinds(self.settings["lesion_kinds"], f"evaluator {self.name!r}: lesion_kinds")

    def lesion_grid(self) -> dict:
        """The lesion task's departures from the shared head settings."""
        s, out = self.settings, {}
        if s["lesion_steps"]:
            out["steps"] = int(s["lesion_steps"])
        if s["lesion_batch"]:
            out["batch"] = int(s["lesion_batch"])
        if s["lesion_lrs"]:
            out["lrs"] = tuple(float(x) for x in s["lesion_lrs"])
        if s["lesion_kinds"]:
            out["kinds"] = tuple(s["lesion_kinds"])
        out["anomaly"] = bool(s["lesion_anomaly"])
        return out

    def run(self, ctx):
        from decipher_jax.eval import segtasks

        s = self.settings
        lesion = self.lesion_grid()
        encs, vit = ctx.legacy_encoders(s["encoders"])
        return segtasks.run(encs, ctx.data, ctx.mesh, size=vit.img_size, out=ctx.dir.arrays(self.name),
                            steps=s["steps"], batch=s["batch"], lrs=tuple(s["lrs"]), seeds=tuple(s["seeds"]),
                            skip_convs=s["skip_convs"], lesion=lesion)

    def summary(self, seg, ctx):
        lines = ["segmentation heads on frozen tokens (linear, decoder, unetr with an image skip; lr x seed grids "
                 "vmapped) in {seconds} s; foreground Dice on held-out voxels:"]
        for task, r in seg.items():
            if r and r.get("heads"):
                h = r["heads"]
                lines.append(f"  ({task} heads: {', '.join(h['kinds'])}, {h['steps']} steps x batch {h['batch']}, "
                             f"lrs {', '.join(f'{x:g}' for x in h['lrs'])}"
                             + (f"; tokens and their distance to {h['bank_series']} normal training series"
                                if h.get("anomaly") else "") + ")")
            if r:
                best = {}
                for row in r["rows"]:
                    if row["dice_mean_fg"] > best.get(row["encoder"], {"dice_mean_fg": -1})["dice_mean_fg"]:
                        best[row["encoder"]] = row
                lines.append(f"  {task}: " + ", ".join(f"{e} {row['dice_mean_fg']:.2f} ({row['head']})"
                                                       for e, row in best.items()))
        return lines


@register
class Ladder(Evaluator):
    """The ladder (:mod:`decipher_jax.eval.ladder`): the frozen encoders' probes (run ``probes``
    first) beside the trained rungs: fine-tuning runs of the same ViT from random init
    (``supervised``) and from the stage-2 image tower (``fine-tuned``) at the same label
    fractions, on the same test studies with bootstrap intervals. The trained rungs are read
    from ``runs`` (default ``<out>/ladder``): one finished run per ``<task>/<rung>-<fraction>/``
    (the pipeline's ``ladder`` stage trains them, or ``decipher train --config
    experiments/configs/finetune.py:<task> --workdir <out>/ladder/<task>/supervised-0.1
    --config.data.label_fraction=0.1``); evaluation itself trains nothing."""

    name = "ladder"

    @classmethod
    def defaults(cls):
        return {"runs": "", "draws": 500}

    def run(self, ctx):
        from decipher_jax import runs
        from decipher_jax.eval import ladder

        for split in ("train", "test"):
            ctx.source(split)
        root = self.settings["runs"] or os.path.join(ctx.out, ladder.ROOT)
        found = ladder.find_runs(root)
        frozen = ladder.load_probe_scores(os.path.join(ctx.dir.arrays("probes"), ladder.PROBE_SCORES))
        fractions = sorted({float(f) for (_, _, f) in frozen} | {f for (_, _, f) in found})
        rows, used = [], {}
        for task in dict.fromkeys([t for (t, _, _) in found] or ["findings"]):
            trained = {}
            for (t, rung, f), w in found.items():
                if t != task:
                    continue
                preds = dict(np.load(os.path.join(w, "test_predictions.npz"), allow_pickle=False))
                with open(os.path.join(w, "test.json")) as fh:
                    res = json.load(fh)
                if task == "age":  # the run's targets are standardised; its scores are years
                    ts = runs.read_spec(w)["config"]["task_spec"]
                    preds["y_years"] = preds["y"] * ts["std"] + ts["mean"]
                trained[(rung, f)] = preds
                used[f"{task}/{rung}-{f:g}"] = {"workdir": w, "best_step": res["best_step"], "test": res["test"]["score"]}
            rows += ladder.rows_for(task, frozen, trained, fractions, draws=self.settings["draws"])
        return {"rows": rows, "runs": used}

    def summary(self, res, ctx):
        lines = ["the ladder (frozen probes, and the same ViT trained end to end); test score [95% interval over "
                 "study bootstrap draws]:"]
        for task in dict.fromkeys(r["task"] for r in res["rows"]):
            rs = [r for r in res["rows"] if r["task"] == task]
            lines.append(f"  {task} ({rs[0]['metric']}):")
            for r in sorted(rs, key=lambda r: (r["kind"] != "frozen", r["rung"], r["fraction"])):
                lines.append(f"    {r['rung']} @ {r['fraction']:g} labels: {r['score']:.3f} "
                             f"[{r['lo']:.3f}, {r['hi']:.3f}]")
        return lines


@register
class MultiParam(Evaluator):
    """Findings from multi-parametric studies by the sequences present
    (:mod:`decipher_jax.eval.multiparam`): the multi-sequence run ``runs["multiparam"]`` (absent
    sequences masked, or filled with its templates), the single-sequence run
    ``runs["multiparam_single"]`` and a random-init floor, each frozen with logistic probes, on
    every subset of sequences of the complete test studies, beside the same ViT trained end to
    end on the findings for ``trained_steps`` (0: none) from random init and from the run, and
    lesion segmentation heads on the frozen encoders for ``seg_steps`` (0: none), with ``draws``
    patient-bootstrap draws for the intervals.
    ``data``: the multi-parametric records ("" = the multiparam run's ``data.dir``)."""

    name = "multiparam"

    @classmethod
    def defaults(cls):
        return {"data": "", "findings": ("infarct", "dwi_flair_mismatch", "hemorrhage", "mass"), "copies": 4,
                "trained_steps": 300, "seg_steps": 300, "draws": 1000}

    def run(self, ctx):
        from decipher_jax.eval import multiparam

        runs = {"multi-sequence": ctx.runs.get("multiparam", ""), "single-sequence": ctx.runs.get("multiparam_single", "")}
        runs = {k: v for k, v in runs.items() if v and os.path.isdir(v)}
        if not runs:
            raise MissingSplit("no multiparam run to evaluate (runs.multiparam, runs.multiparam_single)")
        return multiparam.evaluate(runs, self.settings["data"], tuple(self.settings["findings"]), random=ctx.random,
                                   copies=self.settings["copies"], mesh=None, arrays=ctx.dir.arrays(self.name),
                                   trained_steps=self.settings["trained_steps"], seg_steps=self.settings["seg_steps"],
                                   draws=self.settings["draws"])

    def summary(self, r, ctx):
        from decipher_jax.eval import multiparam

        return multiparam.summary(r)
