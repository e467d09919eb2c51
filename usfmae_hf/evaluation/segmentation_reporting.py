"""Segmentation evaluation outputs: scores at each image's own size, a per-image CSV, overlays, card results."""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from usfmae_hf.atomic import atomic_write_bytes, atomic_write_text
from usfmae_hf.evaluation.reporting import card_results
from usfmae_hf.evaluation.segmentation_metrics import (
    instance_average_precision,
    per_image_rows,
    score_images,
    summarise,
)
from usfmae_hf.inference.segmentation import SegmentationPrediction, overlay_png

# Metrics that go to the model card's model-index: (report key, Hub metric type, display name)
SEGMENTATION_CARD_METRICS = (
    ("dice_mean", "dice", "Mean Dice"),
    ("iou_mean", "mean_iou", "Mean IoU"),
    ("hd95_px_mean", "hd95", "HD95 (pixels)"),
    ("hd95_mm_mean", "hd95_mm", "HD95 (mm)"),
    ("instance_map", "map", "Instance mask mAP"),
    ("instance_map_50", "map@50", "Instance mask mAP@50"),
)
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def evaluate_segmentation_split(
    output_dir: str | os.PathLike,
    split: str,
    *,
    predictions: Sequence[SegmentationPrediction],
    references: Sequence[np.ndarray],
    ids: Sequence[str],
    label_names: Sequence[str],
    pixel_spacings: Sequence[tuple[float, float] | None] | None = None,
    instances: bool = False,
    overlay_images: Iterable[Any] = (),
) -> dict[str, Any]:
    """Score one split and write ``{split}_per_image_metrics.csv`` and ``{split}_overlays/<id>.png``.

    ``predictions`` and ``references`` are at each image's own size. ``overlay_images`` are the first
    images of the split (as many overlays are drawn as it yields). ``instances`` adds the connected-lesion
    mask mAP (``instance_map``, ``instance_map_50``), scored by the predicted class's mean probability.
    Returns the summary of :func:`usfmae_hf.evaluation.segmentation_metrics.summarise`.
    """
    output_dir = Path(output_dir)
    masks = [prediction.mask for prediction in predictions]
    scores = score_images(masks, references, len(label_names), pixel_spacings)
    report = summarise(scores, label_names)
    if instances:
        instance = instance_average_precision(
            masks,
            references,
            len(label_names),
            label_names,
            prediction_scores=[prediction.confidence for prediction in predictions],
        )
        report.update(instance_map=instance["map"], instance_map_50=instance["map_50"], instances=instance)
    atomic_write_text(
        output_dir / f"{split}_per_image_metrics.csv", _rows_csv(per_image_rows(scores, label_names, ids))
    )
    overlay_dir = output_dir / f"{split}_overlays"
    for index, image in enumerate(overlay_images):
        overlay_dir.mkdir(exist_ok=True)
        name = _UNSAFE_NAME.sub("_", str(ids[index])) or str(index)
        atomic_write_bytes(
            overlay_dir / f"{name}.png",
            overlay_png(image, masks[index], len(label_names), truth=references[index]),
        )
    return report


def segmentation_card_results(reports: Mapping[str, Mapping[str, Any]], dataset: str) -> list[dict[str, Any]]:
    """Model-card ``results`` (task ``image-segmentation``) from split reports; undefined values left out."""
    return card_results(reports, dataset, metrics=SEGMENTATION_CARD_METRICS, task="image-segmentation")


def flat_segmentation_results(split: str, report: Mapping[str, Any]) -> dict[str, Any]:
    """``{split}_{metric}`` keys for ``all_results.json``: the summary figures and per-class Dice/IoU/HD95."""
    flat = {
        f"{split}_{key}": value for key, value in report.items() if key not in ("per_class", "instances", "label_names")
    }
    for name, entry in report["per_class"].items():
        for metric in ("dice", "iou", "hd95_px", "hd95_mm", "empty", "hd95_undefined"):
            flat[f"{split}_{metric}_{name}"] = entry[metric]
    return flat


def _rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "class", "dice", "iou", "hd95_px", "hd95_mm"])
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()
