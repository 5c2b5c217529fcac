#!/usr/bin/env bash
# train_kd/train_cwd.sh (specs/cirkd.md §1.7, §3.6): the CWD baseline, DeepLabV3-ResNet101 -> DeepLabV3-ResNet18 and -> DeepLabV3-MobileNetV2, Cityscapes; the CIRKD terms are switched off.
#   CITYSCAPES=<Cityscapes root with leftImg8bit/ and gtFine/> PRETRAINED_DIR=<ImageNet files> [TEACHER=<.pth>] [NPROC=n] bash cirkd/train_scripts/train_kd/train_cwd.sh
# TEACHER defaults to $SAVE_DIR/deeplabv3_resnet101_citys_best_model.pth (train_baseline/citys/deeplabv3_res101.sh). Checkpoints go to $SAVE_DIR/cwd/.
# Settings of cirkd/train_scripts/common.sh (NPROC, SAVE_DIR, LOG_DIR, SEGKD_DEMO=1).
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

cityscapes_baseline cwd --lambda-kd 1 --lambda-d 0.1 --lambda-adv 0.001 --lambda-cwd-fea 50 --lambda-cwd-logit 3 -- "$@"
