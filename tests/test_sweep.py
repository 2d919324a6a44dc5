"""The sweep runner: one process, feature sets x pools x tasks x heads, CSV + JSON results."""

import csv
import json
import os

import numpy as np

from decipher_jax import cli


def _write_features(d, rng, n, shift):
    os.makedirs(d)
    region = rng.choice(["brain", "knee", "spine"], size=n)
    seq = rng.choice(["T1", "T2"], size=n)
    centre = {"brain": 0, "knee": 1, "spine": 2}
    mean = rng.normal(size=(n, 16)).astype(np.float32)
    mean[np.arange(n), [centre[r] for r in region]] += shift  # one direction per region
    infarct = (region == "brain") & (rng.random(n) < 0.5)  # a finding of brain series only
    mean[infarct, 5] += shift
    findings = np.where(infarct, "infarct", "")
    age = rng.uniform(20, 80, size=n).astype(np.float32)
    mean[:, 7] += shift * (age - 50) / 15  # age along one direction
    np.savez(os.path.join(d, "part-00000.npz"), mean=mean, cls=rng.normal(size=(n, 16)).astype(np.float32),
             body_region=region, sequence=seq, findings=findings, age=age,
             series_id=np.array([f"s{i}" for i in range(n)]))
    return region


def test_sweep_runs_a_grid_from_a_file(tmp_path, rng):
    regions = {}
    for name, shift in (("good", 4.0), ("random", 0.0)):
        # Only "good" has a val split: its penalties are chosen there, "random"'s by CV.
        for split, n in (("train", 120), ("test", 60)) + ((("val", 40),) if name == "good" else ()):
            regions[name, split] = _write_features(str(tmp_path / name / split), rng, n, shift)
    sweep_file = tmp_path / "s.py"
    sweep_file.write_text(
        "def get_sweep():\n"
        f"    return {{'features': {{'good': {str(tmp_path / 'good')!r}, 'random': {str(tmp_path / 'random')!r}}},\n"
        "            'tasks': ['body_region', 'sequence', 'findings', 'age'], 'pool': ['mean', 'cls'],\n"
        "            'heads': {'logistic': {'C': [0.01, 1.0], 'fractions': [0.2, 1.0], 'seeds': [0, 1], 'iters': 30},\n"
        "                      'knn': {'k': [5, 10]}, 'ridge': {'lambda': [1.0, 100.0], 'fractions': [0.2, 1.0],\n"
        "                                                   'seeds': [0, 1]}}}\n")
    out = tmp_path / "w"
    assert cli.main(["sweep", "--sweep", str(sweep_file), "--workdir", str(out)]) == 0
    rows = json.loads((out / "eval" / "sweep.json").read_text())
    # 2 feature sets x 2 pools x 3 tasks (the one finding) x (2 fractions x 2 seeds logistic + 2 kNN)
    # ... plus age: 2 feature sets x 2 pools x (2 fractions x 2 seeds) ridge probes
    assert len(rows) == 2 * 2 * 3 * (4 + 2) + 2 * 2 * 4
    age = {(r["features"], r["pool"]): r for r in rows if r["task"] == "age" and r["fraction"] == 1.0 and r["seed"] == 0}
    assert age["good", "mean"]["head"] == "ridge" and age["good", "mean"]["r2"] > 0.5
    assert age["good", "mean"]["mae"] < 0.6 * age["random", "mean"]["mae"]
    with open(out / "eval" / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    fitted = [r for r in rows if r["head"] in ("logistic", "ridge")]
    assert {r["selection"] for r in fitted if r["features"] == "good"} == {"val"}
    assert {r["selection"] for r in fitted if r["features"] == "random"} == {"3-fold CV"}
    pick = {(r["features"], r["pool"], r["task"], r["head"], r["fraction"], r["seed"]): r for r in rows}
    # The informative features separate regions; the same task on noise is at chance.
    assert pick[("good", "mean", "body_region", "logistic", 1.0, 0)]["balanced_accuracy"] > 0.9
    assert pick[("random", "mean", "body_region", "logistic", 1.0, 0)]["balanced_accuracy"] < 0.6
    assert pick[("good", "mean", "body_region", "knn k=10", 1.0, 0)]["balanced_accuracy"] > 0.9
    # The finding probe is fitted on brain series only and reads its direction.
    inf = pick[("good", "mean", "finding: infarct", "logistic", 1.0, 0)]
    assert inf["n_train"] == np.sum(regions["good", "train"] == "brain") and inf["auroc"] > 0.9
    assert pick[("random", "mean", "finding: infarct", "logistic", 1.0, 0)]["auroc"] < 0.75


def test_sweep_is_an_evaluator(tmp_path, rng):
    """The same grid through the evaluator registry (``decipher eval``'s runner): eval/sweep.json."""
    from decipher_jax.eval import evaluators

    for split, n in (("train", 60), ("test", 30)):
        _write_features(str(tmp_path / "f" / split), rng, n, 4.0)
    grid = {"features": {"f": str(tmp_path / "f")}, "tasks": ["body_region"], "pool": ["mean"],
            "heads": {"logistic": {"C": [1.0], "fractions": [1.0], "seeds": [0, 1], "iters": 30}}}
    ctx = evaluators.Context(out=str(tmp_path / "w"), data=str(tmp_path / "nodata"))
    said = []
    res = evaluators.run_all(evaluators.from_config({"sweep": {"grid": grid}}), ctx, say=said.append)
    rows = json.loads((tmp_path / "w" / "eval" / "sweep.json").read_text())
    assert rows == res["sweep"] and len(rows) == 2 and all(r["auroc"] > 0.9 for r in rows)
    assert said[0].startswith("probe sweep: 2 results over 1")
