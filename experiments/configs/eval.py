"""Evaluation of trained runs: ``decipher eval --config experiments/configs/eval.py[:args] --workdir W``.

Results go to ``W/eval/<name>.json`` (one file per evaluator; figures' arrays in ``W/eval/<name>/``),
and ``decipher report --workdir W`` renders them. The runs are workdirs (``{workdir}`` is
replaced by ``--workdir``): the default reads a pipeline workdir's ``stage2`` (the align run:
its image tower, zero-shot and retrieval) and ``stage1_vision`` (its EMA teacher), as the demo
writes them; point them elsewhere for any run, e.g. ``--config.runs.align=outputs/my_clip``
``--config.runs.ssl_teacher=""``. ``data`` "" reads the align run's prepared data.

Arguments (comma-separated): ``tiny`` (one probe seed, all labels; short segmentation heads:
for tests), or names of evaluators to keep (``probes,zeroshot``); by default all of them with the
demo's settings. ``ladder`` reads the probes' test scores (so it runs after ``probes``) and the fine-tuning runs
under ``<workdir>/ladder`` (the demo's ``ladder`` stage). ``sweep`` (the probe sweep of ``experiments/sweeps/probes.py`` over the runs'
encoders) runs only when named.
"""

import ml_collections as mlc

ALL = ("retrieval", "zeroshot", "localisation", "rerank", "probes", "ladder", "segmentation")
# Only when named: a probe sweep over the runs' encoders (evals.sweep.sweep: its file); the
# multi-parametric findings by sequences present (runs.multiparam, runs.multiparam_single).
OPTIONAL = ("sweep", "multiparam")


def get_config(arg=None):
    opts = [o for o in (arg or "").split(",") if o]
    tiny = "tiny" in opts
    keep = [o for o in opts if o not in ("tiny", "demo")] or list(ALL)
    unknown = set(keep) - set(ALL) - set(OPTIONAL)
    if unknown:
        raise ValueError(f"unknown evaluators {sorted(unknown)}; known: {list(ALL + OPTIONAL)}")
    c = mlc.ConfigDict()
    c.runs = {"align": "{workdir}/stage2", "ssl_teacher": "{workdir}/stage1_vision",
              "multiparam": "{workdir}/multiparam", "multiparam_single": "{workdir}/multiparam_single"}
    c.random = True  # a random-init encoder of the same architecture: every score's floor
    c.data = ""
    c.mesh = {"data": -1}
    evals = {
        "retrieval": {"splits": ("test",)},
        "zeroshot": {"split": "test"},
        "localisation": {"split": "test"},
        "rerank": {"k": 5, "select": "val", "split": "test"},
        "probes": {"fractions": (1.0,) if tiny else (0.1, 0.3, 1.0), "seeds": (0,) if tiny else (0, 1, 2)},
        # The ladder: the probes' rows beside the fine-tuning runs under {workdir}/ladder (the
        # pipeline's ladder stage trains them).
        "ladder": {},
        # Pretrained (stage 2) against random init; the heads' full grid is the library's default.
        # lesion_*: the lesion heads' own schedule and head kinds (0 / empty: as brain tissue's);
        # the ladder's config trains them longer.
        "segmentation": {"encoders": ("align", "random"), "steps": 10 if tiny else 150, "batch": 4,
                         "lrs": (1e-2,) if tiny else (1e-2, 3e-2), "seeds": (0,),
                         "lesion_steps": 0, "lesion_batch": 0, "lesion_lrs": (), "lesion_kinds": ()},
        "sweep": {"sweep": "experiments/sweeps/probes.py"},
        "multiparam": {"copies": 4, "trained_steps": 300, "seg_steps": 300, "draws": 1000},
    }
    c.evals = {k: evals[k] for k in ALL + OPTIONAL if k in keep}
    c.order = tuple(k for k in ALL + OPTIONAL if k in keep)  # a ConfigDict sorts its keys: the run order
    return c
