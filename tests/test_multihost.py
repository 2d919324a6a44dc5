"""Two local CPU processes (coordinator on 127.0.0.1) train stage 1 together and agree on the loss."""

import json
import os
import subprocess
import sys

import portpicker

from decipher_jax import env as env_lib

HERE = os.path.dirname(__file__)


def test_two_processes_train_together(prepared, tmp_path):
    port = portpicker.pick_unused_port()
    # 2 devices per worker, not the session's 8, and the session's other XLA flags (conftest's
    # compile settings; the optimisation level alone took the test from 87 s to 57 s).
    env = env_lib.subprocess_env(devices=2)
    cmd = [sys.executable, os.path.join(HERE, "scripts", "multihost_worker.py")]
    args = [str(port), prepared, str(tmp_path / "run"), os.path.join(HERE, "..", "experiments", "configs", "vision_ssl.py")]
    procs = [subprocess.Popen(cmd[:1] + [cmd[1], str(i)] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    results = []
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[len("RESULT "):]))
    a, b = results
    assert a["processes"] == b["processes"] == 2 and a["devices"] == b["devices"] == 4
    for k in ("loss", "dino", "ibot", "koleo", "grad_norm"):
        assert a[k] == b[k], k  # one global computation, seen identically by both hosts
    # Each host checkpointed its own data-iterator state.
    step_dir = tmp_path / "run" / "checkpoints" / "3" / "iter"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir))
