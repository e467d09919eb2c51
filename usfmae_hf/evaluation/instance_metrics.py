"""Instance mask mAP over connected lesion instances (COCO ``segm`` evaluation, via pycocotools).

Inputs are those of :mod:`usfmae_hf.evaluation.segmentation_metrics` (integer label maps, one per
image; ``ignore_index`` pixels count nowhere); :func:`~usfmae_hf.evaluation.segmentation_metrics.segmentation_report`
adds this figure on request.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from usfmae_hf.evaluation.segmentation_inputs import (
    check_lengths,
    checked_label_maps,
    checked_label_names,
    mean_or_none,
)

#: 8-connectivity for lesion instances
_INSTANCE_STRUCTURE = np.ones((3, 3), dtype=bool)


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

    check_lengths(predictions, references, prediction_scores, "prediction_scores")
    names = checked_label_names(label_names, num_labels)
    categories = list(range(1, num_labels))
    images, truths, detections = [], [], []
    for index, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        prediction, reference, valid = checked_label_maps(prediction, reference, num_labels, ignore_index)
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
        "map": mean_or_none([value for value in ap["ap"] if value is not None]),
        "map_50": mean_or_none([value for value in ap["ap_50"] if value is not None]),
        "reference_instances": len(truths),
        "predicted_instances": len(detections),
        "per_class": per_class,
    }


def _checked_scores(scores: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != prediction.shape:
        raise ValueError(f"prediction scores {scores.shape} must match the prediction {prediction.shape}")
    if not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1:
        raise ValueError("prediction scores must be probabilities in [0, 1]")
    return scores


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 8-connected components of ``mask``."""
    labelled, count = ndimage.label(mask, structure=_INSTANCE_STRUCTURE)
    return [labelled == index for index in range(1, count + 1)]


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
