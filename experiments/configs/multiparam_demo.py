"""Multi-parametric MRI at the demo's scale (issue 22): ``decipher pipeline --config
experiments/configs/multiparam_demo.py --workdir outputs/mp`` (the demo runs these stages too with
``decipher demo --full``).

Stages: the embedded multi-sequence brain corpus (T1, T2, FLAIR, DWI, half the studies with one or
two missing) prepared onto one grid per study; the multi-sequence encoder pretrained with
BrainMVP's objectives (``multiparam.py:tiny``); the single-sequence reference (``tiny,single``:
each view seen alone, BrainMVP's one-channel encoder); the findings evaluated frozen by the
sequences present (the ``multiparam`` evaluator) against a random-init floor; the report.
"""

import ml_collections as mlc

STAGES = {
    # 60/10/30 by patient as the demo: about 48 test studies, half of them complete.
    "multiparam_data": {"kind": "multiparam_data", "patients": 160, "matrix": 40, "spacing": 4.0, "p_complete": 0.5,
                        "splits": (0.6, 0.1, 0.3)},
    "multiparam": {"kind": "train", "config": "multiparam.py:tiny", "overrides": (("data.dir", "{multiparam}"),)},
    "multiparam_single": {"kind": "train", "config": "multiparam.py:tiny,single",
                          "overrides": (("data.dir", "{multiparam}"),)},
    "multiparam_eval": {"kind": "eval", "config": "eval.py:multiparam"},
}
ORDER = ("multiparam_data", "multiparam", "multiparam_single", "multiparam_eval")


def get_config(arg=None):
    c = mlc.ConfigDict()
    c.title = "decipher_jax multi-parametric MRI (demo scale)"
    c.seed = 0
    c.devices = 2
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.stages = dict(STAGES, report={"kind": "report"})
    c.order = ORDER + ("report",)
    return c
