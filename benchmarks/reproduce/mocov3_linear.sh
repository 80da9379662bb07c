#!/usr/bin/env bash
# MoCo v3 linear classification on ImageNet-1K (main_lincls.py's protocol, configs/probe/mocov3_linear_imagenet.yaml)
# of the released 300-epoch weights. Published top-1: ViT-S 73.2 (vit-s-300ep.pth.tar), ViT-B 76.7
# (vit-b-300ep.pth.tar); docs/weights.md has the sources and GPU-hours. One file per run:
#
#   benchmarks/reproduce/mocov3_linear.sh vit-s-300ep.pth.tar [key=value ...]
#   OUT=runs/reproduce/mocov3_linear_b benchmarks/reproduce/mocov3_linear.sh vit-b-300ep.pth.tar
#
# Environment: DATA_ROOT (default $SELFSUP_DATA or ./data; ImageNet in DATA_ROOT/imagenet/{train,val}),
# OUT (runs/reproduce/mocov3_linear), PYTHON (python), IMPORT_ARGS (more selfsup-weights import options).
# key=value arguments go to the probe (e.g. linear_head.batch_size=512).
set -euo pipefail
weights=${1:?usage: $0 RELEASED_CHECKPOINT [key=value ...]}
shift
out=${OUT:-runs/reproduce/mocov3_linear}
python=${PYTHON:-python}
# shellcheck disable=SC2086  # IMPORT_ARGS is a word list
$python -m selfsup.weightscli import "$weights" --format moco-v3 ${IMPORT_ARGS:-} --out "$out/weights"
$python -m selfsup.eval.cli --config configs/probe/mocov3_linear_imagenet.yaml \
    --checkpoint "$out/weights/backbone.safetensors" ${DATA_ROOT:+--data-root "$DATA_ROOT"} out="$out/probe" "$@"
echo "linear top-1 in $out/probe/report.md"
