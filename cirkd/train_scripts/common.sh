# Shared by the CIRKD scripts (specs/cirkd.md §1.7), sourced, not run. The originals launched 8 processes with
# torch.distributed.launch and hard-coded paths; here:
#   NPROC      processes for torchrun (default: the number of visible GPUs, else 1); the total --batch-size
#              stays 16 and is split over them (as the CIRKD maintainers advise for fewer GPUs); the CIRKD
#              scripts pass --minibatch-group 2, the paper's 2 images per GPU for the mini-batch relation, so
#              they compute the paper's loss on any number of GPUs
#   PYTHON     interpreter (default: python); TORCHRUN (default: "$PYTHON -m torch.distributed.run")
#   SAVE_DIR   checkpoints (default ./runs/cirkd/ckpt); LOG_DIR logs (default ./runs/cirkd/logs)
#   PRETRAINED_DIR  folder of resnet18-imagenet.pth, resnet101-imagenet.pth, mobilenetv2-imagenet.pth
#   dataset roots: CITYSCAPES, VOC, CAMVID, ADE20K, COCO_STUFF
#   SEGKD_DEMO=1    demo preset: a synthetic Cityscapes in ./demo_data/cirkd_cityscapes (made once), random
#              backbone init, SEGKD_DEMO_STEPS (default 200) iterations, crop SEGKD_DEMO_CROP (default "64 128"),
#              batch SEGKD_DEMO_BATCH (default 2), on CPU; flags given to the script still win.
#   SEGKD_DRY_RUN=1 print each command (shell-quoted, one per line) instead of running it
# Extra arguments of a script are passed on to its training entry point (the last occurrence of a flag wins).
set -euo pipefail

CIRKD_SCRIPT=${CIRKD_SCRIPT:-$0}
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-"$PYTHON -m torch.distributed.run"}
SAVE_DIR=${SAVE_DIR:-./runs/cirkd/ckpt}
LOG_DIR=${LOG_DIR:-./runs/cirkd/logs}
CIRKD_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEMO_FLAGS=()

usage() {
    echo "error: $1" >&2
    echo "usage: ${CIRKD_NEEDS:-} [NPROC=n] [SAVE_DIR=...] [LOG_DIR=...] bash $CIRKD_SCRIPT [extra flags]" >&2
    echo "  (or SEGKD_DEMO=1 bash $CIRKD_SCRIPT for the CPU demo on synthetic Cityscapes)" >&2
    exit 2
}

is_demo() { [ -n "${SEGKD_DEMO:-}" ] && [ "${SEGKD_DEMO}" != "0" ]; }

# require VAR "what it is": the path in $VAR must exist (the demo supplies the Cityscapes root itself)
require() {
    local name=$1 what=$2
    CIRKD_NEEDS="${CIRKD_NEEDS:-}$name=<$what> "
    if [ -z "${!name:-}" ]; then
        usage "$name is not set; export $name=<$what>"
    fi
    [ -e "${!name}" ] || usage "$name=${!name} does not exist; export $name=<$what>"
}

# imagenet FILE: the ImageNet backbone file in $PRETRAINED_DIR (None in the demo)
imagenet() {
    if is_demo; then echo None; return; fi
    require PRETRAINED_DIR "folder with $1"
    [ -f "$PRETRAINED_DIR/$1" ] || usage "$PRETRAINED_DIR/$1 does not exist; download $1 (cirkd/README.md: Quick start)"
    echo "$PRETRAINED_DIR/$1"
}

nproc_default() {
    local n=0
    if command -v nvidia-smi > /dev/null 2>&1; then n=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true); fi
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then n=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true); fi
    [ "$n" -gt 0 ] 2> /dev/null && echo "$n" || echo 1
}

if is_demo; then
    if [ -z "${CITYSCAPES:-}" ]; then
        CITYSCAPES=./demo_data/cirkd_cityscapes
        [ -d "$CITYSCAPES/lists" ] || $PYTHON -m common.datasets.synthetic cityscapes "$CITYSCAPES" --train 20 --val 5 \
            --test 5 --size 128x256 > /dev/null
    fi
    read -r -a DEMO_CROP <<< "${SEGKD_DEMO_CROP:-64 128}"
    DEMO_FLAGS=(--train-list "$CITYSCAPES/lists/train.lst" --val-list "$CITYSCAPES/lists/val.lst"
                --max-iterations "${SEGKD_DEMO_STEPS:-200}" --crop-size "${DEMO_CROP[@]}"
                --batch-size "${SEGKD_DEMO_BATCH:-2}" --val-per-iters "${SEGKD_DEMO_STEPS:-200}"
                --save-per-iters "${SEGKD_DEMO_STEPS:-200}" --workers 0 --device cpu)
    SAVE_DIR=${SEGKD_DEMO_SAVE_DIR:-./demo_runs/cirkd/ckpt}
    LOG_DIR=${SEGKD_DEMO_LOG_DIR:-./demo_runs/cirkd/logs}
fi
NPROC=${NPROC:-$(nproc_default)}

# launch SCRIPT.py FLAGS...: torchrun with $NPROC processes (plain python for one)
launch() {
    local entry=$1
    shift
    if [ -n "${SEGKD_DRY_RUN:-}" ] && [ "${SEGKD_DRY_RUN}" != "0" ]; then
        printf '%q ' "$entry" "$@"
        echo
    elif [ "$NPROC" -gt 1 ]; then
        $TORCHRUN --nproc_per_node="$NPROC" "$CIRKD_DIR/$entry" "$@"
    else
        $PYTHON "$CIRKD_DIR/$entry" "$@"
    fi
}

# cityscapes_baseline METHOD WEIGHT_FLAGS... -- USER_FLAGS...: one baseline of the comparison protocol (§3.6):
# DeepLabV3-ResNet101 -> DeepLabV3-ResNet18 and -> DeepLabV3-MobileNetV2 on Cityscapes with the method's weights
# and the CIRKD terms off; TEACHER defaults to the train_baseline teacher, checkpoints go to $SAVE_DIR/METHOD/.
cityscapes_baseline() {
    local method=$1 weights=() student backbone file pretrained
    shift
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do weights+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    is_demo || require CITYSCAPES "Cityscapes root with leftImg8bit/ and gtFine/"
    TEACHER=${TEACHER:-$SAVE_DIR/deeplabv3_resnet101_citys_best_model.pth}
    require TEACHER "DeepLabV3-ResNet101 checkpoint of this dataset"
    for student in "deeplabv3 resnet18 resnet18-imagenet.pth" "deeplab_mobile mobilenetv2 mobilenetv2-imagenet.pth"; do
        read -r student backbone file <<< "$student"
        pretrained=$(imagenet "$file")
        launch train_kd.py --teacher-model deeplabv3 --teacher-backbone resnet101 --student-model "$student" \
            --student-backbone "$backbone" --dataset citys --data "$CITYSCAPES" --teacher-pretrained "$TEACHER" \
            "${weights[@]}" --lambda-minibatch-pixel 0 --lambda-memory-pixel 0 --lambda-memory-region 0 \
            --save-dir "$SAVE_DIR/$method" --log-dir "$LOG_DIR" --student-pretrained-base "$pretrained" \
            "${DEMO_FLAGS[@]}" "$@"
    done
}
