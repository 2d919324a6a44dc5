"""Stage-1 text trainer: MLM on prepared reports from the real MiniLM weights lowers the loss;
the exported encoder loads in transformers."""

import json
import os

import numpy as np

from decipher_jax.trainers import common, text_mlm
from helpers import assert_run_spec

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "text_mlm.py")


def test_mlm_lowers_loss_and_exports(prepared, minilm_path, tmp_path):
    cfg = common.load_config(CONFIG + ":tiny", {"data.dir": prepared, "data.max_length": 32, "steps": 12,
                                               "optim.total_steps": 12, "optim.warmup_steps": 2,
                                               "async_checkpoints": False, "checkpoint_every": 6})
    out = str(tmp_path / "mlm")
    text_mlm.train(cfg, out)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    loss = np.array([r["loss"] for r in rows])
    assert len(loss) == 12 and np.all(np.isfinite(loss))
    assert loss[-4:].mean() < loss[:2].mean() - 2.0  # the untrained MLM head starts near log(30522)
    from transformers import BertForMaskedLM

    BertForMaskedLM.from_pretrained(os.path.join(out, "hf_export"), local_files_only=True)
    spec = assert_run_spec(out, "text_mlm")
    assert spec["bert"]["hidden_size"] == 384  # MiniLM
    from decipher_jax import runs  # the run reads back as its BERT, at its last step

    model, params, loaded = runs.load(out)
    assert loaded["kind"] == "text_mlm" and loaded["step"] == 12 and "mlm_bias" in params
    ids = np.full((1, 8), 101, np.int32)
    assert model(params)(ids, np.ones_like(ids)).shape == (1, 8, 384)
