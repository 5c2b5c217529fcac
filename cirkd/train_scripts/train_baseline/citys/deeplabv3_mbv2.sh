#!/usr/bin/env bash
# train_baseline/citys/deeplabv3_mbv2.sh (specs/cirkd.md §1.7): DeepLabV3-MobileNetV2 (the original misspells the backbone 'mobilenev2', so do the file names), supervised, on citys.
#   CITYSCAPES=<Cityscapes root with leftImg8bit/ and gtFine/> PRETRAINED_DIR=<ImageNet files> [NPROC=n] bash cirkd/train_scripts/train_baseline/citys/deeplabv3_mbv2.sh
# Settings of cirkd/train_scripts/common.sh (NPROC, SAVE_DIR, LOG_DIR, SEGKD_DEMO=1).
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"

is_demo || require CITYSCAPES "Cityscapes root with leftImg8bit/ and gtFine/"
BACKBONE_FILE=$(imagenet mobilenetv2-imagenet.pth)
launch train_baseline.py --model deeplab_mobile --backbone mobilenev2 --dataset citys --data "$CITYSCAPES" \
    --save-dir "$SAVE_DIR" --log-dir "$LOG_DIR" \
    --pretrained-base "$BACKBONE_FILE" \
    "${DEMO_FLAGS[@]}" "$@"

# the original evaluates the best model on val (4 GPUs there)
EVAL_FLAGS=()
is_demo && EVAL_FLAGS=(--data-list "$CITYSCAPES/lists/val.lst" --workers 0 --device cpu)
launch eval.py --model deeplab_mobile --backbone mobilenev2 --dataset citys --data "$CITYSCAPES" \
    --pretrained "$SAVE_DIR/deeplab_mobile_mobilenev2_citys_best_model.pth" --save-dir "$LOG_DIR" "${EVAL_FLAGS[@]}"
