#!/usr/bin/env bash
# Install decipher_jax on every worker of a TPU VM slice (run from your workstation).
#   experiments/tpu/setup.sh TPU_NAME ZONE [GIT_URL]
# One-host slices (v5e-8, v5p-8) work the same way: --worker=all is a single worker.
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; REPO=${3:-$(git config --get remote.origin.url)}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d decipher_jax ] || git clone '$REPO' decipher_jax
  cd decipher_jax && git pull --ff-only
  python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -c requirements/constraints.txt -e . 'jax[tpu]==0.10.2'
"
