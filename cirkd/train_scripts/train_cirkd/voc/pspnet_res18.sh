#!/usr/bin/env bash
# train_cirkd/voc/pspnet_res18.sh (specs/cirkd.md §1.7, §3.6): CIRKD, DeepLabV3-ResNet101 -> PSPNet-ResNet18 on voc.
#   VOC=<VOC root with JPEGImages/ and SegmentationClassAug/> PRETRAINED_DIR=<ImageNet files> [TEACHER=<.pth>] [NPROC=n] bash cirkd/train_scripts/train_cirkd/voc/pspnet_res18.sh
# TEACHER defaults to $SAVE_DIR/deeplabv3_resnet101_voc_best_model.pth (train_baseline/voc/deeplabv3_res101.sh).
# Settings of cirkd/train_scripts/common.sh (NPROC, SAVE_DIR, LOG_DIR, SEGKD_DEMO=1).
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"

is_demo && usage "the demo preset (SEGKD_DEMO=1) runs the Cityscapes scripts only"
require VOC "VOC root with JPEGImages/ and SegmentationClassAug/"
TEACHER=${TEACHER:-$SAVE_DIR/deeplabv3_resnet101_voc_best_model.pth}
require TEACHER "DeepLabV3-ResNet101 checkpoint of this dataset"
BACKBONE_RESNET18=$(imagenet resnet18-imagenet.pth)
launch train_cirkd.py --teacher-model deeplabv3 --teacher-backbone resnet101 --student-model psp --student-backbone resnet18 \
    --dataset voc --data "$VOC" --teacher-pretrained "$TEACHER" \
    --crop-size 512 512 \
    --lambda-memory-pixel 0.01 --lambda-memory-region 0.01 \
    --minibatch-group 2 \
    --save-dir "$SAVE_DIR" --log-dir "$LOG_DIR" --student-pretrained-base "$BACKBONE_RESNET18" \
    "${DEMO_FLAGS[@]}" "$@"

# the original script evaluates the best student
launch eval.py --model psp --backbone resnet18 --dataset voc --data "$VOC" \
    --pretrained "$SAVE_DIR"/kd_psp_resnet18_voc_best_model.pth --save-dir "$LOG_DIR"
