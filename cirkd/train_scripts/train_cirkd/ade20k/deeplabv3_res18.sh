#!/usr/bin/env bash
# train_cirkd/ade20k/deeplabv3_res18.sh (specs/cirkd.md §1.7, §3.6): CIRKD, DeepLabV3-ResNet101 -> DeepLabV3-ResNet18 on ade20k.
#   ADE20K=<ADEChallengeData2016 root with images/ and annotations/> PRETRAINED_DIR=<ImageNet files> [TEACHER=<.pth>] [NPROC=n] bash cirkd/train_scripts/train_cirkd/ade20k/deeplabv3_res18.sh
# TEACHER defaults to $SAVE_DIR/deeplabv3_resnet101_ade20k_best_model.pth (train_baseline/ade20k/deeplabv3_res101.sh).
# Settings of cirkd/train_scripts/common.sh (NPROC, SAVE_DIR, LOG_DIR, SEGKD_DEMO=1).
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"

is_demo && usage "the demo preset (SEGKD_DEMO=1) runs the Cityscapes scripts only"
require ADE20K "ADEChallengeData2016 root with images/ and annotations/"
TEACHER=${TEACHER:-$SAVE_DIR/deeplabv3_resnet101_ade20k_best_model.pth}
require TEACHER "DeepLabV3-ResNet101 checkpoint of this dataset"
BACKBONE_RESNET18=$(imagenet resnet18-imagenet.pth)
launch train_cirkd.py --teacher-model deeplabv3 --teacher-backbone resnet101 --student-model deeplabv3 --student-backbone resnet18 \
    --dataset ade20k --data "$ADE20K" --teacher-pretrained "$TEACHER" \
    --batch-size 16 --crop-size 512 512 --lr 0.02 --max-iterations 40000 \
    --minibatch-group 2 \
    --save-dir "$SAVE_DIR" --log-dir "$LOG_DIR" --student-pretrained-base "$BACKBONE_RESNET18" \
    "${DEMO_FLAGS[@]}" "$@"

# the original script evaluates the best student
launch eval.py --model deeplabv3 --backbone resnet18 --dataset ade20k --data "$ADE20K" \
    --pretrained "$SAVE_DIR"/kd_deeplabv3_resnet18_ade20k_best_model.pth --save-dir "$LOG_DIR"
