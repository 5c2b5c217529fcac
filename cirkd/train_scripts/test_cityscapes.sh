#!/usr/bin/env bash
# train_scripts/test_cityscapes.sh (specs/cirkd.md §1.7, §1.6): labelId PNGs of the Cityscapes test set for the
# server, from DeepLabV3-ResNet101 (4 GPUs in the original).
#   CITYSCAPES=<Cityscapes root> [CHECKPOINT=<.pth>, default $SAVE_DIR/deeplabv3_resnet101_citys_best_model.pth]
#   [NPROC=n] bash cirkd/train_scripts/test_cityscapes.sh [test.py flags]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require CITYSCAPES "Cityscapes root with leftImg8bit/test/"
CHECKPOINT=${CHECKPOINT:-$SAVE_DIR/deeplabv3_resnet101_citys_best_model.pth}
require CHECKPOINT "checkpoint of DeepLabV3-ResNet101 on Cityscapes"
launch test.py --model deeplabv3 --backbone resnet101 --data "$CITYSCAPES" --pretrained "$CHECKPOINT" \
    --save-dir "$LOG_DIR" --save-pred "$@"
