"""Classification metrics for fine-tuning and probing, through the packaged ``evaluate`` module.

The metric lives in ``ultrasound_classification/`` beside this file and is loaded by path, so it
works offline (``evaluate.load("accuracy")`` would fetch a script from the Hub). See its module
docstring for how classes absent from a split are handled.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np

METRIC_DIR = Path(__file__).parent / "ultrasound_classification"


@functools.cache
def load_classification_metric():
    """Return the packaged ``ultrasound_classification`` metric (an ``evaluate.Metric``), loaded by path."""
    import evaluate

    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def classification_report(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """All metrics (incl. confusion matrix and per-class AUROC) of class ``probabilities`` against ``labels``."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return load_classification_metric().compute(
        predictions=probabilities.argmax(axis=-1),
        references=np.asarray(labels),
        prediction_scores=probabilities,
    )


def compute_metrics(eval_prediction) -> dict[str, float]:
    """``Trainer(compute_metrics=...)`` hook: the scalar metrics of an ``EvalPrediction`` of logits."""
    logits = eval_prediction.predictions
    if isinstance(logits, tuple):
        logits = logits[0]
    report = classification_report(softmax(logits), eval_prediction.label_ids)
    return {name: value for name, value in report.items() if isinstance(value, float)}


def json_ready(value: Any) -> Any:
    """Replace NaN by ``None`` (JSON ``null``) recursively, so undefined metrics stay valid JSON."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
