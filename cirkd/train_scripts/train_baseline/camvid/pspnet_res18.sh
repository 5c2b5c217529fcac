#!/usr/bin/env bash
# train_baseline/camvid/pspnet_res18.sh (specs/cirkd.md §1.7): PSPNet-ResNet18, supervised, on camvid.
#   CAMVID=<CamVid root with train/ trainannot/ ...> PRETRAINED_DIR=<ImageNet files> [NPROC=n] bash cirkd/train_scripts/train_baseline/camvid/pspnet_res18.sh
# Settings of cirkd/train_scripts/common.sh (NPROC, SAVE_DIR, LOG_DIR, SEGKD_DEMO=1).
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"

is_demo && usage "the demo preset (SEGKD_DEMO=1) runs the Cityscapes scripts only"
require CAMVID "CamVid root with train/ trainannot/ ..."
BACKBONE_FILE=$(imagenet resnet18-imagenet.pth)
launch train_baseline.py --model psp --backbone resnet18 --dataset camvid --data "$CAMVID" \
    --crop-size 360 360 \
    --save-dir "$SAVE_DIR" --log-dir "$LOG_DIR" \
    --pretrained-base "$BACKBONE_FILE" \
    "${DEMO_FLAGS[@]}" "$@"
