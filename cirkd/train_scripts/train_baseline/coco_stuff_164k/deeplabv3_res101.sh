#!/usr/bin/env bash
# train_baseline/coco_stuff_164k/deeplabv3_res101.sh (specs/cirkd.md §1.7): DeepLabV3-ResNet101 (the teacher), supervised, on coco_stuff_164k.
#   COCO_STUFF=<COCO-Stuff-164K root with images/ and annotations/> PRETRAINED_DIR=<ImageNet files> [NPROC=n] bash cirkd/train_scripts/train_baseline/coco_stuff_164k/deeplabv3_res101.sh
# Settings of cirkd/train_scripts/common.sh (NPROC, SAVE_DIR, LOG_DIR, SEGKD_DEMO=1).
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"

is_demo && usage "the demo preset (SEGKD_DEMO=1) runs the Cityscapes scripts only"
require COCO_STUFF "COCO-Stuff-164K root with images/ and annotations/"
BACKBONE_FILE=$(imagenet resnet101-imagenet.pth)
launch train_baseline.py --model deeplabv3 --backbone resnet101 --dataset coco_stuff_164k --data "$COCO_STUFF" \
    --batch-size 16 \
    --crop-size 512 512 \
    --lr 0.02 \
    --max-iterations 80000 \
    --workers 16 \
    --save-dir "$SAVE_DIR" --log-dir "$LOG_DIR" \
    --pretrained-base "$BACKBONE_FILE" \
    "${DEMO_FLAGS[@]}" "$@"
