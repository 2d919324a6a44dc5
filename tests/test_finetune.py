"""Fine-tuning (decipher_jax.trainers.finetune): it learns a small task from scratch, the
frozen-backbone warm-up and layer-wise lr decay act on the parameters they name, a killed
run resumes with the same losses, and early stopping keeps the best val step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decipher_jax import sharding as sh
from decipher_jax.data import pipelines as P
from decipher_jax.trainers import common, finetune
from helpers import assert_run_spec

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")
SMALL_VIT = dict(dim=32, depth=2, heads=4, mlp_dim=64, patch_size=(8, 8, 8), img_size=(16, 16, 16), num_registers=0,
                 layerscale=None, pos_embed="learned")


def _cfg(data, arg="body_region,tiny", **kw):
    over = {"data.dir": data, "model.vit": SMALL_VIT, "data.batch_size": 8, "eval.batch_size": 8, "steps": 6,
            "optim.warmup_steps": 2, "async_checkpoints": False, "log_every": 1, "checkpoint_every": 2,
            "eval.every": 0}
    over.update(kw)
    return common.load_config(os.path.join(CONFIGS, "finetune.py") + ":" + arg, over)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def prepared_val(tmp_path_factory):
    """Train / val / test splits (early stopping needs a val split)."""
    from conftest import _prepare

    return _prepare(tmp_path_factory.mktemp("prepared_val"), n_patients=16, seed=7, splits=(0.5, 0.25, 0.25),
                    workers=2)


def test_task_specs_follow_the_training_split(prepared_heldout):
    meta = finetune.read_meta(P.data_source(prepared_heldout, "train"))
    f = finetune.task_spec("findings", meta)
    assert f.kind == "multilabel" and f.n_out == len(f.regions) >= 2
    row = {k: meta[k][0] for k in finetune.META}
    y, w = finetune.targets(f, row)
    assert y.shape == w.shape == (f.n_out,)
    for j, regions in enumerate(f.regions):  # a finding is scored only where it occurs in training
        assert w[j] == float(row["body_region"] in regions)
    b = finetune.task_spec("body_region", meta)
    assert b.kind == "multiclass" and set(b.names) == set(meta["body_region"]) - {""}
    a = finetune.task_spec("age", meta)
    y, w = finetune.targets(a, row)
    assert np.isclose(y * a.std + a.mean, row["age"]) and w == 1
    keep = finetune.label_indices(meta, 0.3, seed=0)
    chosen = set(meta["patient_id"][keep])
    assert all((p in chosen) == (i in set(keep)) for i, p in enumerate(meta["patient_id"]))  # whole patients
    assert 0 < len(chosen) < len(set(meta["patient_id"]))


def test_learns_body_region_from_scratch(prepared_heldout, tmp_path):
    w = str(tmp_path / "ft")
    m = finetune.train(_cfg(prepared_heldout, steps=60, **{"data.crop_scale": (1.0, 1.0)}), w)
    losses = _losses(w)
    assert np.mean([losses[s] for s in range(51, 61)]) < 0.8 * np.mean([losses[s] for s in range(1, 11)])
    with open(os.path.join(w, "test.json")) as f:
        res = json.load(f)
    # Chance is 0.5. (A 32-wide ViT on 8 tokens learns slowly: 0.70 here, where a logistic
    # regression on the raw voxels reaches 0.95 accuracy; the ladder's supervised rung starts here.)
    assert res["test"]["auroc"] > 0.6 and res["test"]["n"] >= 10, res
    assert m["test/score"] == res["test"]["score"]
    preds = np.load(os.path.join(w, "test_predictions.npz"))
    assert preds["scores"].shape[0] == len(preds["series_id"]) >= res["test"]["n"]
    np.testing.assert_allclose(preds["scores"].sum(1), 1.0, atol=1e-5)  # class probabilities per series
    assert_run_spec(w, "finetune", starts=1)
    from decipher_jax import runs  # the run reads back as a model: the same test predictions

    model, params, spec = runs.load(w)
    vol = np.asarray(next(iter(P.supervised(P.data_source(prepared_heldout, "test"),
                                            P.LoaderConfig(batch_size=8, shuffle=False, repeat=False), (16, 16, 16),
                                            finetune.Targets(finetune.TaskSpec(**spec["config"]["task_spec"])),
                                            train=False)))["image"])
    probs = np.asarray(jax.nn.softmax(model(params)(vol)))
    np.testing.assert_allclose(probs, preds["scores"][:8], rtol=1e-4, atol=1e-5)


def test_frozen_warmup_and_layer_decay_act_on_their_parameters(prepared_heldout):
    mesh = sh.make_mesh({"data": 8})
    batch = next(iter(P.supervised(P.data_source(prepared_heldout, "train"), P.LoaderConfig(batch_size=8, seed=0),
                                   (16, 16, 16), finetune.Targets(finetune.task_spec("body_region", finetune.read_meta(
                                       P.data_source(prepared_heldout, "train")))), train=False)))
    for freeze in (2, 0):
        # With the warm-up: the default weight decay and clipping (the backbone must not move at
        # all). Without: plain Adam, so that the first update is +-lr per element.
        plain = {} if freeze else {"optim.weight_decay": 0.0, "optim.clip_norm": 0.0}
        cfg = _cfg(prepared_heldout, **{"optim.freeze_backbone_steps": freeze, "optim.layer_decay": 0.5,
                                        "optim.warmup_steps": 1, **plain})
        s = finetune.setup(cfg, mesh)
        params = s.model.init(jax.random.key(0))
        state = {"step": jnp.zeros([], jnp.int32), "params": params, "opt": s.tx.init(params)}
        step = jax.jit(s.step)
        before = jax.device_get(params)
        with jax.set_mesh(mesh):
            g = P.to_global(batch, mesh)
            history = []
            for _ in range(3):
                state, _ = step(state, g)
                history.append(jax.device_get(state["params"]))
        if freeze:  # steps 1-2 (lr 0 then > 0): the backbone bitwise unchanged, the head learning
            for h in history[:2]:
                jax.tree.map(np.testing.assert_array_equal, h["backbone"], before["backbone"])
            assert not np.array_equal(history[1]["head_kernel"], before["head_kernel"])
            assert not np.array_equal(history[2]["backbone"]["patch_kernel"], before["backbone"]["patch_kernel"])
        else:
            # Step 0 has lr 0; step 1 repeats the same batch, so Adam's update is +-lr per element
            # times the layer's multiplier: decay^(depth + 1 - layer), embeddings at layer 0.
            d = jax.tree.map(lambda a, b: np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)),
                             history[1], before)
            head = np.median(d["head_kernel"])
            blocks = d["backbone"]["blocks"]["qkv_kernel"]  # (layers, ...)
            np.testing.assert_allclose([np.median(blocks[0]) / head, np.median(blocks[1]) / head], [0.25, 0.5],
                                       rtol=0.05)
            assert np.median(d["backbone"]["patch_kernel"]) / head == pytest.approx(0.125, rel=0.05)


def test_kill_and_resume_matches_uninterrupted_run(prepared_heldout, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    finetune.train(_cfg(prepared_heldout), full)
    finetune.train(_cfg(prepared_heldout, stop_after=3), killed)
    assert sorted(_losses(killed)) == [1, 2, 3]
    finetune.train(_cfg(prepared_heldout), killed)
    ref, resumed = _losses(full), _losses(killed)
    for s in (4, 5, 6):
        assert resumed[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-7), s


def test_early_stopping_keeps_the_best_val_step(prepared_val, tmp_path):
    w = str(tmp_path / "es")
    # lr 0: the val score never improves on the first evaluation, so patience 1 stops at the second.
    cfg = _cfg(prepared_val, "sex,tiny", steps=20, **{"optim.lr": 0.0, "eval.every": 2, "eval.patience": 1})
    m = finetune.train(cfg, w)
    with open(os.path.join(w, "best.json")) as f:
        best = json.load(f)
    assert best["step"] == 2 and best["stopped"] and sorted(map(int, best["evals"])) == [2, 4]
    assert max(_losses(w)) == 4 and m["best_step"] == 2
    finetune.train(cfg, w)  # a rerun of a stopped run trains no further: it scores the test split again
    assert max(_losses(w)) == 4
    with open(os.path.join(w, "test.json")) as f:
        assert json.load(f)["best_step"] == 2
    # With the backbone frozen for 6 steps, the evaluations at steps 4 and 6 use none of the
    # patience: the run stops at the first one after (step 8).
    w = str(tmp_path / "es_frozen")
    finetune.train(_cfg(prepared_val, "sex,tiny", steps=20, **{"optim.lr": 0.0, "eval.every": 2, "eval.patience": 1,
                                                               "optim.freeze_backbone_steps": 6}), w)
    with open(os.path.join(w, "best.json")) as f:
        best = json.load(f)
    assert best["step"] == 2 and best["stopped"] and sorted(map(int, best["evals"])) == [2, 4, 6, 8]


def test_pooled_readout_and_its_max_gradient():
    """The head's features are the named pools side by side; the max is each channel's max over
    the tokens, with jnp.max's gradient where the max is unique, and an old run's two-pool
    classifier still builds."""
    from flax import nnx

    from decipher_jax.models.classifier import Classifier, check_pool, pool_features, token_max
    from decipher_jax.models.vit3d import ViTConfig

    rng = np.random.default_rng(0)
    patch = jnp.asarray(rng.normal(size=(3, 7, 5)), jnp.float32)
    np.testing.assert_array_equal(token_max(patch), patch.max(1))
    g = jax.grad(lambda p: (token_max(p) * jnp.arange(1.0, 6.0)).sum())(patch)
    g_ref = jax.grad(lambda p: (p.max(1) * jnp.arange(1.0, 6.0)).sum())(patch)
    np.testing.assert_allclose(g, g_ref)
    out = {"cls": patch[:, 0], "patch": patch}
    f = pool_features(out, ("cls", "mean", "max"))
    np.testing.assert_allclose(f, np.concatenate([patch[:, 0], patch.mean(1), patch.max(1)], 1), rtol=1e-6)
    with pytest.raises(ValueError, match="distinct names"):
        check_pool(("mean", "mean"))
    vit = ViTConfig(**SMALL_VIT)
    for pool in (("cls", "mean"), ("cls", "mean", "max")):
        m = Classifier(vit, 3, rngs=nnx.Rngs(0), pool=pool)
        assert m.head_kernel.shape == (len(pool) * vit.dim, 3)
        assert m(jnp.zeros((2, 16, 16, 16, 1))).shape == (2, 3)


def test_anomaly_pool_matches_the_probes_reference():
    """The classifier's anomaly pool (jitted, in the training step) equals the probes' host
    implementation (``eval.features.with_anomaly`` over a ``NormalBank``) on the same tokens: each
    patch's nearest normal patch within one grid step among its group's bank series, the query's
    own patient left out, a group with one bank series using the whole bank, softmax(d / tau)
    weights; and its weights carry no gradient."""
    from flax import nnx

    from decipher_jax.eval import features
    from decipher_jax.models.classifier import Classifier
    from decipher_jax.models.vit3d import ViTConfig

    r = np.random.default_rng(0)
    vit = ViTConfig(**SMALL_VIT)  # 16^3 / 8^3: a 2x2x2 grid
    n, dim, k = 8, vit.dim, 7
    bank_groups = np.array(["brain/T1"] * 3 + ["knee/T2"] * 3 + ["spine/T1"])  # spine: one series, whole bank
    bank_pat = np.array(["p0", "p1", "p2", "p3", "p4", "p5", "p6"])
    bank_tok = r.normal(size=(k, n, dim)).astype(np.float32)
    bank = features.NormalBank.build(bank_tok, bank_groups, bank_pat, (2, 2, 2), patient_id=bank_pat)
    q_groups = np.array(["brain/T1", "knee/T2", "spine/T1", "liver/T1", "brain/T1"])
    q_pat = np.array(["p0", "q1", "q2", "q3", ""])  # the first is a bank patient: p0's series is left out
    tok = (bank_tok[[0, 3, 6, 1, 2]] + 0.3 * r.normal(size=(5, n, dim))).astype(np.float32)
    ref = features.with_anomaly({"patch": tok, "body_region": [g.split("/")[0] for g in q_groups],
                                 "sequence": [g.split("/")[1] for g in q_groups], "series_id": [f"s{i}" for i in range(5)],
                                 "patient_id": q_pat}, bank)["anomaly"]
    m = Classifier(vit, 2, rngs=nnx.Rngs(0), pool=("anomaly",), bank_size=k)
    gid = sorted(set(bank_groups))
    pid = sorted(set(bank_pat))
    m.bank_tokens[...] = jnp.asarray(bank_tok)
    m.bank_group[...] = jnp.asarray([gid.index(g) for g in bank_groups], jnp.float32)
    m.bank_patient[...] = jnp.asarray([pid.index(p) for p in bank_pat], jnp.float32)
    m.bank_tau[...] = jnp.float32(bank.tau)
    group = jnp.asarray([gid.index(g) if g in gid else -1 for g in q_groups], jnp.int32)
    patient = jnp.asarray([pid.index(p) if p in pid else -1 for p in q_pat], jnp.int32)
    got = jax.jit(lambda t: m.anomaly_pool(t, group, patient))(jnp.asarray(tok))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)
    # Leaving the patient out matters here: with p0's own series the first query reads otherwise.
    other = m.anomaly_pool(jnp.asarray(tok), group, patient.at[0].set(-1))
    assert not np.allclose(np.asarray(other)[0], ref[0], atol=1e-3)
    # d / tau only weighs the tokens: the gradient of the pool is the weights themselves.
    g = jax.grad(lambda t: m.anomaly_pool(t, group, patient)[:, 0].sum())(jnp.asarray(tok))
    d = bank.distances(tok, q_groups, [f"s{i}" for i in range(5)], q_pat)
    want = np.exp((d - d.max(1, keepdims=True)) / bank.tau)
    np.testing.assert_allclose(np.asarray(g[:, :, 0]), want / want.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    assert np.allclose(np.asarray(g[:, :, 1:]), 0.0)
    with pytest.raises(ValueError, match="at least 2 normal series"):
        Classifier(vit, 2, rngs=nnx.Rngs(0), pool=("mean", "anomaly"), bank_size=1)
    # A bank series without a patient id is never compared with itself: its key is the series.
    meta = {"body_region": np.array(["brain", "brain", "knee"]), "sequence": np.array(["T1", "T1", "T2"]),
            "patient_id": np.array(["", "p1", "p1"]), "series_id": np.array(["s0", "s1", "s2"])}
    b = finetune.BankIndex.of(meta, [0, 1, 2])
    assert b.patients == ("series:s0", "p1", "p1") and b.groups == ("brain/T1", "brain/T1", "knee/T2")
    row = lambda p, s, r="brain": {"body_region": r, "sequence": "T1", "patient_id": p, "series_id": s}  # noqa: E731
    arr = b.arrays()
    assert b.keys(row("", "s0"))["bank_patient"] == arr["bank_patient"][0]
    assert b.keys(row("p1", "s9"))["bank_patient"] == arr["bank_patient"][1] == arr["bank_patient"][2]
    assert b.keys(row("", "s9"))["bank_patient"] == -1 and b.keys(row("q", "s9", "liver"))["bank_group"] == -1
    assert b.keys(row("q", "s9"))["bank_group"] == arr["bank_group"][0] != arr["bank_group"][2]


def test_fine_tuning_on_the_anomaly_pool(prepared_heldout, tmp_path):
    """A run whose head reads the anomaly pool: the bank holds the initial encoder's tokens of the
    training split's normal series and never moves while the backbone and head train; the run
    reads back (``runs.load``) with its bank and gives the same test predictions."""
    from decipher_jax import runs
    from decipher_jax.eval import localisation

    w = str(tmp_path / "ft")
    cfg = _cfg(prepared_heldout, "findings,tiny,anomaly", steps=4)
    assert cfg.data.flip_p == 0.0 and cfg.model.pool[-1] == "anomaly"
    m = finetune.train(cfg, w)
    assert np.isfinite(m["test/score"])
    model, params, spec = runs.load(w)
    bank = finetune.BankIndex(**{k: tuple(v) for k, v in spec["config"]["anomaly_bank"].items()})
    train = P.data_source(prepared_heldout, "train")
    assert list(bank.rows) == localisation.normal_index(train) and len(bank.rows) >= 2
    # The bank is the initial (random-init, seed 0) encoder's: recompute it from a fresh setup.
    s = finetune.setup(cfg, sh.make_mesh({"data": -1}))
    init = s.model.init(jax.random.key(cfg.seed))
    ts = finetune.task_spec("findings", finetune.read_meta(train))
    filled = finetune.fill_bank(cfg, ts, s.model, init, train, bank, s.vit, s.mesh)
    for key in ("bank_tokens", "bank_group", "bank_patient", "bank_tau"):
        np.testing.assert_array_equal(np.asarray(params[key]), np.asarray(filled[key]))
    assert float(params["bank_tau"]) > 0 and not np.array_equal(np.asarray(params["backbone"]["patch_kernel"]),
                                                                np.asarray(init["backbone"]["patch_kernel"]))
    preds = np.load(os.path.join(w, "test_predictions.npz"))
    fn = jax.jit(lambda p, b: jax.nn.sigmoid(finetune.apply(model, p, b)))
    again = finetune.predict(fn, params, P.data_source(prepared_heldout, "test"), ts, (16, 16, 16), s.mesh, 8,
                             bank=bank)
    np.testing.assert_allclose(again["out"], preds["scores"], rtol=1e-4, atol=1e-5)


def test_pretrained_runs_get_their_own_optimiser_settings(prepared_heldout):
    """From a pretrained run the anomaly-pool recipe is LP-FT: the backbone frozen for half the
    steps, then at 0.1x the head's lr; from random init (the supervised reference) neither. The
    feature statistics and the anomaly bank never train; a user's lr rule comes before the
    recipe's; without the anomaly pool a pretrained run trains as one from scratch."""
    from decipher_jax import optim

    scratch = finetune.optim_config(_cfg(prepared_heldout, "findings,tiny,anomaly", steps=200))
    assert scratch.freeze_backbone_steps == 0 and scratch.lr_rules == [("feat_.*", None), ("bank_.*", None)]
    plain = finetune.optim_config(_cfg(prepared_heldout, "findings,tiny", steps=200, init="/some/run"))
    assert plain.freeze_backbone_steps == 0 and plain.lr_rules == scratch.lr_rules
    pre = finetune.optim_config(_cfg(prepared_heldout, "findings,tiny,anomaly", steps=200, init="/some/run"))
    assert pre.freeze_backbone_steps == 100
    assert pre.lr_rules == [("feat_.*", None), ("bank_.*", None), ("backbone/.*", 0.1)]
    assert optim.first_match("backbone/blocks/0/qkv", pre.lr_rules, 1.0) == 0.1
    assert optim.first_match("head_kernel", pre.lr_rules, 1.0) == 1.0
    mine = finetune.optim_config(_cfg(prepared_heldout, "findings,tiny,anomaly,frozen", init="/some/run"))
    assert optim.first_match("backbone/patch_kernel", mine.lr_rules, 1.0) is None  # the user's rule first
    full = finetune.optim_config(_cfg(prepared_heldout, "findings", init="/some/run"))
    assert full.freeze_backbone_steps == 500 and full.lr_rules[2:] == []  # the full-scale recipe: unchanged
    bad = _cfg(prepared_heldout, "findings,tiny,anomaly", init="/some/run")
    bad.optim.pretrained.nope = 1
    with pytest.raises(KeyError, match="optim.pretrained.nope"):
        finetune.optim_config(bad)


def test_probe_head_is_the_probes_fit_and_scored_as_step_0(prepared_val, tmp_path, monkeypatch):
    """``model.head_init="probe"`` (LP-FT): the head starts as a logistic probe of the initial
    encoder's standardised features, each finding on its regions' rows, equal to scikit-learn's
    at the chosen C (a 2-class softmax probe with C is a binary one with 2C), and ridge for age;
    the fitted head is val-scored as step 0. From random init the head starts at random."""
    from sklearn.linear_model import LogisticRegression

    assert finetune.head_init(_cfg(prepared_val, "findings,tiny,anomaly")) == "random"  # no init run
    assert finetune.head_init(_cfg(prepared_val, "findings,tiny,anomaly", init="/some/run")) == "probe"
    assert finetune.head_init(_cfg(prepared_val, "findings,tiny", init="/some/run")) == "random"
    with pytest.raises(ValueError, match="head_init"):
        finetune.head_init(_cfg(prepared_val, "findings,tiny", init="/r", **{"model.head_init": "lp"}))
    train = P.data_source(prepared_val, "train")
    meta = finetune.read_meta(train)
    for task in ("findings", "age"):
        cfg = _cfg(prepared_val, f"{task},tiny")
        s = finetune.setup(cfg, sh.make_mesh({"data": -1}))
        spec = finetune.task_spec(task, meta)
        rows = np.arange(len(train))
        params = finetune.set_feature_stats(cfg, spec, s.model, s.model.init(jax.random.key(0)), train, (16, 16, 16),
                                            s.mesh)
        fitted, info = finetune.fit_head(cfg, spec, s.model, params, train, rows, (16, 16, 16), s.mesh)
        assert info["on"] == "val" and info["n"] == len(train)
        feats = jax.jit(lambda p, b: (finetune.apply(s.model, p, b, features=True) - p["feat_mean"]) * p["feat_scale"])
        tr = finetune.predict(feats, params, train, spec, (16, 16, 16), s.mesh, 8)
        x = np.asarray(tr["out"], np.float64)
        got = x @ np.asarray(fitted["head_kernel"]) + np.asarray(fitted["head_bias"])
        if task == "age":  # ridge on the standardised age, closed form
            assert info["penalty"] in finetune.LAMS
            xc, yc = x - x.mean(0), tr["y"] - tr["y"].mean()
            w = np.linalg.solve(xc.T @ xc + info["penalty"] * np.eye(x.shape[1]), xc.T @ yc)
            np.testing.assert_allclose(got[:, 0], xc @ w + tr["y"].mean(), rtol=1e-3, atol=1e-3)
            continue
        assert info["penalty"] in finetune.INV_REGS
        checked = 0
        for j in range(spec.n_out):
            on, y = tr["y_mask"][:, j] > 0, tr["y"][:, j]
            if len(set(y[on])) < 2:
                continue
            ref = LogisticRegression(C=2 * info["penalty"], tol=1e-10, max_iter=10_000).fit(x[on], y[on])
            np.testing.assert_allclose(got[on, j], ref.decision_function(x[on]), atol=2e-3 + 1e-2 * np.abs(got[on, j]).max())
            checked += 1
        assert checked >= 2
    # In a run: the fitted head (as from a pretrained run) is scored on val as step 0.
    monkeypatch.setattr(finetune, "head_init", lambda cfg: "probe")
    w = str(tmp_path / "lpft")
    cfg = _cfg(prepared_val, "findings,tiny", steps=4, **{"eval.every": 2})
    finetune.train(cfg, w)
    with open(os.path.join(w, "best.json")) as f:
        first = json.load(f)
    assert sorted(first["evals"], key=int) == ["0", "2", "4"]
    # Killed before its first checkpoint, the run starts afresh: its old record and best step 0
    # are replaced, not compared with (best/ holding step 0 already would refuse the save).
    import shutil

    shutil.rmtree(os.path.join(w, "checkpoints"))
    with open(os.path.join(w, "best.json"), "w") as f:  # an attempt that got further, then was lost
        json.dump({**first, "step": 6, "score": 2.0, "evals": {**first["evals"], "6": 2.0}}, f)
    finetune.train(cfg, w)
    with open(os.path.join(w, "best.json")) as f:
        again = json.load(f)
    assert again["evals"] == first["evals"] and again["step"] == first["step"]
