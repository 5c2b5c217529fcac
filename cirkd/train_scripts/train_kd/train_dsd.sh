#!/usr/bin/env bash
# train_kd/train_dsd.sh (specs/cirkd.md §1.7, §3.6): the DSD (no KD) baseline, DeepLabV3-ResNet101 -> DeepLabV3-ResNet18 and -> DeepLabV3-MobileNetV2, Cityscapes; the CIRKD terms are switched off.
#   CITYSCAPES=<Cityscapes root with leftImg8bit/ and gtFine/> PRETRAINED_DIR=<ImageNet files> [TEACHER=<.pth>] [NPROC=n] bash cirkd/train_scripts/train_kd/train_dsd.sh
# TEACHER defaults to $SAVE_DIR/deeplabv3_resnet101_citys_best_model.pth (train_baseline/citys/deeplabv3_res101.sh). Checkpoints go to $SAVE_DIR/dsd/.
# Settings of cirkd/train_scripts/common.sh (NPROC, SAVE_DIR, LOG_DIR, SEGKD_DEMO=1).
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

is_demo || require CITYSCAPES "Cityscapes root with leftImg8bit/ and gtFine/"
TEACHER=${TEACHER:-$SAVE_DIR/deeplabv3_resnet101_citys_best_model.pth}
require TEACHER "DeepLabV3-ResNet101 checkpoint of this dataset"
BACKBONE_RESNET18=$(imagenet resnet18-imagenet.pth)
launch train_kd.py --teacher-model deeplabv3 --teacher-backbone resnet101 --student-model deeplabv3 --student-backbone resnet18 \
    --dataset citys --data "$CITYSCAPES" --teacher-pretrained "$TEACHER" \
    --lambda-kd 0 --lambda-psd 1000 --lambda-csd 10 \
    --lambda-minibatch-pixel 0 --lambda-memory-pixel 0 --lambda-memory-region 0 \
    --save-dir "$SAVE_DIR/dsd" --log-dir "$LOG_DIR" --student-pretrained-base "$BACKBONE_RESNET18" \
    "${DEMO_FLAGS[@]}" "$@"
BACKBONE_MOBILENETV2=$(imagenet mobilenetv2-imagenet.pth)
launch train_kd.py --teacher-model deeplabv3 --teacher-backbone resnet101 --student-model deeplab_mobile --student-backbone mobilenetv2 \
    --dataset citys --data "$CITYSCAPES" --teacher-pretrained "$TEACHER" \
    --lambda-kd 0 --lambda-psd 1000 --lambda-csd 10 \
    --lambda-minibatch-pixel 0 --lambda-memory-pixel 0 --lambda-memory-region 0 \
    --save-dir "$SAVE_DIR/dsd" --log-dir "$LOG_DIR" --student-pretrained-base "$BACKBONE_MOBILENETV2" \
    "${DEMO_FLAGS[@]}" "$@"
