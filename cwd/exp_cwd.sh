#!/usr/bin/env bash
# CWD launcher (specs/cwd.md §2): the original eight positional arguments and run-folder naming.
#
#   bash cwd/exp_cwd.sh NORM DIVERGENCE WEIGHT TEMPERATURE KD ADV FEAT VERSION [train.py flags...]
#   e.g. bash cwd/exp_cwd.sh channel kl 3 4 False False False v1      (CWD on the logits)
#        bash cwd/exp_cwd.sh channel kl 3 4 True True False v1        (+ pixel KD + GAN)
#
# Trains into ckpt/<KD>_<ADV>_<FEAT>_<NORM>_<DIV>_<WEIGHT>_<T>_<VERSION>/ (or where --save-dir /
# --save-name among the train.py flags put it) and then evaluates the last
# student checkpoint with val.py into test.out and results.json there (the original had that val line
# commented out). The dataset root comes from $CITYSCAPES (default ./demo_data/cityscapes when
# SEGKD_DEMO=1); $PYTHON picks the interpreter (default: python), $LAUNCHER the training launcher
# (default: $PYTHON; e.g. LAUNCHER="torchrun --nproc_per_node=8"). Flags after the eighth argument go to
# train.py (e.g. --device cpu).
set -euo pipefail

usage() {
    echo "error: $1" >&2
    echo "usage: bash cwd/exp_cwd.sh NORM DIVERGENCE WEIGHT TEMPERATURE KD ADV FEAT VERSION [train.py flags...]" >&2
    echo "  NORM: channel | spatial | channel_mean | none    DIVERGENCE: kl | mse" >&2
    echo "  WEIGHT, TEMPERATURE: numbers    KD, ADV, FEAT: True | False    VERSION: run tag (no '/')" >&2
    echo "  example: CITYSCAPES=/data/cityscapes bash cwd/exp_cwd.sh channel kl 3 4 False False False v1" >&2
    exit 2
}

is_bool() { [[ "${1,,}" =~ ^(yes|true|t|y|1|no|false|f|n|0)$ ]]; }
is_number() { [[ "$1" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; }

[ $# -ge 8 ] || usage "expected 8 positional arguments, got $#"
NORM=$1
DIVERGENCE=$2
WEIGHT=$3
TEMPERATURE=$4
KD=$5
ADV=$6
FEAT=$7
VERSION=$8
shift 8

[[ "$NORM" =~ ^(channel|spatial|channel_mean|none)$ ]] || usage "NORM (1st argument) must be channel, spatial, channel_mean or none, got '$NORM'"
[[ "$DIVERGENCE" =~ ^(kl|mse)$ ]] || usage "DIVERGENCE (2nd argument) must be kl or mse, got '$DIVERGENCE'"
is_number "$WEIGHT" || usage "WEIGHT (3rd argument) must be a non-negative number, got '$WEIGHT'"
is_number "$TEMPERATURE" || usage "TEMPERATURE (4th argument) must be a positive number, got '$TEMPERATURE'"
is_bool "$KD" || usage "KD (5th argument) must be True or False, got '$KD'"
is_bool "$ADV" || usage "ADV (6th argument) must be True or False, got '$ADV'"
is_bool "$FEAT" || usage "FEAT (7th argument) must be True or False, got '$FEAT'"
[[ -n "$VERSION" && "$VERSION" != */* ]] || usage "VERSION (8th argument) must be a non-empty tag without '/', got '$VERSION'"

if [ -z "${CITYSCAPES:-}" ]; then
    if [ -n "${SEGKD_DEMO:-}" ] && [ "${SEGKD_DEMO}" != "0" ]; then
        CITYSCAPES=./demo_data/cityscapes
    else
        usage "CITYSCAPES is not set; export CITYSCAPES=/path/to/cityscapes (the folder with leftImg8bit/ and gtFine/)"
    fi
fi
[ -d "$CITYSCAPES" ] || usage "the dataset root CITYSCAPES=$CITYSCAPES does not exist"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-$PYTHON}
NAME=${KD}_${ADV}_${FEAT}_${NORM}_${DIVERGENCE}_${WEIGHT}_${TEMPERATURE}_${VERSION}
# train.py takes the last --save-dir / --save-name given; the evaluation below looks where it saved
SAVE_DIR=ckpt
RUN_NAME=$NAME
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[i]}" in
        --save-dir) SAVE_DIR=${ARGS[i + 1]:-$SAVE_DIR} ;;
        --save-dir=*) SAVE_DIR=${ARGS[i]#--save-dir=} ;;
        --save-name) RUN_NAME=${ARGS[i + 1]:-$RUN_NAME} ;;
        --save-name=*) RUN_NAME=${ARGS[i]#--save-name=} ;;
    esac
done
RUN=$SAVE_DIR/$RUN_NAME

$LAUNCHER "$HERE/train.py" --kd "$KD" --adv "$ADV" --cwd True --cwd-feat "$FEAT" --temperature "$TEMPERATURE" \
    --norm-type "$NORM" --divergence "$DIVERGENCE" --lambda-cwd "$WEIGHT" --data-dir "$CITYSCAPES" \
    --save-name "$NAME" --gpu 0 "$@"

LAST=-1
for f in "$RUN"/city_*_G.pth; do
    [ -e "$f" ] || continue
    n=${f##*/city_}
    n=${n%_G.pth}
    if [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -gt "$LAST" ]; then LAST=$n; fi
done
[ "$LAST" -ge 0 ] || { echo "error: no student checkpoint $RUN/city_*_G.pth after training" >&2; exit 1; }
$PYTHON "$HERE/val.py" --data-dir "$CITYSCAPES" --restore-from "$RUN/city_${LAST}_G.pth" --gpu 0 \
    > "$RUN/test.out"
echo "val: $RUN/test.out, $RUN/results.json"
tail -n 6 "$RUN/test.out"
