"""One process of the 2-process CPU training test (run by tests/test_multihost.py)."""

import json
import os
import sys

pid, port, data, out, config = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
os.environ.update(DECIPHER_COORDINATOR=f"127.0.0.1:{port}", DECIPHER_NUM_PROCESSES="2", DECIPHER_PROCESS_ID=str(pid))

if __name__ == "__main__":
    from decipher_jax import env

    env.setup(devices=2, platform="cpu")  # 2 CPU devices per process (the test sets that count in its XLA_FLAGS)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    from decipher_jax.trainers import common, vision_ssl

    cfg = common.load_config(config + ":tiny", {
        "data.dir": data, "data.batch_size": 8, "steps": 3, "optim.total_steps": 3, "async_checkpoints": False,
        "checkpoint_every": 3, "data.global_size": (16, 16, 16), "data.local_size": (8, 8, 8),
        "model.vit.patch_size": (4, 4, 4), "model.vit.img_size": (16, 16, 16), "model.vit.dim": 32,
        "model.vit.mlp_dim": 64, "model.head.out_dim": 64, "model.head.hidden": 32, "model.head.bottleneck": 16})
    metrics = vision_ssl.train(cfg, out)
    print("RESULT " + json.dumps({"pid": pid, "processes": jax.process_count(), "devices": jax.device_count(),
                                  **metrics}), flush=True)
