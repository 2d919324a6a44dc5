"""Report generation and VQA on the embedded corpus (issue 23): the image-conditioned decoder on
the frozen stage-2 tower, beside the retrieval-only and language-prior baselines, on held-out
patients.

    .venv/bin/python benchmarks/captioning.py --workdir outputs/demo [--steps 1500] [--method greedy]

Reads a pipeline workdir that has run the demo's stages up to stage 2 (``data/prep``,
``stage2``), trains ``caption.py:tiny`` (image, with the memory of normal studies' patches;
``--model-override model.captioner.anomaly_bank=0`` leaves it out) and ``caption.py:tiny,prior`` (no image) into
``<workdir>/caption`` and ``<workdir>/caption_prior`` (kept; ``--rerun`` retrains), evaluates
them on the test split with :func:`decipher_jax.captioning.evaluate` and prints one table, with
each stage's wall-clock time. The result JSON goes to ``<workdir>/eval/caption.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="outputs/demo")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--method", default="greedy", choices=("greedy", "beam"))
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--max-series", type=int, default=None)
    ap.add_argument("--rerun", action="store_true")
    ap.add_argument("--rag", action="store_true", help="also train and score caption.py:tiny,rag (retrieval-augmented)")
    ap.add_argument("--override", action="append", default=[], help="a.b=value for both caption configs")
    ap.add_argument("--model-dir", default="caption", help="the image-conditioned run's folder in the workdir")
    ap.add_argument("--model-override", action="append", default=[], help="a.b=value for the image-conditioned run alone")
    ap.add_argument("--also", action="append", default=[],
                    help="NAME=FOLDER: a finished caption run in the workdir scored beside the others (same test rows)")
    args = ap.parse_args()
    if args.model_override and args.model_dir == "caption":
        ap.error("--model-override needs its own --model-dir (a finished 'caption' run would be reused as it is)")
    also = dict(a.split("=", 1) for a in args.also)
    if set(also) & {"model", "rag", "retrieval", "prior"}:
        ap.error("--also: NAME must differ from model, rag, retrieval and prior")

    from decipher_jax import env

    env.setup(devices=args.devices, platform="cpu")
    from benchmarks.common import machine, table
    from decipher_jax import captioning
    from decipher_jax.eval import textgen
    from decipher_jax.trainers import caption, common

    w = os.path.abspath(args.workdir)
    data, align = os.path.join(w, "data", "prep"), os.path.join(w, "stage2")
    times = {}
    runs = {"model": (os.path.join(w, args.model_dir), "tiny"), "prior": (os.path.join(w, "caption_prior"), "tiny,prior")}
    if args.rag:
        runs["rag"] = (os.path.join(w, "caption_rag"), "tiny,rag")
    for name, (out, arg) in runs.items():
        if args.rerun:
            shutil.rmtree(out, ignore_errors=True)
        over = {"data.dir": data, "steps": args.steps, "init.align": "" if name == "prior" else align}
        over.update(dict(o.split("=", 1) for o in args.override))
        if name == "model":
            over.update(dict(o.split("=", 1) for o in args.model_override))
        cfg = common.load_config(f"experiments/configs/caption.py:{arg}", over)
        t0 = time.perf_counter()
        m = caption.train(cfg, out)
        times[f"train {name}"] = time.perf_counter() - t0
        print(caption.summary(cfg, m, times[f"train {name}"]), flush=True)
    t0 = time.perf_counter()
    res = captioning.evaluate(runs["model"][0], data, "test", prior=runs["prior"][0], align=align, method=args.method,
                              max_series=args.max_series,
                              others=({"rag": runs["rag"][0]} if args.rag else {})
                              | {k: os.path.join(w, v) for k, v in also.items()})
    times["evaluate"] = time.perf_counter() - t0
    os.makedirs(os.path.join(w, "eval"), exist_ok=True)
    with open(os.path.join(w, "eval", "caption.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    print("\n".join(captioning.summary(res)))

    kinds = [k for k in textgen.QUESTIONS if k in res["systems"]["model"]["vqa"]]
    header = ["system", "BLEU-4", "ROUGE-L", "finding F1 (macro / micro)", "VQA image-dependent"] + kinds
    rows = []
    for name in ("model", "rag", *also, "retrieval", "prior"):
        s = res["systems"].get(name)
        if s is None:
            continue
        v = s["vqa"]
        rows.append([name, f"{s['bleu']['bleu4']:.1f}", f"{s['rougeL']:.3f}",
                     f"{s['clinical']['macro_f1']:.3f} / {s['clinical']['micro_f1']:.3f}",
                     f"{v['image_dependent']['accuracy']:.3f}"] + [f"{v[k]['accuracy']:.3f} ({v[k]['n']})" for k in kinds])
    print(f"\n{machine()}; {res['n_series']} test series, {res['n_questions']} questions; {args.steps} steps; "
          f"{args.method} decoding; BLEU signature {res['systems']['model']['bleu']['signature']}")
    print(table(header, rows))
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    per = res["systems"]["model"]["clinical"]["per_finding"]
    print(table(["finding", "positives", "model F1"] + [f"{n} F1" for n in ("retrieval", "prior") if n in res["systems"]],
                [[f, p["positives"], f"{p['f1']:.3f}"] + [f"{res['systems'][n]['clinical']['per_finding'].get(f, {}).get('f1', 0):.3f}"
                                                          for n in ("retrieval", "prior") if n in res["systems"]]
                 for f, p in per.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
