#!/usr/bin/env bash
# SKD journal code: Cityscapes test-set predictions of the released student (specs/ifvd_skd.md §B.2.4).
# Arguments given to this script are appended, so they override the original flags.
# Environment: CITYSCAPES (data root, default ../cityscapes), PYTHON (interpreter, default python3).
# Unlike the original, the script does not set CUDA_VISIBLE_DEVICES='3' (skd/README.md, Deviations).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"${PYTHON:-python3}" "$HERE/test.py" --resume-from ./ckpt/CS_scenes_39326_0.75.pth \
    --data-dir "${CITYSCAPES:-../cityscapes}" "$@"
