#!/usr/bin/env bash
# SKD journal code: train PSPNet-R18 with pixel-wise + pair-wise + holistic distillation on Cityscapes and
# evaluate near the end (specs/ifvd_skd.md §B.2.1). The flags are the original script's; arguments given to
# this script are appended, so they override them (e.g. --num-steps 100 --device cpu).
# Environment: CITYSCAPES (data root, default ../cityscapes), PYTHON (interpreter, default python3).
# Unlike the original, the script does not set CUDA_VISIBLE_DEVICES='3' (skd/README.md, Deviations).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"${PYTHON:-python3}" "$HERE/train_and_eval.py" --gpu 0 --parallel False --random-mirror --random-scale \
    --weight-decay 5e-4 --data-dir "${CITYSCAPES:-../cityscapes}" --batch-size 8 --num-steps 40000 \
    --is-student-load-imgnet True --student-pretrain-model-imgnet ./dataset/resnet18-imagenet.pth \
    --pi True --pa True --ho True --lambda-pa 0.5 --pool-scale 0.5 --lambda-pi 10.0 --lambda-d 0.1 "$@"
