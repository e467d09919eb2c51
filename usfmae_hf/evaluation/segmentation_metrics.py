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
(``ultrasound_segmentation/`` beside this file, loaded by path, so it works offline).
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

METRIC_DIR = Path(__file__).parent / "ultrasound_segmentation"

#: 4-connected structuring element: a mask pixel is on the surface if one of its 4 neighbours is not
_SURFACE_STRUCTURE = ndimage.generate_binary_structure(2, 1)
#: 8-connectivity for lesion instances
_INSTANCE_STRUCTURE = np.ones((3, 3), dtype=bool)

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


def default_label_names(num_labels: int) -> list[str]:
    """``["background", "class_1", ...]``: the names used when none are given."""
    return ["background"] + [f"class_{index}" for index in range(1, num_labels)]


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
    _check_lengths(predictions, references, pixel_spacings, "pixel_spacings")
    spacings = list(pixel_spacings) if pixel_spacings is not None else [None] * len(references)
    scores = []
    for prediction, reference, spacing in zip(predictions, references, spacings, strict=True):
        spacing = _checked_spacing(spacing)
        prediction, reference, valid = _checked_pair(prediction, reference, num_labels, ignore_index)
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
    names = _checked_names(label_names, num_labels)
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
            "hd95_px": _mean_or_none(hd95_px),
            "hd95_mm": _mean_or_none(hd95_mm),
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
        "hd95_px_mean": _mean_or_none([entry["hd95_px"] for entry in foreground if entry["hd95_px"] is not None]),
        "hd95_mm_mean": _mean_or_none([entry["hd95_mm"] for entry in foreground if entry["hd95_mm"] is not None]),
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
        names = _checked_names(label_names, len(image.dice))
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


def instance_average_precision(
    predictions: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    num_labels: int,
    label_names: Sequence[str] | None = None,
    prediction_scores: Sequence[np.ndarray] | None = None,
    ignore_index: int | None = None,
) -> dict[str, Any]:
    """COCO mask mAP (IoU 0.50:0.95) and mAP@50 over connected lesion instances, via pycocotools.

    Instances: for every foreground class ``c`` (``1..num_labels-1``, one COCO category each), the
    connected components (``scipy.ndimage.label``, 8-connectivity) of ``reference == c`` are the ground
    truth and those of ``prediction == c`` the detections, each encoded with
    ``pycocotools.mask.encode`` (``iscrowd=0``); predicted pixels on ignored reference pixels are removed
    first. Score of a detection: the mean of ``prediction_scores[i]`` over its pixels, where
    ``prediction_scores[i]`` is an ``H x W`` map of the softmax probability of the predicted class at each
    pixel (``probabilities.max(axis=0)`` for argmax predictions), i.e. the mean probability of class ``c``
    over the component; 1.0 when no scores are given (COCOeval's stable sort then ranks ties by image,
    then by component in raster order). Every image takes part, including those without ground-truth
    instances, whose detections are false positives.

    Evaluation: ``COCOeval(iouType="segm")`` with default parameters (IoU thresholds 0.50:0.05:0.95,
    101-point interpolated precision, area range "all", at most 100 detections per image and class);
    ``map`` and ``map_50`` are the values ``COCOeval.summarize`` prints first and second (mean over the
    categories with at least one ground-truth instance; detections of a class absent from every
    reference therefore cost nothing). A class without ground-truth instances has AP ``None``, as has
    ``map`` when no class has any; with ground truth but no detection at all, AP is 0.0.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _check_lengths(predictions, references, prediction_scores, "prediction_scores")
    names = _checked_names(label_names, num_labels)
    categories = list(range(1, num_labels))
    images, truths, detections = [], [], []
    for index, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        prediction, reference, valid = _checked_pair(prediction, reference, num_labels, ignore_index)
        confidence = None if prediction_scores is None else _checked_scores(prediction_scores[index], prediction)
        image_id = index + 1
        images.append({"id": image_id, "height": reference.shape[0], "width": reference.shape[1]})
        for category in categories:
            for component in _components((reference == category) & valid):
                rle = mask_utils.encode(np.asfortranarray(component, dtype=np.uint8))
                truths.append(
                    {
                        "id": len(truths) + 1,  # COCOeval treats id 0 as "unmatched"
                        "image_id": image_id,
                        "category_id": category,
                        "segmentation": rle,
                        "area": float(mask_utils.area(rle)),
                        "bbox": mask_utils.toBbox(rle).tolist(),
                        "iscrowd": 0,
                    }
                )
            for component in _components((prediction == category) & valid):
                score = 1.0 if confidence is None else float(confidence[component].mean())
                rle = mask_utils.encode(np.asfortranarray(component, dtype=np.uint8))
                detections.append({"image_id": image_id, "category_id": category, "segmentation": rle, "score": score})

    per_class_counts = {
        names[category]: {
            "reference_instances": sum(t["category_id"] == category for t in truths),
            "predicted_instances": sum(d["category_id"] == category for d in detections),
        }
        for category in categories
    }
    ap = _no_ap(categories)
    if truths and detections:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            ground_truth = COCO()
            ground_truth.dataset = {
                "images": images,
                "annotations": truths,
                "categories": [{"id": category, "name": names[category]} for category in categories],
            }
            ground_truth.createIndex()
            evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), iouType="segm")
            evaluation.params.imgIds = [image["id"] for image in images]
            evaluation.params.catIds = categories
            evaluation.evaluate()
            evaluation.accumulate()
        ap = _ap_from_precision(evaluation.eval["precision"], evaluation.params)
    elif truths:  # ground truth but no detection: every class with ground truth scores 0
        ap = {
            key: [0.0 if per_class_counts[names[c]]["reference_instances"] else None for c in categories] for key in ap
        }
    per_class = {
        names[category]: {"ap": ap["ap"][i], "ap_50": ap["ap_50"][i], **per_class_counts[names[category]]}
        for i, category in enumerate(categories)
    }
    return {
        "map": _mean_or_none([value for value in ap["ap"] if value is not None]),
        "map_50": _mean_or_none([value for value in ap["ap_50"] if value is not None]),
        "reference_instances": len(truths),
        "predicted_instances": len(detections),
        "per_class": per_class,
    }


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


def _checked_pair(
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


def _checked_spacing(spacing: Spacing) -> Spacing:
    if spacing is None:
        return None
    values = tuple(float(value) for value in spacing)
    if len(values) != 2 or not all(np.isfinite(value) and value > 0 for value in values):
        raise ValueError(f"pixel spacing must be (row, col) positive numbers or None, got {spacing}")
    return values


def _checked_scores(scores: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != prediction.shape:
        raise ValueError(f"prediction scores {scores.shape} must match the prediction {prediction.shape}")
    if not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1:
        raise ValueError("prediction scores must be probabilities in [0, 1]")
    return scores


def _check_lengths(predictions: Sequence, references: Sequence, extra: Sequence | None, extra_name: str) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if extra is not None and len(extra) != len(references):
        raise ValueError(f"{len(extra)} {extra_name} for {len(references)} images")


def _checked_names(label_names: Sequence[str] | None, num_labels: int) -> list[str]:
    names = default_label_names(num_labels) if label_names is None else [str(name) for name in label_names]
    if len(names) != num_labels or len(set(names)) != num_labels:
        raise ValueError(f"label_names must be {num_labels} distinct names, got {names}")
    return names


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 8-connected components of ``mask``."""
    labelled, count = ndimage.label(mask, structure=_INSTANCE_STRUCTURE)
    return [labelled == index for index in range(1, count + 1)]


def _mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _no_ap(categories: Sequence[int]) -> dict[str, list[float | None]]:
    return {"ap": [None] * len(categories), "ap_50": [None] * len(categories)}


def _ap_from_precision(precision: np.ndarray, params) -> dict[str, list[float | None]]:
    """Per-category AP over all IoU thresholds and at 0.50 from ``COCOeval.eval["precision"]``.

    ``precision`` has shape (IoU thresholds, recall thresholds, categories, area ranges, max detections)
    and holds -1 for categories without ground truth; like ``COCOeval.summarize`` this takes area range
    "all" and 100 detections.
    """
    area = params.areaRngLbl.index("all")
    detections = params.maxDets.index(100)
    at_50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    result = _no_ap(params.catIds)
    for k in range(len(params.catIds)):
        values = precision[:, :, k, area, detections]
        if (values > -1).any():
            result["ap"][k] = float(values[values > -1].mean())
            result["ap_50"][k] = float(values[at_50][values[at_50] > -1].mean())
    return result
