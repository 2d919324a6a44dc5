#!/usr/bin/env bash
# Every GPU check and benchmark in one call (the lent GPU's time is short).
#   bash benchmarks/gpu_all.sh [OUTDIR]
# Expects jax[cuda], torch and scikit-learn installed; wheels for what the image lacks may sit in
# .whl/ (grain, array_record, ml_collections, portpicker, monai). Use the image's own flax: a
# flax wheel older than its jax fails at import (flax 0.12.8 needs jax.experimental.hijax of 0.10).
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_out}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/nvidia_smi.txt"
python3 -c "import jax, flax, optax, torch, monai, sklearn; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, '| monai', monai.__version__, '| sklearn', sklearn.__version__)" | tee "$out/versions.txt"
echo "== checks"; timeout 240 python3 benchmarks/gpu_checks.py 2>&1 | tee "$out/gpu_checks.txt" | grep -v "^WARNING"
echo "== probes"; timeout 110 python3 benchmarks/probes.py 2>&1 | tee "$out/probes.txt" | tail -8
echo "== train step"; timeout 320 python3 benchmarks/train_step.py --variant B/16 --size 128 --batch ${BATCH:-32} \
  --dtype bfloat16 --compile --iters 10 2>&1 | tee "$out/train_step.txt" | grep -v "^W\|^I0\|warn" | tail -14
