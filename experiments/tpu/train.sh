#!/usr/bin/env bash
# Launch a training stage on every worker of a TPU VM slice (run from your workstation).
#   experiments/tpu/train.sh TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]
# e.g.
#   experiments/tpu/train.sh my-v5e-256 us-west4-a experiments/configs/vision_ssl.py gs://bucket/ssl_b16 \
#       --config.data.dir=gs://bucket/prep --config.mesh="{'data': 1, 'fsdp': -1, 'tensor': 1}"
# All hosts run the same command; jax.distributed.initialize() finds the coordinator from the
# TPU environment, each host reads its own slice of the records, and checkpoints go to WORKDIR
# (use a gs:// path so every host sees it). Rerunning the same command resumes.
# Check memory first: JAX_PLATFORMS=cpu python experiments/aot_compile.py --step vision_ssl --topology v5e:16x16
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
ARGS=$(printf "%q " "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  cd decipher_jax && nohup .venv/bin/decipher train --config '$CONFIG' --workdir '$WORKDIR' $ARGS \
    > train.log 2>&1 &
  echo started on \$(hostname)
"
