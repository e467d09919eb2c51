"""Checks of segmentation-metric inputs, and the conventions every segmentation metric shares.

Label maps are ``H x W`` integer arrays of label ids ``0..num_labels-1`` (``0`` = background), one per
image; pixels whose reference is ``ignore_index`` count nowhere. Unnamed labels are called
``background, class_1, ...``, and a mean over nothing is ``None``, never NaN. Used by
:mod:`usfmae_hf.evaluation.segmentation_metrics` (Dice, IoU, HD95) and
:mod:`usfmae_hf.evaluation.instance_metrics` (mask mAP).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def default_label_names(num_labels: int) -> list[str]:
    """``["background", "class_1", ...]``: the names used when none are given."""
    return ["background"] + [f"class_{index}" for index in range(1, num_labels)]


def checked_label_maps(
    prediction: np.ndarray, reference: np.ndarray, num_labels: int, ignore_index: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer label maps of one image and the mask of its pixels that count; ValueError on bad input."""
    if num_labels < 2:
        raise ValueError(f"num_labels must be at least 2 (background and one class), got {num_labels}")
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    for name, array in (("prediction", prediction), ("reference", reference)):
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"each {name} must be an H x W integer label map, got {array.dtype} {array.shape}")
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} of an image differ")
    prediction, reference = prediction.astype(np.int64), reference.astype(np.int64)
    valid = reference != ignore_index if ignore_index is not None else np.ones(reference.shape, dtype=bool)
    for name, values in (("prediction", prediction), ("reference", reference[valid])):
        if values.size and (values.min() < 0 or values.max() >= num_labels):
            raise ValueError(
                f"{name} labels must lie in [0, {num_labels}) (or be ignore_index={ignore_index} in a reference), "
                f"got {values.min()}..{values.max()}"
            )
    return prediction, reference, valid


def check_lengths(predictions: Sequence, references: Sequence, extra: Sequence | None, extra_name: str) -> None:
    """ValueError unless there is one reference (and one ``extra_name`` item, if given) per prediction."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if extra is not None and len(extra) != len(references):
        raise ValueError(f"{len(extra)} {extra_name} for {len(references)} images")


def checked_label_names(label_names: Sequence[str] | None, num_labels: int) -> list[str]:
    """``label_names`` as strings (default: :func:`default_label_names`); ValueError unless ``num_labels`` distinct."""
    names = default_label_names(num_labels) if label_names is None else [str(name) for name in label_names]
    if len(names) != num_labels or len(set(names)) != num_labels:
        raise ValueError(f"label_names must be {num_labels} distinct names, got {names}")
    return names


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of ``values``; ``None`` when there are none."""
    return float(np.mean(values)) if len(values) else None
