"""Semantic-segmentation metrics (Dice, IoU, HD95) and instance mask mAP for fine-tuning reports.

Inputs are lists of integer label maps, one ``H x W`` array per image (label ids ``0..num_labels-1``,
``0`` = background); sizes may differ between images, never between the prediction and the reference of
one image. Pixels whose reference equals ``ignore_index`` belong to no class: they are removed from the
prediction and the reference before every figure (confusion counts, surfaces, instances).

Defined values for empty masks, so that nothing undefined is ever averaged silently:

* a class absent from both the reference and the prediction of an image has Dice = IoU = 1.0 there and
  is counted in ``empty``; absent from one of them only, Dice = IoU = 0.0 (``reference_only`` /
  ``prediction_only``);
* HD95 is undefined when either mask is empty: the image is left out of that class's HD95 mean and
  counted in ``hd95_undefined`` (``hd95_mm_undefined`` also counts images without a pixel spacing);
  a class with no defined image has HD95 ``None`` and is left out of the foreground mean. HD95 is not
  computed for background (its surface includes the image frame, which would dominate the figure): it
  is ``None`` in every image.

Summaries are per class (mean over images, plus dataset-level Dice/IoU from pixel counts pooled over
all images) and over the foreground classes ``1..num_labels-1`` (background is reported, never in a
"mean"). Every value is a JSON-serialisable float, int, string, list, dict or ``None``; never NaN.

:func:`segmentation_report` is the one call for a fine-tuning run; :func:`score_images` with
:func:`summarise` and :func:`per_image_rows` gives the summary and a per-image CSV from one scoring
pass. :func:`load_segmentation_metric` returns the same computation as an ``evaluate`` module
(``ultrasound_segmentation/`` beside this file, loaded by path, so it works offline). Instance mask
mAP is :mod:`usfmae_hf.evaluation.instance_metrics`' (its :func:`instance_average_precision` is
importable from here too); the input checks are :mod:`usfmae_hf.evaluation.segmentation_inputs`'.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from usfmae_hf.evaluation.instance_metrics import instance_average_precision
from usfmae_hf.evaluation.segmentation_inputs import (
    check_lengths,
    checked_label_maps,
    checked_label_names,
    default_label_names,
    mean_or_none,
)

__all__ = [
    "METRIC_DIR",
    "ImageScores",
    "Spacing",
    "default_label_names",
    "dice_iou",
    "hd95",
    "instance_average_precision",
    "load_segmentation_metric",
    "per_image_rows",
    "score_images",
    "segmentation_report",
    "summarise",
    "surface",
]

METRIC_DIR = Path(__file__).parent / "ultrasound_segmentation"

#: 4-connected structuring element: a mask pixel is on the surface if one of its 4 neighbours is not
_SURFACE_STRUCTURE = ndimage.generate_binary_structure(2, 1)

Spacing = tuple[float, float] | None


@dataclass(frozen=True)
class ImageScores:
    """Per-class scores of one image; lists are indexed by label id, ``None`` where undefined."""

    confusion: np.ndarray  #: (num_labels, num_labels) pixel counts, rows = reference, columns = prediction
    dice: list[float]
    iou: list[float]
    hd95_px: list[float | None]
    hd95_mm: list[float | None]

    @property
    def in_reference(self) -> np.ndarray:
        """Boolean per class: the class has at least one (non-ignored) reference pixel."""
        return self.confusion.sum(axis=1) > 0

    @property
    def in_prediction(self) -> np.ndarray:
        """Boolean per class: the class has at least one predicted pixel outside ignored pixels."""
        return self.confusion.sum(axis=0) > 0


@functools.cache
def load_segmentation_metric():
    """Return the packaged ``ultrasound_segmentation`` metric (an ``evaluate.Metric``), loaded by path."""
    import evaluate

    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def dice_iou(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Dice and IoU from a confusion matrix; 1.0 for a class absent from both sides."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    total = confusion.sum(axis=0) + confusion.sum(axis=1)  # |P| + |R|
    union = total - true_positive
    empty = total == 0
    dice = np.where(empty, 1.0, 2.0 * true_positive / np.where(empty, 1.0, total))
    iou = np.where(empty, 1.0, true_positive / np.where(empty, 1.0, union))
    return dice, iou


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask: mask pixels with a 4-neighbour outside it (the image edge counts)."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_SURFACE_STRUCTURE, border_value=0)


def hd95(prediction_mask: np.ndarray, reference_mask: np.ndarray, spacing: Spacing = None) -> float | None:
    """95th-percentile symmetric surface distance of two binary masks; ``None`` if either is empty.

    Convention (medpy's ``hd95``): the surfaces are the :func:`surface` pixels of each mask; the directed
    distances are, for every prediction surface pixel, the Euclidean distance to the nearest reference
    surface pixel, and vice versa (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``);
    HD95 is ``numpy.percentile`` (linear interpolation) at 95 of the union of both sets. MONAI instead
    takes the larger of the two directed 95th percentiles, which can differ. Units: pixels when
    ``spacing`` is None, else the units of ``spacing`` (row, column), e.g. mm.
    """
    prediction_mask = np.asarray(prediction_mask, dtype=bool)
    reference_mask = np.asarray(reference_mask, dtype=bool)
    if prediction_mask.shape != reference_mask.shape:
        raise ValueError(f"mask shapes differ: {prediction_mask.shape} vs {reference_mask.shape}")
    if not prediction_mask.any() or not reference_mask.any():
        return None
    # Cropping to the bounding box of both masks is exact: all surface pixels lie inside it, and a mask
    # pixel on the box edge has no mask pixel beyond it, so it is a surface pixel in the full image too.
    rows, cols = np.nonzero(prediction_mask | reference_mask)
    box = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    prediction_surface, reference_surface = surface(prediction_mask[box]), surface(reference_mask[box])
    to_reference = ndimage.distance_transform_edt(~reference_surface, sampling=spacing)[prediction_surface]
    to_prediction = ndimage.distance_transform_edt(~prediction_surface, sampling=spacing)[reference_surface]
    return float(np.percentile(np.concatenate([to_reference, to_prediction]), 95))


def score_images(
    predictions: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    num_labels: int,
    pixel_spacings: Sequence[Spacing] | None = None,
    ignore_index: int | None = None,
) -> list[ImageScores]:
    """Per-image Dice and IoU of every class and HD95 of the foreground classes (mm where the spacing is known).

    ``pixel_spacings`` holds one (row, col) spacing in mm, or None, per image.
    """
    check_lengths(predictions, references, pixel_spacings, "pixel_spacings")
    spacings = list(pixel_spacings) if pixel_spacings is not None else [None] * len(references)
    scores = []
    for prediction, reference, spacing in zip(predictions, references, spacings, strict=True):
        spacing = _checked_spacing(spacing)
        prediction, reference, valid = checked_label_maps(prediction, reference, num_labels, ignore_index)
        codes = reference[valid] * num_labels + prediction[valid]
        confusion = np.bincount(codes, minlength=num_labels * num_labels).reshape(num_labels, num_labels)
        dice, iou = dice_iou(confusion)
        hd95_px, hd95_mm = [None], [None]  # background: see the module docstring
        for label in range(1, num_labels):
            prediction_mask, reference_mask = (prediction == label) & valid, (reference == label) & valid
            hd95_px.append(hd95(prediction_mask, reference_mask))
            hd95_mm.append(None if spacing is None else hd95(prediction_mask, reference_mask, spacing))
        scores.append(ImageScores(confusion, dice.tolist(), iou.tolist(), hd95_px, hd95_mm))
    return scores


def summarise(scores: Sequence[ImageScores], label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class and foreground-mean summary of :func:`score_images` output (see the module docstring).

    Top level: ``dice_mean``, ``iou_mean`` (foreground mean of the per-class means over images),
    ``dice_pooled_mean``, ``iou_pooled_mean`` (foreground mean of the pooled per-class values),
    ``hd95_px_mean``, ``hd95_mm_mean`` (foreground mean over classes with a defined HD95, else ``None``;
    the others are listed in ``hd95_px_undefined_classes`` / ``hd95_mm_undefined_classes``),
    ``pixel_accuracy`` (pooled), ``num_images``, ``num_labels``, ``label_names`` and ``per_class``:
    label name -> ``id``, ``dice``, ``iou``, ``dice_pooled``, ``iou_pooled``, ``hd95_px``, ``hd95_mm``
    and the image counts ``empty``, ``reference_only``, ``prediction_only``, ``hd95_undefined``,
    ``hd95_mm_undefined``. A class absent from every image has pooled Dice = IoU = 1.0 and
    ``empty == num_images``.
    """
    if not scores:
        raise ValueError("no images to evaluate")
    num_labels = len(scores[0].dice)
    names = checked_label_names(label_names, num_labels)
    pooled = np.sum([image.confusion for image in scores], axis=0)
    pooled_dice, pooled_iou = dice_iou(pooled)
    in_reference = np.array([image.in_reference for image in scores])
    in_prediction = np.array([image.in_prediction for image in scores])
    per_class = {}
    for label, name in enumerate(names):
        hd95_px = [image.hd95_px[label] for image in scores if image.hd95_px[label] is not None]
        hd95_mm = [image.hd95_mm[label] for image in scores if image.hd95_mm[label] is not None]
        per_class[name] = {
            "id": label,
            "dice": float(np.mean([image.dice[label] for image in scores])),
            "iou": float(np.mean([image.iou[label] for image in scores])),
            "dice_pooled": float(pooled_dice[label]),
            "iou_pooled": float(pooled_iou[label]),
            "hd95_px": mean_or_none(hd95_px),
            "hd95_mm": mean_or_none(hd95_mm),
            "images": len(scores),
            "empty": int((~in_reference[:, label] & ~in_prediction[:, label]).sum()),
            "reference_only": int((in_reference[:, label] & ~in_prediction[:, label]).sum()),
            "prediction_only": int((~in_reference[:, label] & in_prediction[:, label]).sum()),
            "hd95_undefined": len(scores) - len(hd95_px),
            "hd95_mm_undefined": len(scores) - len(hd95_mm),
        }
    foreground = [per_class[name] for name in names[1:]]
    total_pixels = int(pooled.sum())
    return {
        "num_images": len(scores),
        "num_labels": num_labels,
        "label_names": names,
        "dice_mean": float(np.mean([entry["dice"] for entry in foreground])),
        "iou_mean": float(np.mean([entry["iou"] for entry in foreground])),
        "dice_pooled_mean": float(np.mean([entry["dice_pooled"] for entry in foreground])),
        "iou_pooled_mean": float(np.mean([entry["iou_pooled"] for entry in foreground])),
        "hd95_px_mean": mean_or_none([entry["hd95_px"] for entry in foreground if entry["hd95_px"] is not None]),
        "hd95_mm_mean": mean_or_none([entry["hd95_mm"] for entry in foreground if entry["hd95_mm"] is not None]),
        "hd95_px_undefined_classes": [name for name in names[1:] if per_class[name]["hd95_px"] is None],
        "hd95_mm_undefined_classes": [name for name in names[1:] if per_class[name]["hd95_mm"] is None],
        "pixel_accuracy": float(np.trace(pooled) / total_pixels) if total_pixels else None,
        "evaluated_pixels": total_pixels,
        "per_class": per_class,
    }


def per_image_rows(
    scores: Sequence[ImageScores],
    label_names: Sequence[str] | None = None,
    image_ids: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (image, class) for a per-image CSV: ``id, class, dice, iou, hd95_px, hd95_mm``.

    ``id`` defaults to the image's position; undefined HD95 values are ``None`` (an empty CSV cell).
    """
    if image_ids is not None and len(image_ids) != len(scores):
        raise ValueError(f"{len(image_ids)} image ids for {len(scores)} images")
    ids = [str(index) for index in range(len(scores))] if image_ids is None else [str(i) for i in image_ids]
    rows = []
    for image_id, image in zip(ids, scores, strict=True):
        names = checked_label_names(label_names, len(image.dice))
        for label, name in enumerate(names):
            rows.append(
                {
                    "id": image_id,
                    "class": name,
                    "dice": image.dice[label],
                    "iou": image.iou[label],
                    "hd95_px": image.hd95_px[label],
                    "hd95_mm": image.hd95_mm[label],
                }
            )
    return rows


def segmentation_report(
    predictions: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    num_labels: int,
    label_names: Sequence[str] | None = None,
    pixel_spacings: Sequence[Spacing] | None = None,
    ignore_index: int | None = None,
    prediction_scores: Sequence[np.ndarray] | None = None,
    instances: bool = False,
) -> dict[str, Any]:
    """Summary of Dice, IoU and HD95 (:func:`summarise`), plus ``instances`` (mask mAP) when asked.

    ``instances=True`` adds the :func:`instance_average_precision` result under ``"instances"`` and its
    ``map`` / ``map_50`` at top level as ``instance_map`` / ``instance_map_50``; it needs pycocotools.
    """
    scores = score_images(predictions, references, num_labels, pixel_spacings, ignore_index)
    report = summarise(scores, label_names)
    if instances:
        instance = instance_average_precision(
            predictions, references, num_labels, label_names, prediction_scores, ignore_index
        )
        report.update(instance_map=instance["map"], instance_map_50=instance["map_50"], instances=instance)
    return report


def _checked_spacing(spacing: Spacing) -> Spacing:
    if spacing is None:
        return None
    values = tuple(float(value) for value in spacing)
    if len(values) != 2 or not all(np.isfinite(value) and value > 0 for value in values):
        raise ValueError(f"pixel spacing must be (row, col) positive numbers or None, got {spacing}")
    return values
