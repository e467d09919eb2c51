"""The packaged evaluate metric against scikit-learn on fixed predictions, incl. a class absent from a split."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from usfmae_hf.evaluation.metrics import (
    classification_report,
    compute_metrics,
    json_ready,
    load_classification_metric,
    softmax,
)


@pytest.fixture(scope="module")
def three_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=60)
    logits = rng.normal(size=(60, 3)) + 2.0 * np.eye(3)[labels]
    return labels, softmax(logits)


def test_matches_scikit_learn_multiclass(three_class):
    labels, probs = three_class
    preds = probs.argmax(1)
    result = classification_report(probs, labels)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    assert result["f1_macro"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))
    assert result["f1_weighted"] == pytest.approx(skm.f1_score(labels, preds, average="weighted"))
    assert result["precision_macro"] == pytest.approx(skm.precision_score(labels, preds, average="macro"))
    assert result["recall_macro"] == pytest.approx(skm.recall_score(labels, preds, average="macro"))
    assert result["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, preds))
    assert result["cohen_kappa"] == pytest.approx(skm.cohen_kappa_score(labels, preds))
    assert result["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert result["confusion_matrix"] == skm.confusion_matrix(labels, preds).tolist()
    assert result["roc_auc_undefined_classes"] == []
    assert 0.5 < result["accuracy"] < 1.0  # a non-degenerate fixture


def test_binary_auroc_uses_positive_class_probability():
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    p1 = np.array([0.1, 0.6, 0.7, 0.4, 0.3, 0.9, 0.55, 0.2])
    result = classification_report(np.stack([1 - p1, p1], 1), labels)
    assert result["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, p1))
    assert result["f1_macro"] == pytest.approx(skm.f1_score(labels, (p1 > 0.5).astype(int), average="macro"))


def test_class_absent_from_references_is_explicit(three_class):
    labels, probs = three_class
    keep = labels != 2  # class 2 missing from this "fold", but the model still scores it
    labels, probs = labels[keep], probs[keep]
    preds = probs.argmax(1)
    result = classification_report(probs, labels)
    assert math.isnan(result["roc_auc"])
    assert result["roc_auc_undefined_classes"] == [2]
    assert math.isnan(result["roc_auc_per_class"][2])
    expected_defined = np.mean([skm.roc_auc_score(labels == k, probs[:, k]) for k in (0, 1)])
    assert result["roc_auc_macro_defined"] == pytest.approx(expected_defined)
    assert result["f1_macro"] == pytest.approx(skm.f1_score(labels, preds, average="macro", zero_division=0))
    assert np.asarray(result["confusion_matrix"]).shape == (3, 3)
    assert result["support"][2] == 0
    # NaN becomes null so all_results.json stays valid JSON
    assert json.loads(json.dumps(json_ready(result), allow_nan=False))["roc_auc"] is None


def test_bad_inputs_are_refused():
    metric = load_classification_metric()
    with pytest.raises(ValueError, match="probabilities"):
        metric.compute(predictions=[0, 1], references=[0, 1], prediction_scores=[[2.0, 1.0], [0.0, 3.0]])
    with pytest.raises(ValueError, match="class indices"):
        metric.compute(predictions=[0, 3], references=[0, 1], prediction_scores=[[0.5, 0.5], [0.5, 0.5]])


def test_compute_metrics_for_trainer_returns_scalars(three_class):
    from transformers import EvalPrediction

    labels, probs = three_class
    logits = np.log(probs)
    scalars = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert all(isinstance(v, float) for v in scalars.values())
    assert scalars["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr"))
    assert "confusion_matrix" not in scalars
