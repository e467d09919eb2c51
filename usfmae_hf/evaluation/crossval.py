"""k-fold summaries: mean, standard deviation and 95% confidence interval of each metric over folds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

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


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean (``mean +- t * s / sqrt(n)``); ``None`` without scipy or with < 2 values."""
    try:
        from scipy import stats
    except ImportError:
        return None
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    half = stats.t.ppf((1 + confidence) / 2, df=len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def summarize_folds(
    fold_results: Sequence[Mapping[str, Any]], *, split: str = "test", confidence: float = 0.95
) -> dict[str, Any]:
    """Summarise ``{split}_{metric}`` over folds: ``{metric: {mean, std, ci_low, ci_high, n, values}}``.

    ``std`` is the sample standard deviation (ddof=1). A fold whose metric is undefined (``None``/NaN,
    e.g. AUROC with a class absent from that fold) is left out of that metric and counted in
    ``n_undefined``, never averaged as a number. Without scipy the interval is ``None`` and
    ``ci_method`` says so.
    """
    summary: dict[str, Any] = {}
    for metric in SUMMARY_METRICS:
        raw = [result.get(f"{split}_{metric}") for result in fold_results]
        values = [float(v) for v in raw if v is not None and not math.isnan(v)]
        if not values:
            continue
        interval = t_interval(values, confidence)
        summary[metric] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "ci_low": interval[0] if interval else None,
            "ci_high": interval[1] if interval else None,
            "n": len(values),
            "n_undefined": len(raw) - len(values),
            "values": values,
        }
    summary["split"] = split
    summary["confidence"] = confidence
    summary["ci_method"] = (
        "student-t (scipy)" if _has_scipy() else "unavailable: install scipy for confidence intervals"
    )
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """A plain-text table: metric, mean +- std, confidence interval, folds."""
    lines = [f"{'metric':<18} {'mean':>8} {'std':>8}  {int(summary['confidence'] * 100)}% CI{'':<12} folds"]
    for metric in SUMMARY_METRICS:
        if metric in summary:
            row = summary[metric]
            std = f"{row['std']:.4f}" if row["std"] is not None else "-"
            ci = f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]" if row["ci_low"] is not None else "-"
            lines.append(f"{metric:<18} {row['mean']:>8.4f} {std:>8}  {ci:<18} {row['n']}")
    lines.append(f"({summary['split']} split; CI: {summary['ci_method']})")
    return "\n".join(lines)


def _has_scipy() -> bool:
    try:
        import scipy  # noqa: F401
    except ImportError:
        return False
    return True
