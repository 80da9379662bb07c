#!/usr/bin/env bash
# MoCo v3 ViT-B/16 transfer (facebookresearch/moco-v3 transfer/README.md): the released 300-epoch
# ImageNet-1K weights fine-tuned with the shipped recipes (configs/finetune/vit_base_*.yaml).
# Published top-1: CIFAR-10 98.9, CIFAR-100 90.5, Flowers 97.7, Pets 93.2 (docs/weights.md: sources, GPU-hours).
#
#   benchmarks/reproduce/mocov3_transfer.sh vit-b-300ep.pth.tar [key=value ...]
#
# Environment: DATA_ROOT (default $SELFSUP_DATA or ./data), OUT (runs/reproduce/mocov3_transfer),
# DATASETS (cifar10 cifar100 flowers pets), GPUS (8), LAUNCH (accelerate launch --multi_gpu
# --num_processes $GPUS), PYTHON (python), IMPORT_ARGS (more selfsup-weights import options).
# key=value arguments go to every fine-tuning run (e.g. batch_size=512 on fewer GPUs).
set -euo pipefail
weights=${1:?usage: $0 RELEASED_CHECKPOINT [key=value ...]}
shift
out=${OUT:-runs/reproduce/mocov3_transfer}
python=${PYTHON:-python}
launch=${LAUNCH:-accelerate launch --multi_gpu --num_processes ${GPUS:-8}}
# shellcheck disable=SC2086  # IMPORT_ARGS and LAUNCH are word lists
$python -m selfsup.weightscli import "$weights" --format moco-v3 ${IMPORT_ARGS:-} --out "$out/weights"
for name in ${DATASETS:-cifar10 cifar100 flowers pets}; do
    # shellcheck disable=SC2086
    $launch finetune/finetune.py --config "configs/finetune/vit_base_${name}.yaml" \
        --checkpoint "$out/weights/backbone.safetensors" ${DATA_ROOT:+--data-root "$DATA_ROOT"} \
        out="$out/$name" "$@"
    echo "$name: best top-1 in $out/$name/report.md"
done
