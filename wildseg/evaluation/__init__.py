"""Benchmark evaluation: protocols (`protocols`), class scores from synonyms (`scoring`), the confusion matrix over
a data set (`loop`), saved predictions (`predictions`), reports (`report`) and where the images are segmented
(`runner`)."""

from .loop import Evaluation, SegmenterLike, evaluate
from .predictions import PredictionStore
from .protocols import RunProtocol, dense_protocol, normalization_deviations, padding_deviations, run_protocol
from .report import build_report, load_ids, run_settings
from .runner import Evaluator, LocalEvaluator
from .scoring import (
    PROTOCOLS,
    Query,
    build_query,
    candidate_classes,
    check_dataset,
    class_prediction,
    dense_class_prediction,
)

__all__ = ["PROTOCOLS", "Evaluation", "Evaluator", "LocalEvaluator", "PredictionStore", "Query", "RunProtocol",
           "SegmenterLike", "build_query", "build_report", "candidate_classes", "check_dataset", "class_prediction",
           "dense_class_prediction", "dense_protocol", "evaluate", "load_ids", "normalization_deviations",
           "padding_deviations", "run_protocol", "run_settings"]
