"""Classification metrics for downstream ultrasound tasks, as an ``evaluate`` module.

Load it by path, which works offline: ``evaluate.load(str(Path(usfmae_hf.evaluation.metrics.__file__).parent /
"ultrasound_classification"))`` or simply ``usfmae_hf.evaluation.metrics.load_classification_metric()``.
Every number is computed by scikit-learn; this module only decides which classes enter each figure and
makes undefined figures explicit.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
from sklearn import metrics as skm

_DESCRIPTION = """\
Accuracy, balanced accuracy, macro and weighted F1 / precision / recall, Matthews correlation
coefficient, Cohen's kappa, the confusion matrix and, when class probabilities are given, AUROC
(binary, or one-vs-rest macro for more than two classes), all via scikit-learn.

Classes absent from the references (e.g. a rare class missing from a cross-validation fold, or a
patient-level validation split that holds a single class) are listed in ``absent_classes``; callers
must flag them, because the averaged figures then cover fewer classes than the task has:
* F1, precision and recall average over the classes present in the references or predictions
  (scikit-learn's default; a class neither present nor predicted has no defined score), listed in
  ``macro_average_classes``; ``zero_division=0``. A model that always predicts the one present class
  of a single-class split scores macro F1 1.0 over that one class.
* Balanced accuracy averages recall over the classes present in the references only.
* The confusion matrix is always ``num_classes x num_classes`` (rows = references).
* AUROC of a class is undefined when the references hold no positive or no negative of it. Its
  entry of ``roc_auc_per_class`` is then NaN and listed in ``roc_auc_undefined_classes``; ``roc_auc``
  is NaN whenever any class is undefined (never an average silently taken over fewer classes), and
  ``roc_auc_macro_defined`` is the mean over the classes where it is defined (NaN if there are none).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class indices.
    references (`list` of `int`): true class indices.
    prediction_scores (`list` of `list` of `float`, optional): class probabilities, shape
        (n_samples, num_classes), rows summing to 1 (softmax of logits). Enables the AUROC figures.
    num_classes (`int`, optional): number of classes; defaults to the width of `prediction_scores`,
        else to 1 + the largest index seen.
Returns:
    accuracy, balanced_accuracy, f1_macro, f1_weighted, precision_macro, precision_weighted,
    recall_macro, recall_weighted, mcc, cohen_kappa (floats); confusion_matrix (list of lists);
    support (per-class reference counts); absent_classes (class indices with no reference);
    macro_average_classes (class indices the macro averages cover); num_samples; and with scores: roc_auc,
    roc_auc_macro_defined (floats, NaN when undefined), roc_auc_per_class (list),
    roc_auc_undefined_classes (list of class indices).
Examples:
    >>> metric = evaluate.load("usfmae_hf/metrics/ultrasound_classification")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"]
    0.6666666666666666
"""

_CITATION = """\
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class UltrasoundClassification(evaluate.Metric):
    """Multi-class classification metrics with explicit handling of classes absent from a split."""

    def _info(self) -> evaluate.MetricInfo:
        labels = {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({**labels, "prediction_scores": datasets.Sequence(datasets.Value("float64"))}),
                datasets.Features(labels),
            ],
            reference_urls=["https://scikit-learn.org/stable/api/sklearn.metrics.html"],
        )

    def _compute(self, predictions, references, prediction_scores=None, num_classes: int | None = None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        scores = None if prediction_scores is None else np.asarray(prediction_scores, dtype=np.float64)
        num_classes = _num_classes(predictions, references, scores, num_classes)
        all_classes = list(range(num_classes))

        result = {
            "accuracy": skm.accuracy_score(references, predictions),
            "balanced_accuracy": skm.balanced_accuracy_score(references, predictions),
            "mcc": skm.matthews_corrcoef(references, predictions),
            "cohen_kappa": skm.cohen_kappa_score(references, predictions),
        }
        for average in ("macro", "weighted"):
            precision, recall, f1, _ = skm.precision_recall_fscore_support(
                references, predictions, average=average, zero_division=0
            )
            result.update({f"f1_{average}": f1, f"precision_{average}": precision, f"recall_{average}": recall})
        result = {name: float(value) for name, value in result.items()}
        result["confusion_matrix"] = skm.confusion_matrix(references, predictions, labels=all_classes).tolist()
        result["support"] = np.bincount(references, minlength=num_classes).tolist()
        result["absent_classes"] = [index for index, count in enumerate(result["support"]) if count == 0]
        result["macro_average_classes"] = np.union1d(references, predictions).tolist()
        result["num_samples"] = int(len(references))
        if scores is not None:
            result.update(_roc_auc(references, scores))
        return result


def _num_classes(
    predictions: np.ndarray, references: np.ndarray, scores: np.ndarray | None, num_classes: int | None
) -> int:
    """Resolve and check the number of classes against every input."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if len(references) == 0:
        raise ValueError("no samples to evaluate")
    if scores is not None:
        if scores.ndim != 2 or len(scores) != len(references):
            raise ValueError(f"prediction_scores must have shape (n_samples, num_classes), got {scores.shape}")
        if num_classes is not None and scores.shape[1] != num_classes:
            raise ValueError(f"prediction_scores has {scores.shape[1]} columns but num_classes={num_classes}")
        if not np.allclose(scores.sum(axis=1), 1.0, atol=1e-3) or (scores < 0).any():
            raise ValueError("prediction_scores must be class probabilities (non-negative rows summing to 1)")
        num_classes = scores.shape[1]
    elif num_classes is None:
        num_classes = int(max(predictions.max(), references.max())) + 1
    for name, values in (("predictions", predictions), ("references", references)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{name} must be class indices in [0, {num_classes}), got {values.min()}..{values.max()}")
    return num_classes


def _roc_auc(references: np.ndarray, scores: np.ndarray) -> dict:
    """One-vs-rest AUROC per class; NaN (and listed) for a class whose AUROC is undefined in this split."""
    per_class = []
    for index in range(scores.shape[1]):
        positives = references == index
        defined = positives.any() and not positives.all()
        per_class.append(float(skm.roc_auc_score(positives, scores[:, index])) if defined else float("nan"))
    per_class_array = np.asarray(per_class)
    undefined = [index for index, value in enumerate(per_class) if np.isnan(value)]
    defined_values = per_class_array[~np.isnan(per_class_array)]
    return {
        # With two classes the one-vs-rest AUROCs of both classes equal the binary AUROC.
        "roc_auc": float(per_class_array.mean()) if not undefined else float("nan"),
        "roc_auc_macro_defined": float(defined_values.mean()) if len(defined_values) else float("nan"),
        "roc_auc_per_class": per_class,
        "roc_auc_undefined_classes": undefined,
    }
