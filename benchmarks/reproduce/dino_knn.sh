#!/usr/bin/env bash
# DINO's k-NN on ImageNet-1K (eval_knn.py's protocol, configs/probe/dino_knn_imagenet.yaml) of the
# released DINO backbones. Published k-NN top-1 (k = 20): ViT-S/16 74.5 (dino_deitsmall16_pretrain.pth),
# ViT-B/16 76.1 (dino_vitbase16_pretrain.pth); docs/weights.md has the sources and GPU-hours. Any imported
# backbone works (IMPORT_ARGS="--format moco-v3" for MoCo v3's). One file per run:
#
#   benchmarks/reproduce/dino_knn.sh dino_vitbase16_pretrain.pth [key=value ...]
#
# Environment: DATA_ROOT (default $SELFSUP_DATA or ./data; ImageNet in DATA_ROOT/imagenet/{train,val}),
# OUT (runs/reproduce/dino_knn), PYTHON (python), IMPORT_ARGS (default --format dino).
# key=value arguments go to the probe (e.g. knn_backend=faiss-gpu).
set -euo pipefail
weights=${1:?usage: $0 RELEASED_CHECKPOINT [key=value ...]}
shift
out=${OUT:-runs/reproduce/dino_knn}
python=${PYTHON:-python}
# shellcheck disable=SC2086  # IMPORT_ARGS is a word list
$python -m selfsup.weightscli import "$weights" ${IMPORT_ARGS:---format dino} --out "$out/weights"
$python -m selfsup.eval.cli --config configs/probe/dino_knn_imagenet.yaml \
    --checkpoint "$out/weights/backbone.safetensors" ${DATA_ROOT:+--data-root "$DATA_ROOT"} out="$out/probe" "$@"
echo "k-NN top-1 in $out/probe/report.md"
