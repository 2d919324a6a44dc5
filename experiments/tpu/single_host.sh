#!/usr/bin/env bash
# On a one-host TPU VM (e.g. v5e-8): stage 1 vision then text, in the background, logs in WORKDIR.
#   experiments/tpu/single_host.sh WORKDIR DATA_DIR [BERT_DIR]
set -euo pipefail
WORKDIR=${1:?workdir}; DATA=${2:?prepared data dir}; BERT=${3:-minilm}
mkdir -p "$WORKDIR"
.venv/bin/decipher train --config experiments/configs/vision_ssl.py --workdir "$WORKDIR/vision_ssl" \
  --config.data.dir="$DATA" --config.data.batch_size=128 > "$WORKDIR/vision_ssl.log" 2>&1
.venv/bin/decipher train --config experiments/configs/text_mlm.py --workdir "$WORKDIR/text_mlm" \
  --config.data.dir="$DATA" --config.model.path="$BERT" > "$WORKDIR/text_mlm.log" 2>&1
