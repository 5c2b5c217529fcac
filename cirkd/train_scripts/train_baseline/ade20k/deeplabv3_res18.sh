#!/usr/bin/env bash
# train_baseline/ade20k/deeplabv3_res18.sh (specs/cirkd.md §1.7): DeepLabV3-ResNet18, supervised, on ade20k.
#   ADE20K=<ADEChallengeData2016 root with images/ and annotations/> PRETRAINED_DIR=<ImageNet files> [NPROC=n] bash cirkd/train_scripts/train_baseline/ade20k/deeplabv3_res18.sh
# Settings of cirkd/train_scripts/common.sh (NPROC, SAVE_DIR, LOG_DIR, SEGKD_DEMO=1).
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"

is_demo && usage "the demo preset (SEGKD_DEMO=1) runs the Cityscapes scripts only"
require ADE20K "ADEChallengeData2016 root with images/ and annotations/"
BACKBONE_FILE=$(imagenet resnet18-imagenet.pth)
launch train_baseline.py --model deeplabv3 --backbone resnet18 --dataset ade20k --data "$ADE20K" \
    --batch-size 16 \
    --crop-size 512 512 \
    --lr 0.02 \
    --save-dir "$SAVE_DIR" --log-dir "$LOG_DIR" \
    --pretrained-base "$BACKBONE_FILE" \
    "${DEMO_FLAGS[@]}" "$@"
