"""The ``decipher`` command: thin entry points over importable functions.

    decipher demo --workdir outputs/demo     # the main job, end to end, at tiny scale
    decipher pipeline --config experiments/configs/demo.py --workdir W [--config.a.b=v]
    decipher corpus --out data/embedded      # write the embedded default corpus + manifest.csv
    decipher prep --manifest M.csv --out D   # NIfTI + reports -> ArrayRecord records (TFDS)
    decipher prep --dicom DIR --reports R.csv --out D [--pseudonymise --salt S]   # DICOM in
    decipher prep --manifest M.csv --out D --runner beam [--beam-options "--runner=DataflowRunner ..."]
    decipher train --config F.py[:arg] --workdir W [--config.a.b=v]
    decipher eval --config experiments/configs/eval.py[:arg] --workdir W [--config.runs.align=R]
    decipher zeroshot --workdir W --split test --sentences "there is an acute infarct" ...
    decipher embed --run W --images a.nii.gz dicom_dir/ --out emb.npz [--sentences "..."]
    decipher export --run W/stage2 --out my_model   # a bundle: bundle.from_pretrained(my_model)
    decipher report --workdir W              # HTML page with the run's tables and figures
    decipher caption --workdir W --split test [--prior P --align A]   # generated reports and VQA, scored
    decipher ask --workdir W --series ID "is there a lesion?"         # one answer from a caption run
    decipher sweep --sweep experiments/sweeps/probes.py --workdir W

Subcommands import their dependencies lazily so that ``--help`` is instant and environment
variables (XLA_FLAGS, JAX_PLATFORMS) set by the caller take effect before jax starts; the
environment is set once, by :func:`decipher_jax.env.setup`, before any subcommand runs.
"""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args) -> int:
    from decipher_jax import demo

    return demo.run(args.workdir, devices=args.devices, seed=args.seed, full=args.full)


def _pipeline(args, extra) -> int:
    from decipher_jax import pipeline
    from decipher_jax.trainers import common

    return pipeline.run(common.load_config(pipeline.config_path(args.config), common.parse_overrides(extra)),
                        args.workdir)


def _corpus(args) -> int:
    from decipher_jax.data import corpus

    print(corpus.build(args.out, n_patients=args.patients, seed=args.seed, matrix=args.matrix, real=not args.no_real))
    return 0


def _prep(args) -> int:
    from data_prep import manifest, prep, volume
    from data_prep.dicom import is_dicom_source as dicom_source

    vcfg = volume.VolumeConfig(target_spacing=tuple(args.spacing), four_d=args.four_d,
                               clip_percentiles=tuple(args.clip), crop_foreground=args.crop_foreground)
    source = args.dicom or args.manifest
    if bool(args.dicom) == bool(args.manifest):
        print("prep: error: give one of --manifest M.csv or --dicom DIR", file=sys.stderr)
        return 2
    salt = args.salt or os.environ.get("DECIPHER_SALT", "")
    if args.pseudonymise and not salt:
        print("prep: error: --pseudonymise needs --salt S (or DECIPHER_SALT): a secret kept apart from the data",
              file=sys.stderr)
        return 2
    if (args.pseudonymise or args.reports) and not dicom_source(source):
        print("prep: error: --pseudonymise and --reports apply to a DICOM source (--dicom DIR); a manifest's "
              "identifiers and reports are its own columns", file=sys.stderr)
        return 2
    if args.dicom and not dicom_source(args.dicom):
        print(f"prep: error: {args.dicom}: --dicom takes a folder or a DICOMDIR file", file=sys.stderr)
        return 2
    if args.beam_options and args.runner != "beam":
        print("prep: error: --beam-options needs --runner beam", file=sys.stderr)
        return 2
    if args.studies and args.runner == "beam":
        print("prep: error: --studies is done by the local runner (the study grids are read from the headers on "
              "this machine); prepare without --runner beam", file=sys.stderr)
        return 2
    try:
        cfg = prep.PrepConfig(volume=vcfg, split_fractions=tuple(args.splits), seed=args.seed, workers=args.workers,
                              compression=args.compression, studies=args.studies,
                              dicom=prep.DicomOptions(reports=args.reports or "", pseudonymise=args.pseudonymise,
                                                      salt=salt))
    except ValueError as e:  # e.g. --studies with --crop-foreground
        print(f"prep: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.runner == "beam":
            from data_prep import beam_prep

            res = beam_prep.run(source, args.out, cfg, beam_options=args.beam_options, progress=not args.quiet)
        else:
            res = prep.run(source, args.out, cfg, progress=not args.quiet)
    except (manifest.ManifestError, volume.BadInput) as e:  # the source as a whole is unusable (a bad DICOMDIR)
        print(f"prep: error: {e}", file=sys.stderr)
        return 2
    c = res.counts
    print(f"prep: {res.processed} processed, {res.reused} reused, {len(res.errors)} failed -> {res.tfds_dir}")
    if res.skipped:
        print(f"  {len(res.skipped)} DICOM object(s) are not volumes and were skipped; see {args.out}/errors.jsonl")
    print("  " + ", ".join(f"{s}: {v['series']} series / {v['patients']} patients" for s, v in c.items()))
    if res.errors:
        print(f"  {len(res.errors)} bad input(s) skipped; see {args.out}/errors.jsonl:")
        for e in res.errors[:10]:
            print(f"    {e['reason']}")
        return 1
    return 0


def _train(args, extra) -> int:
    from decipher_jax.trainers import common

    from decipher_jax import runspec
    from decipher_jax.trainers import module_for

    cfg = common.load_config(args.config, common.parse_overrides(extra))
    try:
        module = module_for(args.config, cfg)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    try:
        module.train(cfg, args.workdir)
    except common.Preempted as e:  # a checkpoint was written; 143 = 128 + SIGTERM, as schedulers expect
        print(f"decipher train: {e}", file=sys.stderr)
        return 143
    except (common.WorkdirLocked, common.Diverged, runspec.ConfigMismatch) as e:
        print(f"decipher train: error: {e}", file=sys.stderr)
        return 2
    return 0

def _eval(args, extra) -> int:
    from decipher_jax import layout, runs
    from decipher_jax import sharding as sh
    from decipher_jax.eval import evaluators
    from decipher_jax.trainers.common import load_config, parse_overrides

    cfg = load_config(args.config, parse_overrides(extra))
    run_dirs = {}
    for role, path in cfg.runs.items():
        path = path.format(workdir=args.workdir) if path else ""
        if path and layout.RunDir(path).exists():
            run_dirs[role] = path
        elif path:
            print(f"eval: no run at {path} (runs.{role}); left out")
    if not run_dirs:
        print("eval: error: no run to evaluate (set --config.runs.align=WORKDIR and/or --config.runs.ssl_teacher)",
              file=sys.stderr)
        return 2
    # The data: the config's, else the first run's (align, the stage-1 teacher, then any other).
    first = next(run_dirs[r] for r in ("align", "ssl_teacher", *run_dirs) if r in run_dirs)
    data = cfg.data or runs.read_spec(first)["config"]["data"]["dir"]
    ctx = evaluators.Context(out=args.workdir, data=data, runs=run_dirs, random=cfg.random,
                             mesh=sh.make_mesh(dict(cfg.mesh)))
    results = evaluators.run_all(evaluators.from_config(cfg.evals, cfg.get("order")), ctx)
    print(f"eval: {len(results)} evaluator(s) of {', '.join(f'{k} {v}' for k, v in run_dirs.items())} on {data} -> "
          f"{ctx.eval_dir}/{{{','.join(results)}}}.json")
    return 0


def _zeroshot(args) -> int:
    from decipher_jax import zeroshot

    zs = zeroshot.ZeroShot.from_workdir(args.workdir)
    data = args.data or zs.spec["config"]["data"]["dir"]
    e = zs.embed_split(data, args.split)
    cos = zs.score(sentences=args.sentences, image_embeddings=e["image"])
    cols = {f"cos[{s}]": cos[:, i] for i, s in enumerate(args.sentences)}
    if args.negatives:
        cols["p_positive"] = zs.contrast(positive=args.sentences, negative=args.negatives, image_embeddings=e["image"])
    score = cols.get("p_positive", cos.mean(1))
    meta = [k for k in ("series_id", "study_id", "body_region", "sequence", "findings") if k in e]
    out = args.out or os.path.join(args.workdir, f"zeroshot_{args.split}.csv")
    import csv

    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(meta + list(cols))
        for i in range(len(e["image"])):
            w.writerow([e[k][i] for k in meta] + [f"{cols[c][i]:.5f}" for c in cols])
    print(f"zeroshot: {len(e['image'])} series of split {args.split!r} scored against {len(args.sentences)} "
          f"sentence(s){' vs ' + str(len(args.negatives)) + ' negative(s)' if args.negatives else ''} -> {out}")
    order = sorted(range(len(score)), key=lambda i: -score[i])
    for i in order[: args.top]:
        print(f"  {score[i]:.3f}  " + "  ".join(f"{k}={e[k][i]}" for k in meta if k != "study_id"))
    if args.label and "findings" in e:
        from sklearn.metrics import roc_auc_score

        y = [args.label in str(f).split(";") for f in e["findings"]]
        if 0 < sum(y) < len(y):
            print(f"  AUROC for finding {args.label!r}: {roc_auc_score(y, score):.3f} ({sum(y)} positive of {len(y)})")
        else:
            print(f"  AUROC for finding {args.label!r}: undefined ({sum(y)} positive of {len(y)})")
    return 0


def _embed(args) -> int:
    from decipher_jax import inference

    if not args.out.endswith((".npz", ".parquet")):
        print(f"embed: error: {args.out}: the output must end in .npz or .parquet", file=sys.stderr)
        return 2
    if args.tokens and args.window:
        print("embed: error: patch tokens are per window; ask for --tokens or for --window, not both", file=sys.stderr)
        return 2
    try:
        emb = inference.Embedder.from_run(args.run, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as e:  # bundle.BundleError is a ValueError
        print(f"embed: error: {e}", file=sys.stderr)
        return 2
    out = emb.embed(args.images, sentences=args.sentences or (), tokens=args.tokens,
                    window=tuple(args.window) if args.window else None, overlap=args.overlap, progress=not args.quiet)
    inference.save(out, args.out)
    n = len(out["embedding"])
    print(f"embed: {n} series -> {args.out}" + (f" (with scores for {len(args.sentences)} sentence(s))"
                                                 if args.sentences else ""))
    for s in out["skipped"]:
        print(f"  skipped {s['file']}: {s['reason']}")
    if out["skipped"]:
        print(f"  {len(out['skipped'])} skipped; listed in {args.out}.skipped.jsonl")
    return 0 if n else 1


def _export(args) -> int:
    from decipher_jax import bundle

    try:
        path = bundle.export(args.run, args.out, step=args.step, monai=args.monai, hf=args.hf)
    except (FileNotFoundError, ValueError) as e:  # no run there, or --out is something else
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"export: {args.run} -> {path} (load with decipher_jax.bundle.from_pretrained or decipher embed --run)")
    return 0


def _report(args) -> int:
    from decipher_jax import report

    print(f"wrote {report.build(args.workdir, args.out)}")
    return 0


def _sweep(args) -> int:
    from decipher_jax import layout
    from decipher_jax.eval import sweep

    rows = sweep.run(sweep.load_sweep(args.sweep), args.workdir)
    print(f"sweep: {len(rows)} results -> {os.path.join(layout.PipelineDir(args.workdir).eval, 'sweep.csv')}")
    return 0


def _caption_data(args) -> str:
    from decipher_jax import runs

    return args.data or runs.read_spec(args.workdir)["config"]["data"]["dir"]


def _caption(args) -> int:
    import json

    from decipher_jax import captioning

    try:
        res = captioning.evaluate(args.workdir, _caption_data(args), args.split, prior=args.prior or "",
                                  align=args.align or "", method=args.method, num_beams=args.beams,
                                  max_series=args.max_series)
    except (FileNotFoundError, ValueError) as e:
        print(f"caption: error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.workdir, f"caption_{args.split}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=float)
    print("\n".join(captioning.summary(res)))
    for e in res["examples"][: args.show]:
        print(f"\n{e['series_id']} (findings: {', '.join(e['findings']) or 'none'})\n  generated: {e['generated']}"
              f"\n  reference: {e['reference']}")
    print(f"\nwrote {out}")
    return 0


def _ask(args) -> int:
    from decipher_jax import captioning
    from decipher_jax.data import pipelines as P
    from decipher_jax.data import transforms as T

    data = _caption_data(args)
    for split in ("test", "val", "train"):
        try:
            src = P.data_source(data, split)
        except (KeyError, ValueError, FileNotFoundError):
            continue
        for i in range(len(src)):
            ex = src[i]
            sid = ex["series_id"].decode() if isinstance(ex["series_id"], bytes) else str(ex["series_id"])
            if sid == args.series:
                cm = captioning.CaptionModel.from_workdir(args.workdir)
                volume = T.Decode().map(ex)["image"]
                print(cm.generate([volume], [" ".join(args.question) if args.question else ""])[0])
                return 0
    print(f"ask: error: no series {args.series!r} in {data}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="decipher", description="Decipher-MR in JAX: 3D MRI foundation models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the whole pipeline at tiny scale on the embedded data")
    p.add_argument("--workdir", default="outputs/demo")
    p.add_argument("--seed", type=int, default=0, help="the embedded corpus's generator seed")
    p.add_argument("--devices", type=int, default=None,
                   help="simulated CPU devices when running on the CPU (default: the demo config's, 2)")
    p.add_argument("--full", action="store_true",
                   help="also the multi-parametric MRI stages (about 16 more minutes on 2 cores)")
    p.set_defaults(fn=_demo)

    p = sub.add_parser("pipeline", help="run a pipeline config (data -> stage 1 -> stage 2 -> evals -> report)")
    p.add_argument("--config", required=True, help="e.g. experiments/configs/demo.py (the demo's)")
    p.add_argument("--workdir", required=True)
    p.set_defaults(fn=_pipeline, takes_extra=True)

    p = sub.add_parser("corpus", help="write the embedded default corpus (synthetic + packaged real volumes)")
    p.add_argument("--out", required=True)
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--matrix", type=int, default=40, help="in-plane voxels of synthetic series")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-real", action="store_true", help="skip the nilearn / mricron template volumes")
    p.set_defaults(fn=_corpus)

    p = sub.add_parser("prep", help="NIfTI series + reports -> ArrayRecord records, splits and a dataset card")
    p.add_argument("--manifest", help="CSV or JSONL, one row per series (or a DICOM folder: same as --dicom)")
    p.add_argument("--dicom", help="a DICOM folder tree or a DICOMDIR, instead of a manifest")
    p.add_argument("--reports", help="with --dicom: a CSV of reports (study_instance_uid or accession_number, "
                                     "report or report_file, optional findings)")
    p.add_argument("--pseudonymise", action="store_true",
                   help="with --dicom: replace patient, study and series identifiers by salted hashes")
    p.add_argument("--salt", help="the secret for --pseudonymise (or the DECIPHER_SALT environment variable)")
    p.add_argument("--out", required=True)
    p.add_argument("--spacing", type=float, nargs=3, default=(2.0, 2.0, 2.0), metavar=("X", "Y", "Z"))
    p.add_argument("--clip", type=float, nargs=2, default=(0.5, 99.5), metavar=("LO", "HI"))
    p.add_argument("--four-d", default="first", choices=["first", "mean", "error"])
    p.add_argument("--crop-foreground", action="store_true")
    p.add_argument("--studies", default="", choices=["check", "resample"],
                   help="the series of a study (multi-parametric MRI) on one voxel grid: check (a series off its "
                        "study's grid is an error) or resample (every series onto the grid of its study's first "
                        "series); default: each series on its own grid")
    p.add_argument("--splits", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compression", default="none", choices=["none", "zlib"],
                   help="volume encoding in the records: none (fast reads) or zlib (half the size)")
    p.add_argument("--workers", type=int, default=0, help="0: one per core (the local pool, or the DirectRunner's)")
    p.add_argument("--runner", default="local", choices=["local", "beam"],
                   help="local: a process pool on this machine; beam: Apache Beam pipelines (TFDS's engine)")
    p.add_argument("--beam-options", default="",
                   help='with --runner beam: pipeline options, e.g. "--runner=DataflowRunner --project=P '
                        '--region=R --temp_location=gs://B/tmp --setup_file=./setup.py" (default: the DirectRunner)')
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_prep)

    p = sub.add_parser("train", help="train a stage from a config file: --config path.py[:arg] [--config.a.b=v]")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.set_defaults(fn=_train, takes_extra=True)

    p = sub.add_parser("eval", help="evaluate trained runs: --config experiments/configs/eval.py[:args] [--config.a.b=v]")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True, help="results go to WORKDIR/eval/<evaluator>.json")
    p.set_defaults(fn=_eval, takes_extra=True)

    p = sub.add_parser("zeroshot", help="score the series of a prepared split against query sentences")
    p.add_argument("--workdir", required=True, help="a stage-2 (clip_align) workdir")
    p.add_argument("--split", default="test")
    p.add_argument("--data", help="prepared data dir (default: the run's data.dir)")
    p.add_argument("--sentences", nargs="+", required=True, help="query sentences (phrasings of one finding)")
    p.add_argument("--negatives", nargs="*", default=(), help="negated phrasings: report P(positive) vs these")
    p.add_argument("--label", help="a finding name in the records: also report the zero-shot AUROC")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--out", help="CSV path (default: WORKDIR/zeroshot_SPLIT.csv)")
    p.set_defaults(fn=_zeroshot)

    p = sub.add_parser("embed", help="embeddings (and zero-shot scores) of new NIfTI / DICOM files with a trained run")
    p.add_argument("--run", required=True, help="a stage-2 workdir, a pipeline workdir or an exported bundle")
    p.add_argument("--images", nargs="+", required=True, help="NIfTI files, DICOM files or folders, DICOMDIRs")
    p.add_argument("--out", required=True, help="emb.npz or emb.parquet (skipped files: <out>.skipped.jsonl)")
    p.add_argument("--sentences", nargs="*", help="query sentences to score every series against")
    p.add_argument("--tokens", action="store_true", help="also write the per-patch embeddings")
    p.add_argument("--window", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="sliding windows of this size at the prepared spacing instead of a whole-volume resize")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_embed)

    p = sub.add_parser("export", help="write a stage-2 run as a shareable bundle (safetensors, config, tokenizer, card)")
    p.add_argument("--run", required=True, help="a stage-2 workdir")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, help="a checkpoint step (default: the latest)")
    p.add_argument("--monai", action="store_true", help="also write the image tower as a MONAI ViT state dict")
    p.add_argument("--hf", action="store_true", help="also write the text tower as a Hugging Face BERT folder")
    p.set_defaults(fn=_export)

    p = sub.add_parser("sweep", help="run an evaluation sweep file (feature sets x tasks x heads x grids)")
    p.add_argument("--sweep", required=True, help="a .py file with get_sweep() (see experiments/sweeps/)")
    p.add_argument("--workdir", required=True, help="results go to WORKDIR/eval/sweep.{csv,json}")
    p.set_defaults(fn=_sweep)

    p = sub.add_parser("report", help="write an HTML report (tables and figures) of a pipeline workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", help="default: WORKDIR/report.html")
    p.set_defaults(fn=_report)

    p = sub.add_parser("caption", help="generate reports and answer VQA questions on a prepared split, scored")
    p.add_argument("--workdir", required=True, help="a caption run (experiments/configs/caption.py)")
    p.add_argument("--split", default="test")
    p.add_argument("--data", help="prepared data dir (default: the run's data.dir)")
    p.add_argument("--prior", help="a caption run without the image (caption.py:prior): the language-prior baseline")
    p.add_argument("--align", help="the stage-2 run: the retrieval-only baseline")
    p.add_argument("--method", default="greedy", choices=["greedy", "beam"])
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--max-series", type=int)
    p.add_argument("--show", type=int, default=3, help="generated reports to print beside their references")
    p.add_argument("--out", help="JSON path (default: WORKDIR/caption_SPLIT.json)")
    p.set_defaults(fn=_caption)

    p = sub.add_parser("ask", help="a caption run's answer about one series of the prepared data")
    p.add_argument("--workdir", required=True, help="a caption run")
    p.add_argument("--series", required=True, help="a series id of the prepared data")
    p.add_argument("--data", help="prepared data dir (default: the run's data.dir)")
    p.add_argument("question", nargs="*", help='e.g. "is there a lesion?" (none: the report)')
    p.set_defaults(fn=_ask)
    args, extra = parser.parse_known_args(argv)
    from decipher_jax import env

    env.setup()  # offline, absl flags parsed (grain); never imports jax (the demo adds its devices)
    if getattr(args, "takes_extra", False):
        return int(args.fn(args, extra) or 0)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
