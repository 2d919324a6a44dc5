"""Probe sweep over the demo's encoders: logistic (C by CV x label fractions x seeds), kNN, and
ridge for age (the penalty by CV).

    decipher sweep --sweep experiments/sweeps/probes.py --workdir outputs/demo

Edit the grids here; every (encoder, pool, task) cell is one batched fit of its whole grid.
"""


def get_sweep():
    return {
        "pipeline": "outputs/demo",  # stage-2, stage-1 and random-init image encoders of this run
        "data": "outputs/demo/data/prep",
        # Or precomputed features: {"name": "dir with train/ and test/ chunks"} (eval.features.extract)
        "features": {},
        "tasks": ["body_region", "sequence", "sex", "age", "findings"],  # findings: one probe per finding
        "pool": ["mean", "cls"],
        "heads": {
            "logistic": {"C": [0.001, 0.01, 0.1, 1.0, 10.0], "fractions": [0.1, 0.3, 1.0], "seeds": [0, 1, 2],
                         "folds": 3, "iters": 100},
            "knn": {"k": [5, 10, 20], "temperature": 0.07},
            "ridge": {"lambda": [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0, 1e5, 1e6], "fractions": [0.1, 0.3, 1.0],
                      "seeds": [0, 1, 2]},  # regression tasks (age): MAE
        },
    }
