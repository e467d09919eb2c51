"""k-fold summaries with confidence intervals that stay inside each metric's range.

Two intervals, both reported with their method:

* ``ci_low``/``ci_high``: a percentile bootstrap of the metric on the out-of-fold predictions of all
  folds pooled, resampling patients where they are known (all images of a patient move together) and
  images otherwise, and leaving out resamples that lack a class. Every resample's value is a value of
  the metric, so the interval lies inside the metric's range however few images there are. It measures
  how much the score depends on which images (patients) were evaluated, not how much it varies between
  trainings; and it has zero width when every resample scores the same (e.g. a perfect score), which
  is no sign of certainty.
* ``fold_ci_low``/``fold_ci_high``: a Student-t interval of the fold mean on the logit scale of the
  metric's range, mapped back, so it too stays inside the range; it needs at least 3 folds (a
  t-interval on 2 values spans far beyond [0, 1]) and no fold on the range's bound (infinite logit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from usfmae_hf.evaluation.reporting import read_predictions

SUMMARY_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "f1_weighted",
    "precision_macro",
    "recall_macro",
    "roc_auc",
    "mcc",
    "cohen_kappa",
)
# The range of each metric; the others lie in [0, 1].
METRIC_RANGES = {"mcc": (-1.0, 1.0), "cohen_kappa": (-1.0, 1.0)}
# Dataset columns holding patient ids (BUS-BRA's adapter calls it ``case``).
PATIENT_COLUMNS = ("patient", "case")
MIN_FOLDS_FOR_FOLD_CI = 3


@dataclass(frozen=True)
class PooledPredictions:
    """Out-of-fold predictions of every fold together; ``clusters`` are the units the bootstrap resamples."""

    labels: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray
    clusters: np.ndarray
    unit: str  # "patients" or "images"


def pool_predictions(paths: Sequence[str | Path], patients: Mapping[str, str] | None = None) -> PooledPredictions:
    """Pool the ``{split}_predictions.csv`` files of the folds; resample by ``patients`` (image id -> patient).

    Without ``patients`` the units are image ids, so an image scored in several folds (e.g. in
    overlapping validation splits) is still resampled as one unit.
    """
    parts = [read_predictions(path) for path in paths]
    ids = np.concatenate([part["id"] for part in parts])
    if patients is not None:
        missing = sorted(set(ids.tolist()) - set(patients))
        if missing:
            raise ValueError(f"no patient id for image(s) {missing[:3]}")
        ids = np.asarray([patients[image_id] for image_id in ids])
    return PooledPredictions(
        labels=np.concatenate([part["label"] for part in parts]),
        predictions=np.concatenate([part["prediction"] for part in parts]),
        probabilities=np.concatenate([part["probabilities"] for part in parts]),
        clusters=np.unique(ids, return_inverse=True)[1],
        unit="patients" if patients is not None else "images",
    )


def resampled_metrics(
    weights: np.ndarray, labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray
) -> dict[str, np.ndarray]:
    """Every ``SUMMARY_METRICS`` entry for each row of ``weights`` (resamples x samples: how often each sample
    is drawn), as the packaged metric defines it (scikit-learn's conventions); NaN where undefined."""
    num_classes = probabilities.shape[1]
    cells = np.zeros((len(labels), num_classes * num_classes))
    cells[np.arange(len(labels)), labels * num_classes + predictions] = 1.0
    confusion = (weights @ cells).reshape(len(weights), num_classes, num_classes)
    total = confusion.sum(axis=(1, 2))
    true = confusion.sum(axis=2)
    predicted = confusion.sum(axis=1)
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    covered = (true + predicted) > 0  # the classes scikit-learn's macro averages cover
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        recall = np.where(true > 0, hits / true, 0.0)
        f1 = np.where(covered, 2 * hits / (true + predicted), 0.0)
        chance = (true * predicted).sum(axis=1) / total**2
        accuracy = hits.sum(axis=1) / total
        correlation_denominator = (total**2 - (predicted**2).sum(1)) * (total**2 - (true**2).sum(1))
        mcc = np.where(
            correlation_denominator > 0,
            (hits.sum(1) * total - (true * predicted).sum(1)) / np.sqrt(correlation_denominator),
            0.0,
        )
        return {
            "accuracy": accuracy,
            "balanced_accuracy": np.where(true > 0, recall, 0).sum(1) / (true > 0).sum(1),
            "f1_macro": (f1 * covered).sum(1) / covered.sum(1),
            "f1_weighted": (f1 * true).sum(1) / total,
            "precision_macro": (precision * covered).sum(1) / covered.sum(1),
            "recall_macro": (recall * covered).sum(1) / covered.sum(1),
            "roc_auc": np.mean([_auroc(weights, labels == k, probabilities[:, k]) for k in range(num_classes)], 0),
            "mcc": mcc,
            "cohen_kappa": np.where(chance < 1, (accuracy - chance) / (1 - chance), np.nan),
        }


def _auroc(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC per resample (Mann-Whitney with ties counted half); NaN without positives or negatives."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    weights = weights[:, order]
    positives = np.add.reduceat(weights * positive[order], starts, axis=1)
    negatives = np.add.reduceat(weights * ~positive[order], starts, axis=1)
    below = np.cumsum(negatives, axis=1) - negatives
    with np.errstate(divide="ignore", invalid="ignore"):
        area = (positives * (below + 0.5 * negatives)).sum(1) / (positives.sum(1) * negatives.sum(1))
    return np.where((positives.sum(1) > 0) & (negatives.sum(1) > 0), area, np.nan)


def bootstrap_metrics(
    pooled: PooledPredictions, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Percentile-bootstrap interval of each metric on ``pooled``: ``{metric: {estimate, ci_low, ci_high,
    n_undefined}}``.

    Each resample draws ``len(unique clusters)`` clusters with replacement, as
    ``numpy.random.default_rng(seed).integers(0, n_clusters, (n_resamples, n_clusters))``, and keeps
    every sample of a drawn cluster. Resamples that lack a class of ``pooled.labels`` (whose averages
    would cover fewer classes, e.g. balanced accuracy 1.0 for always predicting the one class left) and
    resamples where the metric is undefined are left out and counted in ``n_undefined``.
    """
    n_clusters = int(pooled.clusters.max()) + 1
    draws = np.random.default_rng(seed).integers(0, n_clusters, (n_resamples, n_clusters))
    offsets = (draws + n_clusters * np.arange(n_resamples)[:, None]).ravel()
    counts = np.bincount(offsets, minlength=n_resamples * n_clusters).reshape(n_resamples, n_clusters)
    inputs = (pooled.labels, pooled.predictions, pooled.probabilities)
    estimates = resampled_metrics(np.ones((1, len(pooled.labels))), *inputs)
    weights = counts[:, pooled.clusters].astype(np.float64)
    resampled = resampled_metrics(weights, *inputs)
    classes = np.unique(pooled.labels)
    complete = (weights @ (pooled.labels[:, None] == classes) > 0).all(axis=1)
    alpha = (1 - confidence) / 2
    summary = {}
    for metric in SUMMARY_METRICS:
        values = resampled[metric][complete & ~np.isnan(resampled[metric])]
        estimate = float(estimates[metric][0])
        defined = len(values) > 0 and not math.isnan(estimate)
        summary[metric] = {
            "estimate": estimate,
            "ci_low": float(np.quantile(values, alpha)) if defined else None,
            "ci_high": float(np.quantile(values, 1 - alpha)) if defined else None,
            "n_undefined": int(n_resamples - len(values)),
        }
    return summary


def fold_interval(
    values: Sequence[float], bounds: tuple[float, float] = (0.0, 1.0), confidence: float = 0.95
) -> tuple[float, float] | None:
    """Student-t interval of the mean of the folds' logit-transformed ``values`` (rescaled from ``bounds`` to
    [0, 1]), mapped back into ``bounds``; ``None`` with fewer than 3 folds or a fold on a bound."""
    from scipy import special, stats

    low, high = bounds
    unit = (np.asarray(values, dtype=np.float64) - low) / (high - low)
    if len(unit) < MIN_FOLDS_FOR_FOLD_CI or (unit <= 0).any() or (unit >= 1).any():
        return None
    logits = special.logit(unit)
    half = stats.t.ppf((1 + confidence) / 2, df=len(unit) - 1) * logits.std(ddof=1) / math.sqrt(len(unit))
    ends = special.expit([logits.mean() - half, logits.mean() + half])
    return float(low + (high - low) * ends[0]), float(low + (high - low) * ends[1])


def summarize_folds(
    fold_results: Mapping[str, Mapping[str, Any]],
    pooled: PooledPredictions,
    *,
    split: str = "test",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Summarise ``{split}_{metric}`` over folds (``{fold name: flat results}``) and bootstrap the pooled predictions.

    Per metric: ``mean``, ``std`` (ddof=1), ``n``, ``n_undefined`` and ``values`` over folds (a fold whose
    metric is undefined, e.g. AUROC with a class absent, is left out and counted, never averaged as a
    number); ``fold_ci_low``/``fold_ci_high`` (:func:`fold_interval`); ``pooled`` (the metric on all
    pooled predictions) with its bootstrap ``ci_low``/``ci_high`` and ``bootstrap_undefined``
    (:func:`bootstrap_metrics`). ``warnings`` collects the folds' ``{split}_warnings``.
    """
    bootstrap = bootstrap_metrics(pooled, n_resamples=n_resamples, confidence=confidence, seed=seed)
    summary: dict[str, Any] = {}
    for metric in SUMMARY_METRICS:
        raw = [result.get(f"{split}_{metric}") for result in fold_results.values()]
        values = [float(v) for v in raw if v is not None and not math.isnan(v)]
        interval = fold_interval(values, METRIC_RANGES.get(metric, (0.0, 1.0)), confidence)
        summary[metric] = {
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values),
            "n_undefined": len(raw) - len(values),
            "values": values,
            "fold_ci_low": interval[0] if interval else None,
            "fold_ci_high": interval[1] if interval else None,
            "pooled": bootstrap[metric]["estimate"],
            "ci_low": bootstrap[metric]["ci_low"],
            "ci_high": bootstrap[metric]["ci_high"],
            "bootstrap_undefined": bootstrap[metric]["n_undefined"],
        }
    n_clusters = int(pooled.clusters.max()) + 1
    summary.update(
        split=split,
        confidence=confidence,
        n_pooled=len(pooled.labels),
        resampled_unit=pooled.unit,
        n_resampled_units=n_clusters,
        n_resamples=n_resamples,
        seed=seed,
        ci_method=(
            f"percentile bootstrap over the {len(pooled.labels)} pooled out-of-fold {split} predictions, "
            f"resampling {n_clusters} {pooled.unit} ({n_resamples} resamples, seed {seed}; resamples lacking a "
            "class are left out and counted in bootstrap_undefined)"
        ),
        fold_ci_method=(
            "Student-t interval of the fold mean on the logit scale of the metric's range ('-' where a fold "
            "sits on the range's bound)"
            if len(fold_results) >= MIN_FOLDS_FOR_FOLD_CI
            else f"none: a confidence interval over {len(fold_results)} fold(s) is not meaningful "
            f"(needs >= {MIN_FOLDS_FOR_FOLD_CI}); use the bootstrap CI"
        ),
        warnings=[
            f"fold {fold}: {warning}"
            for fold, result in fold_results.items()
            for warning in result.get(f"{split}_warnings") or []
        ],
    )
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """A plain-text table: fold mean +- std, fold CI, pooled value and its bootstrap CI; then methods and warnings."""
    percent = f"{summary['confidence'] * 100:g}%"
    lines = [
        f"{'metric':<18} {'fold mean':>9} {'std':>7}  {'fold ' + percent + ' CI':<17} {'pooled':>7}  "
        f"{'bootstrap ' + percent + ' CI':<17} folds"
    ]
    for metric in SUMMARY_METRICS:
        row = summary[metric]
        lines.append(
            f"{metric:<18} {_number(row['mean']):>9} {_number(row['std']):>7}  "
            f"{_interval(row['fold_ci_low'], row['fold_ci_high']):<17} {_number(row['pooled']):>7}  "
            f"{_interval(row['ci_low'], row['ci_high']):<17} {row['n']}"
        )
    lines.append(f"({summary['split']} split) bootstrap CI: {summary['ci_method']}")
    lines.append(f"fold CI: {summary['fold_ci_method']}")
    bounds = [
        (summary[m][f"{kind}_low"], summary[m][f"{kind}_high"]) for m in SUMMARY_METRICS for kind in ("ci", "fold_ci")
    ]
    if any(low is not None and low == high for low, high in bounds):
        lines.append(
            "NOTE: a zero-width CI means every resample (or fold) scored the same, e.g. all predictions right; "
            "it is no sign of certainty - evaluate more images."
        )
    lines.extend(f"WARNING: {warning}" for warning in summary["warnings"])
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def _interval(low: float | None, high: float | None) -> str:
    return "-" if low is None else f"[{low:.4f}, {high:.4f}]"
