"""``decipher report``: one self-contained HTML page (figures embedded as PNG) for a workdir.

One section per evaluator file that ``decipher eval`` (or the demo) wrote, by the evaluator's
name (:mod:`decipher_jax.eval.evaluators`), skipping what is absent:
- ``eval/ladder.json``: the ladder, first: every rung's score against label fraction;
- ``eval/retrieval.json``: held-out retrieval (before / after stage 2), with examples;
- ``eval/rerank.json``: token-level re-ranking of the top k;
- ``eval/probes.json`` (and ``eval/compare.json``): probe score against label fraction;
- ``eval/zeroshot.json``; ``eval/localisation.json`` (+ ``eval/localisation/examples.npz``);
- ``eval/segmentation.json`` (+ ``eval/segmentation/examples.npz``): Dice / HD95 per task,
  encoder and head, and overlay slices;
and the training curves of the runs under the workdir (``stage1_vision/``, ``stage1_text/``,
``stage2/`` ``metrics.jsonl``) and ``summary.md``.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os

import numpy as np

from decipher_jax import layout

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%}.note{color:#666;font-size:.9em}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto}"""


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on servers or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FEATURE_WORDS = {"mean": "the mean pool", "max": "the channel-wise max pool", "cls": "the CLS token",
                 "anomaly": "the tokens pooled towards the patches farthest from normal training series' (the "
                            "visual anomaly map's weights)"}


def _feature_note(rows) -> str:
    """Which pooled tokens each kind of task read, from the probe rows' ``feature``; where the
    readout was chosen among candidates (``readout_losses``), how often each encoder chose each."""
    from decipher_jax.eval import suite

    say = lambda f: " beside ".join(FEATURE_WORDS.get(n, n) for n in f.split("+"))  # noqa: E731
    kinds: dict[str, list] = {}
    for r in rows:
        kind = "the findings and abnormal" if r["task"] == "abnormal" or r["task"].startswith("finding") else "the attributes"
        kinds.setdefault(kind, []).append(r)
    parts = []
    for kind, rs in sorted(kinds.items()):
        cands = list(dict.fromkeys(f for r in rs for f in r.get("readout_losses", {})))  # the setting's order
        if len(cands) < 2:
            parts.append(f"{kind}: " + ", ".join(say(f) for f in sorted({r.get("feature", "mean") for r in rs})))
            continue
        chose = [f"{enc} " + ", ".join(f"{f} {n}/{sum(c.values())}" for f, n in c.items() if n)
                 for enc, c in sorted(suite.readout_choices(rs).items())]
        parts.append(f"{kind}: " + " or ".join(f"{f} ({say(f)})" for f in cands) + ", whichever has the lower "
                     "held-out log-loss, chosen with the penalty per encoder, label fraction and seed, the findings "
                     "and abnormal pooled (probes per readout: " + "; ".join(chose) + ")")
    return "; ".join(parts)


def _selection_note(rows) -> str:
    """How the probes' penalties were chosen (``selection`` of the probe rows)."""
    kinds = sorted({r.get("selection", "3-fold CV") for r in rows})
    other = [k for k in kinds if k != "val"]
    rule = (" (the strongest penalty within one standard error of the best score)"
            if any(r.get("rule") == "1-SE" for r in rows) else "")
    if "val" not in kinds:
        return "the penalty chosen by " + " or ".join(other) + rule
    note = ("the penalty chosen on the val split (patients that no encoder was trained on: CV inside the "
            "training split would reward what the pretrained encoders memorised of its reports)")
    return note + (f", or by {' / '.join(other)} for a task the val split lacks" if other else "") + rule


def _png(fig) -> str:
    plt = _pyplot()

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(header, rows, left=1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(str(h))}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{html.escape(str(c))}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _load_result(workdir: str, name: str):
    """An evaluator's ``eval/<name>.json`` under ``workdir``, or None when the pipeline did not write it."""
    path = layout.PipelineDir(workdir).result(name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


STAGES = (("stage1_vision", "Stage 1 vision (DINO + iBOT + KoLeo)", ("loss", "dino", "ibot", "koleo"),
           ("teacher_entropy", "feature_std")),
          ("stage1_text", "Stage 1 text (MLM)", ("loss",), ("acc",)),
          ("stage2", "Stage 2 (image-report alignment)", ("loss",), ("i2t_acc", "embed_std")))


def training_curves(workdir: str) -> str:
    plt = _pyplot()

    logs = {s[0]: _read_jsonl(p) for s in STAGES if os.path.exists(p := layout.PipelineDir(workdir).run(s[0]).metrics)}
    present = [s for s in STAGES if logs.get(s[0])]  # a run shorter than its log interval has no rows
    if not present:
        return ""
    fig, axes = plt.subplots(2, len(present), figsize=(4.2 * len(present), 5.5), squeeze=False)
    for j, (d, title, top, bottom) in enumerate(present):
        rows = logs[d]
        steps = [r["step"] for r in rows]
        for ax, keys in ((axes[0, j], top), (axes[1, j], bottom)):
            for k in keys:
                if k in rows[0]:
                    ax.plot(steps, [r.get(k, np.nan) for r in rows], label=k)
            ax.legend(fontsize=8)
            ax.set_xlabel("step")
        axes[0, j].set_title(title, fontsize=10)
    fig.tight_layout()
    return "<h2>Training curves</h2>" + _png(fig)


def retrieval(workdir: str) -> str:
    r = _load_result(workdir, "retrieval")
    if r is None or "splits" not in r or "test" not in r["splits"]:
        return ""
    ev = {"before": r.get("before", {}).get("test"), "after": r["splits"]["test"]}
    ev = {k: v for k, v in ev.items() if v}
    keys = ["i2t_study/R@1", "i2t_study/R@5", "i2t_study/R@10", "i2t_series/R@5", "t2i_series/R@5", "i2t_series/MRR"]
    rows = [[tag, *(f"{ev[tag][k]:.2f}" for k in keys)] for tag in ("before", "after") if tag in ev]
    any_ev = ev.get("after") or ev.get("before")
    out = ["<h2>Held-out retrieval</h2>",
           f'<p class="note">{any_ev["n_studies"]} test studies, {any_ev["n_series"]} series; chance R@5 at study '
           f'level {any_ev["chance_study_R@5"]:.2f}. "before": the stage-1 towers with fresh projections.</p>',
           _table(["model"] + keys, rows)]
    ex = (ev.get("after") or ev.get("before") or {}).get("examples")
    if ex:
        out.append("<h3>Examples: the top reports retrieved for held-out series</h3>")
        rows = [[e["series_id"], e["body_region"], " | ".join(("✓ " if s == e["study_id"] else "") + t[:90]
                                                              for s, t in zip(e["top_studies"], e["top_reports"]))]
                for e in ex]
        out.append(_table(["series", "region", "top-3 reports (✓ = its own study)"], rows, left=3))
    return "\n".join(out)


def rerank_section(workdir: str) -> str:
    rr = _load_result(workdir, "rerank")
    if rr is None or "test" not in rr:
        return ""
    t = rr["test"]
    keys = [k for k in t["first_stage"]]
    rows = [[name, *(f"{t[tag][k]:.2f}" for k in keys)] for name, tag in (("first stage (global cosine)", "first_stage"),
                                                                           ("re-ranked top k", "reranked"))]
    return ("<h3>Re-ranking</h3>"
            f'<p class="note">Each series\' top {t["k"]} reports re-scored by global cosine + {rr["weight"]} x '
            "patch-to-word similarity (every report word piece\'s best-matching patch, averaged); the weight "
            f'was chosen on the validation split. {t["n_series"]} held-out series, {t["n_studies"]} reports.</p>'
            + _table(["ranking"] + keys, rows))


def segmentation_section(workdir: str) -> str:
    d = layout.PipelineDir(workdir).arrays("segmentation")
    seg = _load_result(workdir, "segmentation")
    if seg is None or "skipped" in seg:
        return ""
    fmt = lambda v: "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    out = ["<h2>Segmentation on frozen encoders</h2>",
           '<p class="note">Heads on frozen patch tokens: <i>linear</i> (per token, upsampled), <i>decoder</i> '
           "(two x2 transposed-conv stages) and <i>unetr</i> (the decoder fused with a 3x3x3 convolution of the "
           "image itself). For each, an lr x seed grid trains in one vmapped call; the lr is chosen on training "
           "voxels (tissue) or the validation split (lesions); Dice and HD95 (mm) are means over seeds on "
           "held-out voxels.</p>"]
    notes = {"brain_tissue": lambda r: (f"Real MNI152 template ({'x'.join(map(str, r['shape']))} voxels at "
                                        f"{r['spacing_mm'][0]:g} mm): heads learn on the left hemisphere (random "
                                        f"{'x'.join(map(str, r['window']))} windows, loss masked), are scored on the "
                                        f"right one, predicted by sliding windows (overlap 0.5)."
                                        + (" Colin27 column: grey-matter Dice of the same heads on a second "
                                           "subject (AAL regions as grey matter)." if r.get("transfer") else "")),
             "lesions": lambda r: (f"Synthetic corpus: {r['n_train']} training series, {r['n_test']} held-out series "
                                   f"with a lesion (lesions are {100 * r['lesion_fraction_test']:.1f}% of their voxels)."
                                   + (f" Heads: {', '.join(r['heads']['kinds'])}, {r['heads']['steps']} steps at "
                                      f"batch {r['heads']['batch']}, lr from {', '.join(f'{x:g}' for x in r['heads']['lrs'])}."
                                      if r.get("heads") else "")
                                   + (f" Beside the tokens the heads read each patch's distance to the nearest patch of "
                                      f"{r['heads']['bank_series']} normal training series (the visual anomaly map)."
                                      if r.get("heads", {}).get("anomaly") else ""))}
    for task, r in seg.items():
        if not r:
            continue
        cols = [k for k in r["rows"][0] if k not in ("task", "seeds")]
        out.append(f"<h3>{html.escape(task.replace('_', ' '))}</h3><p class=\"note\">{html.escape(notes[task](r))}</p>")
        out.append(_table(cols, [[fmt(row.get(c)) for c in cols] for row in r["rows"]], left=2))
    ex_path = os.path.join(d, "examples.npz")
    if os.path.exists(ex_path):
        plt = _pyplot()

        ex = np.load(ex_path)
        tasks = [t for t in ("brain_tissue", "lesions") if f"{t}_image" in ex]
        panels = [(t, i) for t in tasks for i in range(len(ex[f"{t}_image"]))]
        fig, axes = plt.subplots(2, len(panels), figsize=(3.0 * len(panels), 6.0), squeeze=False)
        for j, (t, i) in enumerate(panels):
            img, lab, pred = ex[f"{t}_image"][i], ex[f"{t}_label"][i], ex[f"{t}_pred"][i]
            for row, (m, name) in enumerate(((lab, "ground truth"), (pred, str(ex[f"{t}_title"])))):
                ax = axes[row, j]
                ax.imshow(img.T, cmap="gray", origin="lower")
                ax.imshow(np.ma.masked_equal(m.T, 0), cmap="autumn" if t == "lesions" else "viridis", alpha=0.5,
                          origin="lower", vmin=0, vmax=max(int(m.max()), 1))
                ax.set_title(f"{t.replace('_', ' ')}: {name}", fontsize=7)
                ax.axis("off")
        fig.tight_layout()
        out.append(_png(fig) + '<p class="note">Axial slices: ground truth (top) and the best head\'s prediction '
                   "(bottom). Brain tissue: grey / white matter; lesions: the slice through each lesion.</p>")
    return "\n".join(out)


def probes_section(workdir: str) -> str:
    rows = _load_result(workdir, "probes")
    if not isinstance(rows, list) or not rows:
        return ""
    plt = _pyplot()

    from decipher_jax.eval.suite import summarise, task_order

    s = summarise(rows, "auroc", group_findings=True)
    err = summarise(rows, "mae")  # regression probes (age): lower is better
    panels = [(t, s, "AUROC (test)") for t in sorted({k[1] for k in s}, key=task_order)]
    panels += [(t, err, "MAE (test)") for t in sorted({k[1] for k in err})]
    encs = sorted({k[0] for k in s} | {k[0] for k in err})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (t, d, ylabel) in zip(axes[0], panels):
        for e in encs:
            fr = sorted(k[2] for k in d if k[0] == e and k[1] == t)
            m = [d[(e, t, f)][0] for f in fr]
            sd = [d[(e, t, f)][1] for f in fr]
            ax.errorbar(fr, m, yerr=sd, marker="o", capsize=3, label=e)
        ax.set_xscale("log")
        ax.set_title(t if not t.startswith("findings") else f"{t}: mean over tasks", fontsize=10)
        ax.set_xlabel("label fraction")
        ax.set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    ba = summarise(rows)
    au = summarise(rows, "auroc")
    full = [[e, t, f"{au[(e, t, 1.0)][0]:.3f}" if (e, t, 1.0) in au else "n/a", f"{ba[(e, t, 1.0)][0]:.3f}"]
            for t in sorted({k[1] for k in ba}, key=task_order) for e in encs
            if (e, t, 1.0) in ba]
    html = ("<h2>Linear probes on frozen features</h2>"
            f'<p class="note">Logistic probes on frozen patch tokens ({_feature_note(rows)}), fitted on the training split; '
            f"{_selection_note(rows)}. Mean and std over "
            "seeds of the label subsets (drawn by patient). Scores on the test split. A finding probe is fitted "
            "and scored on the body regions where the finding occurs; the findings panel averages them "
            "(one-vs-rest AUROC for the multi-class attributes). Age: ridge probes, mean absolute error in "
            "years.</p>" + _png(fig)
            + _table(["encoder", "task", "AUROC, all labels", "balanced accuracy, all labels"], full, left=2))
    if err:
        r2, floor = summarise(rows, "r2"), summarise(rows, "mae_of_mean")
        reg = [[e, t, f"{err[(e, t, 1.0)][0]:.2f}", f"{r2[(e, t, 1.0)][0]:.3f}", f"{floor[(e, t, 1.0)][0]:.2f}"]
               for t in sorted({k[1] for k in err}) for e in encs if (e, t, 1.0) in err]
        html += _table(["encoder", "task", "MAE, all labels", "R^2", "MAE of the training mean"], reg, left=2)
    cmp = _load_result(workdir, "compare")
    if cmp:
        html += ('<p class="note">Pretrained minus random init on the same test rows (all labels, first seed): '
                 f"AUROC, or MAE in years for age, positive when the pretrained encoder is better; 95% interval "
                 f"and the share of draws in which it is not better, over {cmp[0]['draws']} bootstrap draws of "
                 f"the {cmp[0]['n_studies']} test studies (a study's series are resampled together). The "
                 "interval covers the test sample only: the corpus, split and training run are one draw "
                 "(<code>benchmarks/demo_seeds.py</code> repeats the demo on other corpus seeds).</p>"
                 + _table(["encoder", "task", "gain", "95% interval", "P(not better)"],
                          [[c["a"], c["task"], f"{c['gain']:+.3f}", f"[{c['lo']:+.3f}, {c['hi']:+.3f}]",
                            f"{c['p_not_better']:.2f}"] for c in cmp], left=2))
    cross = _load_result(workdir, "cross_sex")
    if cross:
        from decipher_jax.eval.suite import cross_summary

        html += ('<p class="note">Cross-sex test: probes fitted on one sex\'s training series and scored on '
                 "each sex's test series (all labels, first seed). Same: the mean over fitted-and-scored on the "
                 "same sex; cross: on the other; a robust encoder has a gap near 0 (AUROC; minus the MAE for "
                 "age).</p>"
                 + _table(["encoder", "task", "same sex", "other sex", "gap"],
                          [[c["encoder"], c["task"], f"{c['same']:.3f}", f"{c['cross']:.3f}", f"{c['gap']:+.3f}"]
                           for c in cross_summary(cross)], left=2))
    return html


def ladder_section(workdir: str) -> str:
    """The report's first figure: score against label fraction, one line per rung, one panel per task."""
    res = _load_result(workdir, "ladder")
    if not isinstance(res, dict) or not res.get("rows"):
        return ""
    plt = _pyplot()

    rows = res["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    order = lambda r: (r["kind"] != "frozen", r["rung"])  # noqa: E731
    for ax, task in zip(axes[0], tasks):
        rs = [r for r in rows if r["task"] == task]
        for rung in dict.fromkeys(r["rung"] for r in sorted(rs, key=order)):
            pts = sorted((r for r in rs if r["rung"] == rung), key=lambda r: r["fraction"])
            x = [r["fraction"] for r in pts]
            y = [r["score"] for r in pts]
            err = [[r["score"] - r["lo"] for r in pts], [r["hi"] - r["score"] for r in pts]]
            ax.errorbar(x, y, yerr=err, marker="o" if pts[0]["kind"] == "frozen" else "s", capsize=3,
                        linestyle="-" if pts[0]["kind"] == "frozen" else "--", label=rung)
        if rs[0]["metric"] == "AUROC":
            ax.axhline(0.5, color="#999", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("label fraction (of the training patients)")
        ax.set_ylabel(f"{rs[0]['metric']} (test)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    table = [[r["task"], r["rung"], r["kind"], f"{r['fraction']:g}", f"{r['score']:.3f}",
              f"[{r['lo']:.3f}, {r['hi']:.3f}]"] for r in sorted(rows, key=lambda r: (r["task"], *order(r), r["fraction"]))]
    n = rows[0]
    return ("<h2>The ladder</h2>"
            '<p class="note">Every rung of a task on the same test split: linear probes on the frozen encoders '
            "(random init, stage 1, stage 2), and the same ViT trained end to end on the task from random init "
            "(supervised) and fine-tuned from the stage-2 image tower, on the same label fractions (whole "
            f"patients). Bars: 95% intervals over {n['draws']} bootstrap draws of the {n['n_studies']} test "
            "studies (the same draws for every rung). The findings panel is the mean AUROC over the findings, "
            "each on its body regions. A pretrained encoder is useful where it climbs above random init and "
            "towards (or past) the supervised rung with fewer labels.</p>"
            + _png(fig) + _table(["task", "rung", "kind", "labels", "score", "95% interval"], table, left=3))


def localisation_section(workdir: str) -> str:
    d = layout.PipelineDir(workdir).arrays("localisation")
    m = _load_result(workdir, "localisation")
    if m is None or not m.get("n_series"):
        return ""
    how = ("each patch's own embedding" if m.get("text_map") == "patch" else "each patch's share of the image's score")
    maps = [("text-guided (stage 2)", m)] + [(f"visual, {k}", v) for k, v in m.get("visual", {}).items()]
    cell = lambda v, k: "-" if k not in v else f"{v[k]:.2f}"  # noqa: E731
    out = ["<h2>Anomaly localisation</h2>",
           f'<p class="note">{m["n_series"]} held-out series with a lesion mask. Text-guided: {how} on the finding '
           "query's direction (positive minus negative prompt ensemble). Visual (no text): each patch token's "
           f"distance to the nearest token of {m.get('bank_series', '?')} training series without findings of the "
           "same region and sequence. Maps upsampled trilinearly. Pointing game: the map's maximum falls in the "
           f'lesion (a random point: {m["pointing_game_random"]:.3f}, in the body '
           f'{m.get("pointing_game_body_random", float("nan")):.3f}); voxel AUROC: random 0.50.</p>',
           _table(["map", "voxel AUROC", "voxel AUROC, body", "pointing game", "pointing game, body"],
                  [[name, cell(v, "voxel_auroc"), cell(v, "voxel_auroc_body"), cell(v, "pointing_game"),
                    cell(v, "pointing_game_body")] for name, v in maps], left=1),
           _table(["finding", "series"] + [name for name, _ in maps],
                  [[k, v["n"]] + [cell(mv.get("per_finding", {}).get(k, {}), "voxel_auroc_body") for _, mv in maps]
                   for k, v in m.get("per_finding", {}).items()], left=2),
           '<p class="note">Per finding: voxel AUROC in the body.</p>']
    det = [(k, v["detection"]) for k, v in m.get("visual", {}).items() if "detection" in v]
    if det:
        regions = sorted({r for _, d in det for r in d["per_region"]})
        out += ["<h3>Detection by the visual map's maximum</h3>",
                f'<p class="note">Each of the split\'s {det[0][1]["n_series"]} series scored by its visual map\'s '
                "largest patch distance (its most anomalous patch; nothing is fitted to labels), as a classifier of "
                f'any finding ({det[0][1]["n_abnormal"]} series: the probes\' "abnormal" task) and of a lesion mask '
                f'({det[0][1]["n_lesion"]}). AUROC; random 0.50.</p>',
                _table(["visual map", "any finding", "a lesion"] + [f"any finding, {r}" for r in regions],
                       [[k, cell(d, "abnormal_auroc"), cell(d, "lesion_auroc")]
                        + [cell(d["per_region"].get(r, {}), "abnormal_auroc") for r in regions] for k, d in det],
                       left=1)]
    ex_path = os.path.join(d, "examples.npz")
    if os.path.exists(ex_path):
        plt = _pyplot()

        ex = np.load(ex_path)
        n = len(ex["heat"])
        rows = [("heat", "text-guided")] + ([("visual", "visual")] if "visual" in ex else [])
        fig, axes = plt.subplots(len(rows), n, figsize=(3.2 * n, 3.4 * len(rows)), squeeze=False)
        for r, (key, title) in enumerate(rows):
            for ax, img, heat, mask, sid, q in zip(axes[r], ex["image"], ex[key], ex["mask"], ex["series_id"],
                                                   ex["query"]):
                ax.imshow(img.T, cmap="gray", origin="lower")
                ax.imshow(heat.T, cmap="inferno", alpha=0.45, origin="lower")
                if mask.any():
                    ax.contour(mask.T, levels=[0.5], colors="cyan", linewidths=1.2, origin="lower")
                ax.set_title(f"{sid}\n{title}: {q}", fontsize=8)
                ax.axis("off")
        fig.tight_layout()
        out.append(_png(fig) + '<p class="note">Axial slice through each lesion (cyan contour); the text-guided '
                   "map (top) and the visual map (bottom) overlaid.</p>")
    return "\n".join(out)


def zeroshot_section(workdir: str) -> str:
    z = _load_result(workdir, "zeroshot")
    if z is None or "table" not in z:
        return ""
    return "<h2>Zero-shot</h2>" + _table(["query", "result"], [[k, v] for k, v in z["table"].items()], left=2)


def caption_section(workdir: str) -> str:
    """Report generation and VQA (``eval/caption.json``): each system's scores, then generated
    reports beside their references with each stated finding marked right or wrong."""
    from decipher_jax.eval.textgen import QUESTIONS

    c = _load_result(workdir, "caption")
    if not isinstance(c, dict) or not c.get("systems"):
        return ""
    kinds = [k for k in QUESTIONS if k in c["systems"]["model"]["vqa"]]
    names = {"model": "image-conditioned decoder", "rag": "image + retrieved training report (retrieval-augmented)",
             "retrieval": "retrieval only (nearest training report)", "prior": "language prior (no image)"}
    rows = []
    for key in ("model", "rag", "retrieval", "prior"):
        s = c["systems"].get(key)
        if s:
            v = s["vqa"]
            rows.append([names[key], f"{s['bleu']['bleu4']:.1f}", f"{s['rougeL']:.3f}",
                         f"{s['clinical']['macro_f1']:.3f} / {s['clinical']['micro_f1']:.3f}",
                         f"{v.get('image_dependent', {}).get('accuracy', float('nan')):.3f}"]
                        + [f"{v[k]['accuracy']:.2f}" for k in kinds])
    out = ["<h2>Report generation and VQA</h2>",
           f'<p class="note">{c["n_series"]} held-out series ({c["split"]}; patients disjoint from training), '
           f'{c["n_questions"]} templated questions whose answers come from the record (mask, affine, metadata), '
           f'{c["method"]} decoding. BLEU-4: sacrebleu {html.escape(c["systems"]["model"]["bleu"]["signature"])}; '
           "ROUGE-L: rouge-score F-measure, stemmed. Finding F1: the findings each generated report states present "
           "(negations parsed) against the series' labels.</p>",
           _table(["system", "BLEU-4", "ROUGE-L", "finding F1 macro / micro", "VQA, image-dependent"]
                  + [f"VQA {k}" for k in kinds], rows)]
    ex_rows = []
    for e in c.get("examples", []):
        marks = [f"{f} {'right' if (f in e['findings']) == v else 'wrong'}" for f, v in e["stated"].items() if v]
        missed = [f"{f} missed" for f in e["findings"] if not e["stated"].get(f)]
        ex_rows.append([e["series_id"], e["generated"], e["reference"], "; ".join(marks + missed) or "none stated"])
    if ex_rows:
        out.append(_table(["series", "generated", "reference", "findings stated present"], ex_rows, left=4))
    return "\n".join(out)


def multiparam_section(workdir: str) -> str:
    """Multi-parametric findings by the sequences present (``eval/multiparam.json``): mean test
    AUROC per number of sequences and per subset for each encoder, the issue's criteria, and a
    figure of the pretraining views (masked inputs, reconstructions, templates)."""
    r = _load_result(workdir, "multiparam")
    if not isinstance(r, dict) or not r.get("rows"):
        return ""
    seqs = r["sequences"]
    names = list(dict.fromkeys(n for row in r["rows"].values() for n in row["subsets"]))
    out = ["<h2>Multi-parametric MRI: findings by the sequences present</h2>",
           f'<p class="note">Frozen encoders, a logistic probe per finding ({html.escape(", ".join(r["findings"]))}) '
           f'trained on {r["studies"]["train"]} training studies under random missing-sequence patterns (penalty on '
           f'the val split), scored on the {r["studies"]["test_complete"]} complete test studies with only the named '
           "sequences given: mean AUROC over the findings. mask: absent sequences' tokens absent; template: absent "
           "sequences replaced by the run's learnt templates; late: each sequence encoded alone. study pool: the CLS "
           "token and the present tokens' mean and max; sequence pool: the CLS token and each sequence's own mean "
           "and max, side by side (zeros for an absent one).</p>"]
    from decipher_jax.eval.multiparam import by_size_cell

    sizes = list(range(1, len(seqs) + 1))
    boot = r.get("bootstrap")
    if boot:
        out.append(f'<p class="note">[95 % intervals: {boot["draws"]} bootstrap draws of the test {boot["unit"]}s; '
                   "gains are paired (the same draws for both encoders).]</p>")
    rows = [[name] + [by_size_cell(row, k) for k in sizes] for name, row in r["rows"].items()]
    out.append(_table(["encoder"] + [f"{k} sequence{'s' if k > 1 else ''} (mean)" for k in sizes], rows))

    def cell(v):
        return "-" if not v else f"{v['auroc']:.3f}" + (f" [{v['lo']:.2f}, {v['hi']:.2f}]" if "lo" in v else "")

    rows = [[n] + [cell(row["subsets"].get(n)) for row in r["rows"].values()] for n in names]
    out.append(_table(["sequences present"] + list(r["rows"]), rows))
    for key, c in (r.get("criteria") or {}).items():
        g = c.get("gain")
        gtxt = f" (gain {g['gain']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}])" if g else ""
        out.append(f'<p>[{html.escape(key)}] all sequences {c["all_sequences"]:.3f} against the best single-sequence '
                   f'encoder ({html.escape(c["best_single_sequence"])}) {c["best_single"]:.3f}{gtxt}: '
                   f'{"beats it" if c["beats_best_single"] else "does not beat it"}. Above that single score with k '
                   "sequences: " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in c["above_best_single_by_size"].items())
                   + "</p>")
    seg = (r.get("segmentation") or {}).get("rows")
    if seg:
        out.append(f"<p>Lesion Dice from the frozen tokens (UNETR head, {r['segmentation']['test_studies_with_lesion']} "
                   "complete test studies with a lesion):</p>")
        out.append(_table(["encoder"] + [f"{k} sequence{'s' if k > 1 else ''} (mean)" for k in sizes],
                          [[name] + [by_size_cell(row, k) for k in sizes] for name, row in seg.items()]))
    ex = os.path.join(layout.PipelineDir(workdir).arrays("multiparam"), "examples.npz")
    if os.path.exists(ex):
        plt = _pyplot()
        z = np.load(ex)
        n, s = len(z["target"]), len(z["templates"])
        cols = max(6, s)
        fig, axes = plt.subplots(n + 1, cols, figsize=(2 * cols, 2 * (n + 1)))
        titles = ("target", "masked blocks", "template-filled", "its reconstruction", "cross-filled", "its reconstruction")
        for i in range(n):
            for j, key in enumerate(("target", "mask", "v1", "recon1", "v2", "recon2")):
                axes[i, j].imshow(np.rot90(z[key][i]), cmap="gray", vmin=0, vmax=1)
                axes[i, j].set_title(f"{titles[j]} ({seqs[int(z['t'][i])]})" if j == 0 else titles[j], fontsize=8)
            for j in range(6, cols):
                axes[i, j].axis("off")
        for j in range(cols):
            ax = axes[n, j]
            if j < s:
                ax.imshow(np.rot90(z["templates"][j]), cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"template {seqs[j]}", fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        out.append(_png(fig))
    return "\n".join(out)


# Evaluator name (its eval/<name>.json) -> section, in page order.
SECTIONS = {"ladder": ladder_section, "retrieval": retrieval, "rerank": rerank_section, "probes": probes_section, "zeroshot": zeroshot_section,
            "localisation": localisation_section, "segmentation": segmentation_section, "caption": caption_section,
            "multiparam": multiparam_section}


def build(workdir: str, out: str | None = None) -> str:
    out = out or layout.PipelineDir(workdir).report
    parts = [f"<h1>decipher_jax report: {html.escape(os.path.abspath(workdir))}</h1>",
             f'<p class="note">written {datetime.datetime.now().isoformat(timespec="seconds")}</p>']
    summary = layout.PipelineDir(workdir).summary
    if os.path.exists(summary):
        with open(summary) as f:
            parts.append("<h2>Summary</h2><pre>" + html.escape(f.read()) + "</pre>")
    parts.append(training_curves(workdir))
    for name, section in SECTIONS.items():
        skipped = _load_result(workdir, name)
        if isinstance(skipped, dict) and "skipped" in skipped:
            parts.append(f'<h2>{html.escape(name)}</h2><p class="note">skipped: {html.escape(skipped["skipped"])}</p>')
        else:
            parts.append(section(workdir))
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>decipher_jax report</title><style>{CSS}</style>" \
           f"</head><body>{''.join(p for p in parts if p)}</body></html>"
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, out)
    return out
