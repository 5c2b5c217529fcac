"""Evaluation: inference modes, dataset-level metrics, prediction PNGs, test export, results.json."""
from common.evaluation.evaluate import EvalResult, evaluate_main, write_results_json
from common.evaluation.export import save_test_prediction, trainid_to_labelid
from common.evaluation.inference import (
    main_logits,
    predict_multiscale,
    predict_sliding,
    predict_whole,
    sliding_grid,
)
from common.evaluation.metrics import ConfusionMatrix, SegmentationMetric
from common.evaluation.palette import (
    CITYSCAPES_COLORS,
    cityscapes_palette,
    get_palette,
    resolve_palette,
    save_prediction_png,
)

__all__ = [
    "CITYSCAPES_COLORS",
    "ConfusionMatrix",
    "EvalResult",
    "SegmentationMetric",
    "cityscapes_palette",
    "evaluate_main",
    "get_palette",
    "main_logits",
    "predict_multiscale",
    "predict_sliding",
    "predict_whole",
    "resolve_palette",
    "save_prediction_png",
    "save_test_prediction",
    "sliding_grid",
    "trainid_to_labelid",
    "write_results_json",
]
