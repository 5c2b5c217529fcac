#!/usr/bin/env bash
# train_kd/deeplabv3_res18_unpretrained.sh (specs/cirkd.md §1.7, §3.6): CIRKD, teacher DeepLabV3-ResNet101 -> student DeepLabV3-ResNet18 without ImageNet init, Cityscapes, the original's defaults (λ_kd 1, λ_mb 1, λ_mp 0.1, λ_mr 0.1).
#   CITYSCAPES=<Cityscapes root with leftImg8bit/ and gtFine/> PRETRAINED_DIR=<ImageNet files> [TEACHER=<.pth>] [NPROC=n] bash cirkd/train_scripts/train_kd/deeplabv3_res18_unpretrained.sh
# TEACHER defaults to $SAVE_DIR/deeplabv3_resnet101_citys_best_model.pth (train_baseline/citys/deeplabv3_res101.sh).
# Settings of cirkd/train_scripts/common.sh (NPROC, SAVE_DIR, LOG_DIR, SEGKD_DEMO=1).
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

is_demo || require CITYSCAPES "Cityscapes root with leftImg8bit/ and gtFine/"
TEACHER=${TEACHER:-$SAVE_DIR/deeplabv3_resnet101_citys_best_model.pth}
require TEACHER "DeepLabV3-ResNet101 checkpoint of this dataset"
launch train_kd.py --teacher-model deeplabv3 --teacher-backbone resnet101 --student-model deeplabv3 --student-backbone resnet18 \
    --dataset citys --data "$CITYSCAPES" --teacher-pretrained "$TEACHER" \
    --minibatch-group 2 \
    --save-dir "$SAVE_DIR" --log-dir "$LOG_DIR" --student-pretrained-base None \
    "${DEMO_FLAGS[@]}" "$@"
