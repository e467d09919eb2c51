"""The packaged evaluate metric against scikit-learn on fixed predictions, incl. classes absent from a split."""

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
    assert result["support"][2] == 0 and result["absent_classes"] == [2]
    # macro_average_classes names exactly the classes scikit-learn's macro F1 averaged over
    covered = result["macro_average_classes"]
    assert result["f1_macro"] == pytest.approx(skm.f1_score(labels, preds, labels=covered, average="macro"))
    # NaN becomes null so all_results.json stays valid JSON
    assert json.loads(json.dumps(json_ready(result), allow_nan=False))["roc_auc"] is None


def test_single_class_split_is_flagged_not_read_as_perfect(tmp_path, caplog):
    from usfmae_hf.evaluation.reporting import evaluate_split, flatten_results, write_results

    labels = np.zeros(5, dtype=int)  # e.g. a patient-level validation split holding only benign images
    probabilities = np.tile([0.8, 0.2], (5, 1))  # a model that always predicts the one present class
    report = evaluate_split(
        tmp_path,
        "validation",
        probabilities=probabilities,
        labels=labels,
        ids=[str(i) for i in range(5)],
        label_names=["benign", "malignant"],
    )
    assert report["f1_macro"] == skm.f1_score(labels, np.zeros(5, dtype=int), average="macro") == 1.0
    assert report["absent_classes"] == [1] and report["macro_average_classes"] == [0]
    assert math.isnan(report["roc_auc"])
    (warning,) = report["warnings"]
    assert "no images of class(es) ['malignant']" in warning and "always predicts 'benign'" in warning
    assert "WARNING: " + warning in caplog.text
    assert report["headline"] == "accuracy 1.000, macro F1 1.000 over benign only (ABSENT: malignant), AUROC undefined"
    saved = json.loads(write_results(tmp_path, flatten_results("validation", report)).read_text())
    assert saved["validation_warnings"] == [warning] and saved["validation_headline"] == report["headline"]


def test_a_split_with_every_class_has_no_warning(tmp_path, three_class):
    from usfmae_hf.evaluation.reporting import evaluate_split

    labels, probs = three_class
    ids = [str(i) for i in range(len(labels))]
    report = evaluate_split(tmp_path, "test", probabilities=probs, labels=labels, ids=ids, label_names=["a", "b", "c"])
    assert report["warnings"] == [] and report["absent_classes"] == []
    assert report["headline"] == (
        f"accuracy {skm.accuracy_score(labels, probs.argmax(1)):.3f}, "
        f"macro F1 {skm.f1_score(labels, probs.argmax(1), average='macro'):.3f}, "
        f"AUROC {skm.roc_auc_score(labels, probs, multi_class='ovr'):.3f}"
    )


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
