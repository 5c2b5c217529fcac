#!/usr/bin/env bash
# train_baseline/voc/pspnet_res18.sh (specs/cirkd.md §1.7): PSPNet-ResNet18, supervised, on voc.
#   VOC=<VOC root with JPEGImages/ and SegmentationClassAug/> PRETRAINED_DIR=<ImageNet files> [NPROC=n] bash cirkd/train_scripts/train_baseline/voc/pspnet_res18.sh
# Settings of cirkd/train_scripts/common.sh (NPROC, SAVE_DIR, LOG_DIR, SEGKD_DEMO=1).
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"

is_demo && usage "the demo preset (SEGKD_DEMO=1) runs the Cityscapes scripts only"
require VOC "VOC root with JPEGImages/ and SegmentationClassAug/"
BACKBONE_FILE=$(imagenet resnet18-imagenet.pth)
launch train_baseline.py --model psp --backbone resnet18 --dataset voc --data "$VOC" \
    --crop-size 512 512 \
    --save-dir "$SAVE_DIR" --log-dir "$LOG_DIR" \
    --pretrained-base "$BACKBONE_FILE" \
    "${DEMO_FLAGS[@]}" "$@"
