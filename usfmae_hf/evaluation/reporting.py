"""Evaluation outputs shared by fine-tuning and probing: metrics, predictions CSV, confusion-matrix and ROC plots."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from usfmae_hf.atomic import atomic_write_bytes, atomic_write_text
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.evaluation.metrics import classification_report, json_ready

logger = logging.getLogger(__name__)

RESULTS_FILE = "all_results.json"
# Metrics that go to the model card's model-index: (report key, Hub metric type, display name)
CARD_METRICS = (
    ("f1_macro", "f1", "Macro F1"),
    ("accuracy", "accuracy", "Accuracy"),
    ("balanced_accuracy", "balanced_accuracy", "Balanced accuracy"),
    ("roc_auc", "roc_auc", "AUROC"),
)


def evaluate_split(
    output_dir: str | os.PathLike,
    split: str,
    *,
    probabilities: np.ndarray,
    labels: Sequence[int],
    ids: Sequence[str],
    label_names: Sequence[str],
) -> dict[str, Any]:
    """Score one split and write ``{split}_predictions.csv``, ``{split}_confusion_matrix.png``, ``{split}_roc.png``.

    Returns the full metric report (see :mod:`usfmae_hf.evaluation.metrics`) plus ``headline`` (the
    one-line summary of the plot title) and ``warnings`` (see :func:`absent_class_warnings`; each is also
    logged), so both reach ``all_results.json`` through :func:`flatten_results`.
    """
    output_dir = Path(output_dir)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    report = classification_report(probabilities, labels)
    report["warnings"] = absent_class_warnings(split, report, label_names)
    for warning in report["warnings"]:
        logger.warning("WARNING: %s", warning)
    report["headline"] = headline(report, label_names)
    atomic_write_text(
        output_dir / f"{split}_predictions.csv", _predictions_csv(probabilities, labels, ids, label_names)
    )
    atomic_write_bytes(output_dir / f"{split}_confusion_matrix.png", _confusion_png(report, label_names, split))
    atomic_write_bytes(output_dir / f"{split}_roc.png", _roc_png(probabilities, labels, label_names, report, split))
    return report


def absent_class_warnings(split: str, report: Mapping[str, Any], label_names: Sequence[str]) -> list[str]:
    """A warning when ``split`` lacks a class: its AUROC is undefined and the averages cover fewer classes."""
    absent = [label_names[i] for i in report["absent_classes"]]
    if not absent:
        return []
    present = [name for i, name in enumerate(label_names) if i not in report["absent_classes"]]
    trivial = f" (a model that always predicts {present[0]!r} scores 1.0 on both)" if len(present) == 1 else ""
    return [
        f"the {split} split has no images of class(es) {absent} (present: {present}): AUROC is undefined, and "
        f"macro F1 and balanced accuracy average over fewer classes than the task has{trivial}. Evaluate on a "
        "split that holds every class, e.g. a larger or class-stratified validation split."
    ]


def headline(report: Mapping[str, Any], label_names: Sequence[str]) -> str:
    """``accuracy 0.950, macro F1 0.948, AUROC 0.990``, naming the classes averaged when a class is absent."""
    f1 = f"macro F1 {report['f1_macro']:.3f}"
    if report["absent_classes"]:
        covered = [label_names[i] for i in report["macro_average_classes"]]
        absent = [label_names[i] for i in report["absent_classes"]]
        f1 += f" over {', '.join(covered)} only (ABSENT: {', '.join(absent)})"
    auroc = report.get("roc_auc", math.nan)
    return f"accuracy {report['accuracy']:.3f}, {f1}, AUROC " + ("undefined" if math.isnan(auroc) else f"{auroc:.3f}")


def read_predictions(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``{split}_predictions.csv`` back: ``id``, ``label``, ``prediction`` and ``probabilities`` arrays."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise UsfmaeError(f"{path} holds no predictions; rerun the evaluation that wrote it")
    prob_columns = [name for name in rows[0] if name.startswith("prob_")]
    return {
        "id": np.asarray([row["id"] for row in rows]),
        "label": np.asarray([int(row["label"]) for row in rows]),
        "prediction": np.asarray([int(row["prediction"]) for row in rows]),
        "probabilities": np.asarray([[float(row[name]) for name in prob_columns] for row in rows]),
    }


def flatten_results(split: str, report: Mapping[str, Any]) -> dict[str, Any]:
    """``{split}_{metric}`` keys, as in the Trainer's ``all_results.json``."""
    return {f"{split}_{name}": value for name, value in report.items()}


def write_results(output_dir: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Write ``all_results.json`` (undefined metrics as ``null``, never a bare NaN)."""
    path = Path(output_dir) / RESULTS_FILE
    atomic_write_text(path, json.dumps(json_ready(dict(results)), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def card_results(
    reports: Mapping[str, Mapping[str, Any]],
    dataset: str,
    *,
    metrics: Sequence[tuple[str, str, str]] = CARD_METRICS,
    task: str = "image-classification",
) -> list[dict[str, Any]]:
    """Model-card ``results`` (for ``usfmae_hf.publishing.cards.render_model_card``) from split reports;
    undefined ones skipped. ``metrics`` are ``(report key, Hub metric type, display name)`` triples."""
    results = []
    for split, report in reports.items():
        for key, metric, display in metrics:
            value = report.get(key)
            if value is not None and not np.isnan(value):
                results.append(
                    {
                        "task": task,
                        "dataset": dataset,
                        "split": split,
                        "metric": metric,
                        "metric_name": display,
                        "value": round(float(value), 4),
                    }
                )
    return results


def _predictions_csv(
    probabilities: np.ndarray, labels: np.ndarray, ids: Sequence[str], label_names: Sequence[str]
) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["id", "label", "label_name", "prediction", "prediction_name", *[f"prob_{name}" for name in label_names]]
    )
    for image_id, label, row in zip(ids, labels, probabilities, strict=True):
        prediction = int(row.argmax())
        writer.writerow(
            [image_id, int(label), label_names[label], prediction, label_names[prediction], *[f"{p:.6g}" for p in row]]
        )
    return buffer.getvalue()


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _confusion_png(report: Mapping[str, Any], label_names: Sequence[str], split: str) -> bytes:
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.6 * len(label_names) + 2)
    figure = Figure(figsize=(size, size))
    axes = figure.add_subplot()
    ConfusionMatrixDisplay(np.asarray(report["confusion_matrix"]), display_labels=list(label_names)).plot(
        ax=axes, colorbar=False, xticks_rotation=45
    )
    axes.set_title(f"{split}: {report['headline']}", wrap=True)
    return _png(figure)


def _roc_png(
    probabilities: np.ndarray, labels: np.ndarray, label_names: Sequence[str], report: Mapping[str, Any], split: str
) -> bytes:
    """One-vs-rest ROC curve per class (only the positive class for two classes); undefined classes omitted."""
    from matplotlib.figure import Figure
    from sklearn.metrics import RocCurveDisplay

    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    classes = [1] if len(label_names) == 2 else range(len(label_names))
    for index in classes:
        if index in report["roc_auc_undefined_classes"]:
            continue
        RocCurveDisplay.from_predictions(
            labels == index,
            probabilities[:, index],
            name=str(label_names[index]),
            ax=axes,
            plot_chance_level=index == classes[-1],
        )
    undefined = [label_names[i] for i in report["roc_auc_undefined_classes"]]
    axes.set_title(f"{split} ROC" + (f" (undefined: {', '.join(undefined)})" if undefined else ""))
    return _png(figure)
