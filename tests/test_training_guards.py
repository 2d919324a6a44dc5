"""Training hardening: the divergence guard, config drift on resume, the workdir lock, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from decipher_jax import runspec
from decipher_jax.trainers import common, vision_ssl

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "vision_ssl.py")


def _cfg(data_dir, **kw):
    over = {"data.dir": data_dir, "data.batch_size": 8, "data.global_size": (16, 16, 16), "data.local_size": (8, 8, 8),
            "model.vit.patch_size": (4, 4, 4), "model.vit.img_size": (16, 16, 16), "model.vit.dim": 32,
            "model.vit.mlp_dim": 64, "model.head.out_dim": 64, "model.head.hidden": 32, "model.head.bottleneck": 16,
            "steps": 6, "optim.warmup_steps": 3, "ssl.teacher_temp_warmup_steps": 3, "async_checkpoints": False,
            "checkpoint_every": 1, "log_every": 1}
    over.update(kw)
    return common.load_config(CONFIG + ":tiny", over)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _latest_step(workdir):
    from decipher_jax import checkpoint as ckpt

    with ckpt.manager(os.path.join(workdir, "checkpoints"), async_save=False) as m:
        return m.latest_step()


def test_guard_refuses_unsound_updates():
    old = {"p": jnp.ones(4), "opt": jnp.zeros(4), "step": jnp.int32(3)}
    good = {"p": jnp.ones(4) * 1.01, "opt": jnp.ones(4), "step": jnp.int32(4)}
    kw = dict(params={"p": old["p"]}, max_update_ratio=1.0)
    state, m = common.guard_update(jnp.float32(1.0), good, old, new_params={"p": good["p"]}, **kw)
    assert bool(m["step_ok"]) and int(state["step"]) == 4 and float(m["update_ratio"]) == pytest.approx(0.01)
    cases = {
        "nan loss": (jnp.float32(np.nan), good),
        "inf optimiser moment": (jnp.float32(1.0), {**good, "opt": good["opt"].at[1].set(np.inf)}),
        "huge finite update": (jnp.float32(1.0), {**good, "p": jnp.full(4, 2e29)}),
    }
    for name, (loss, new) in cases.items():
        state, m = common.guard_update(loss, new, old, new_params={"p": new["p"]}, **kw)
        assert not bool(m["step_ok"]), name
        assert all(np.array_equal(state[k], old[k]) for k in old), name


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """An uninterrupted 6-step run: its metrics by step."""
    w = str(tmp_path_factory.mktemp("reference") / "w")
    vision_ssl.train(_cfg(prepared), w)
    return {r["step"]: r for r in _rows(w)}


def _same_losses(got, ref, steps):
    for s in steps:
        for k in ("loss", "dino", "ibot", "grad_norm"):
            assert got[s][k] == pytest.approx(ref[s][k], rel=1e-6, abs=1e-7), (s, k)


def test_huge_lr_leaves_a_checkpoint_that_trains(prepared, tmp_path):
    """lr 1e30: step 2's update is refused though its loss is finite; a checkpoint of step 1
    exists already (Orbax saves the first step), which used to raise StepAlreadyExistsError
    before any message; the checkpoint left behind resumes and trains at a sane lr."""
    w = str(tmp_path / "w")
    with pytest.raises(common.Diverged) as e:
        vision_ssl.train(_cfg(prepared, **{"optim.lr": 1e30, "checkpoint_every": 2}), w)
    msg = str(e.value)
    assert "refused" in msg and "times the parameters' norm" in msg and "lower the learning rate" in msg, msg
    assert e.value.step == 1 and _latest_step(w) == 1  # the step-1 warm-up lr is 0: that step is sound
    assert np.isfinite(_rows(w)[0]["loss"])
    metrics = vision_ssl.train(_cfg(prepared, **{"optim.lr": 1e-3, "checkpoint_every": 2}), w)
    rows = _rows(w)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["step_ok"] == 1.0 for r in rows) and np.isfinite(metrics["loss"])
    spec = runspec.read(w)
    assert spec.history[-1]["step"] == 1 and spec.history[-1]["changed"]["optim.lr"] == [1e30, 1e-3]


def test_refused_step_is_checkpointed_and_retries_its_batch(prepared, tmp_path, reference):
    """A refusal between regular checkpoints (cadence 5) writes the last good step with the data
    position before the refused batch, so the resumed run equals the uninterrupted one."""
    # Adam's first updates are ~lr per element: the ratio grows with the warm-up lr, so a limit
    # between steps 2's and 3's ratios refuses step 3.
    limit = (reference[2]["update_ratio"] + reference[3]["update_ratio"]) / 2
    w = str(tmp_path / "w")
    with pytest.raises(common.Diverged) as e:
        vision_ssl.train(_cfg(prepared, checkpoint_every=5, guard_update_ratio=limit), w)
    assert e.value.step == 2 and _latest_step(w) == 2 and "guard_update_ratio" in str(e.value)
    vision_ssl.train(_cfg(prepared, checkpoint_every=5), w)
    got = {r["step"]: r for r in _rows(w)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    _same_losses(got, reference, (3, 4, 5, 6))


def test_resume_refuses_shape_changes_and_records_allowed_ones(prepared, tmp_path):
    w = str(tmp_path / "w")
    vision_ssl.train(_cfg(prepared, stop_after=2), w)
    before = open(os.path.join(w, "run_spec.json")).read()
    for field, value in (("data.batch_size", 16), ("model.vit.dim", 64)):
        with pytest.raises(runspec.ConfigMismatch, match=field.replace(".", r"\.")):
            vision_ssl.train(_cfg(prepared, **{field: value}), w)
        assert open(os.path.join(w, "run_spec.json")).read() == before  # the record of steps 1-2 stays
    assert len(_rows(w)) == 2
    vision_ssl.train(_cfg(prepared, **{"steps": 4, "log_every": 2}), w)
    spec = runspec.read(w)
    assert spec.kind == "vision_ssl" and spec.vit["dim"] == 32
    assert [h["step"] for h in spec.history] == [0, 2]
    assert spec.history[1]["changed"]["steps"] == [6, 4] and spec.config["steps"] == 4


def test_second_trainer_is_locked_out(prepared, tmp_path, capsys):
    w = str(tmp_path / "w")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from decipher_jax.trainers import common\n"
         "with common.workdir_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)", w],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(common.WorkdirLocked, match=f"pid {holder.pid} .*{os.path.join(w, '.lock')}"):
            vision_ssl.train(_cfg(prepared), w)
        from decipher_jax import cli

        rc = cli.main(["train", "--config", CONFIG + ":tiny", "--workdir", w, f"--config.data.dir={prepared}"])
        assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith("decipher train: error: ") and f"pid {holder.pid}" in err and ".lock" in err, err
    finally:
        holder.kill()
        holder.wait()
    assert not os.path.exists(os.path.join(w, "metrics.jsonl"))
    vision_ssl.train(_cfg(prepared, stop_after=1), w)  # a killed holder leaves no stale lock
    assert len(_rows(w)) == 1


def test_sigterm_checkpoints_and_resumes_exactly(prepared, tmp_path, monkeypatch, reference):
    log = common.Logger.log

    def log_then_term(self, step, metrics, **kw):  # the scheduler's notice arrives during step 3
        log(self, step, metrics, **kw)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    w = str(tmp_path / "w")
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(common.Logger, "log", log_then_term)
    # A grace period no busy test machine outlasts: its watchdog (os._exit) would take the test
    # process with it; the watchdog has its own test below.
    with pytest.raises(common.Preempted) as e:
        vision_ssl.train(_cfg(prepared, checkpoint_every=5, preemption_grace_s=600.0), w)  # no checkpoint at step 3
    monkeypatch.undo()
    assert e.value.step == 3 and _latest_step(w) == 3
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    vision_ssl.train(_cfg(prepared, checkpoint_every=5), w)
    got = {r["step"]: r for r in _rows(w)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    _same_losses(got, reference, (4, 5, 6))


def test_sigterm_grace_period_ends_a_stuck_run(tmp_path):
    """A step that outlasts the grace period: the watchdog exits (143) rather than be killed mid-write."""
    code = ("import os, signal, time\nfrom decipher_jax.trainers import common\n"
            "with common._Preemption(0.5):\n os.kill(os.getpid(), signal.SIGTERM)\n time.sleep(30)\n")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 143 and "grace period" in p.stderr, p.stderr
    assert time.perf_counter() - t0 < 25


def test_a_field_added_later_resumes_at_its_old_behaviour_and_refuses_another_value():
    old = {"data": {"dir": "d", "batch_size": 4}, "steps": 10}
    new = {"data": {"dir": "d", "batch_size": 4, "answer_weight": 1.0}, "steps": 10}
    assert runspec.config_changes(old, new) == {}
    assert runspec.config_changes(new, old) == {}
    new["data"]["answer_weight"] = 20.0
    assert runspec.config_changes(old, new) == {"data.answer_weight": [1.0, 20.0]}
    assert runspec.config_changes({"steps": 1}, {"steps": 2}) == {"steps": [1, 2]}  # no added field invented
    # the caption memory's bank: a run from before it resumes without one, and refuses to grow one
    old = {"model": {"captioner": {"num_latents": 16}}}
    assert runspec.config_changes(old, {"model": {"captioner": {"num_latents": 16, "anomaly_bank": 0}}}) == {}
    assert runspec.config_changes(old, {"model": {"captioner": {"num_latents": 16, "anomaly_bank": 128}}}) == {
        "model.captioner.anomaly_bank": [0, 128]}
    # fine-tuning's flips and its settings for a pretrained run: an older run resumes as it was
    from decipher_jax.trainers import common

    ft = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "finetune.py")
    cfg = runspec.as_json(common.load_config(ft + ":findings,tiny", {}))
    old = {**cfg, "data": {k: v for k, v in cfg["data"].items() if k != "flip_p"},
           "optim": {k: v for k, v in cfg["optim"].items() if k != "pretrained"}}
    assert runspec.config_changes(old, cfg) == {}
    anomaly = runspec.as_json(common.load_config(ft + ":findings,tiny,anomaly", {}))
    assert set(runspec.config_changes(old, anomaly)) >= {"data.flip_p", "model.pool"}


def test_restore_subtree_names_what_the_checkpoint_lacks(tmp_path):
    """Asking a checkpoint for arrays it does not hold (a run of another architecture) is a clear
    error naming them, not abstract shapes handed back in place of arrays."""
    import jax

    from decipher_jax import checkpoint as ckpt

    state = {"params": {"a": jnp.arange(4.0), "b": {"w": jnp.ones((2, 3))}}}
    with ckpt.manager(str(tmp_path / "ck"), async_save=False) as m:
        ckpt.save(m, 3, state, force=True)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    step, part = ckpt.restore_subtree(str(tmp_path / "ck"), {"params": {"b": abstract["params"]["b"]}})
    assert step == 3 and np.asarray(part["params"]["b"]["w"]).tolist() == [[1.0] * 3] * 2
    asked = {"params": {**abstract["params"], "memory": {"bank": jax.ShapeDtypeStruct((5, 2), jnp.float32)}}}
    with pytest.raises(ValueError, match=r"lacks 1 of the arrays.*memory.*bank"):
        ckpt.restore_subtree(str(tmp_path / "ck"), asked)
