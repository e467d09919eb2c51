"""Semantic-segmentation metrics for downstream ultrasound tasks, as an ``evaluate`` module.

Load it by path, which works offline: ``evaluate.load(str(METRIC_DIR))`` or simply ``load_segmentation_metric()``,
both from ``usfmae_hf.evaluation.segmentation_metrics``. The numbers come from ``segmentation_report`` there; this
module only carries the label maps through ``evaluate`` (``add_batch`` / ``compute``). Per-image extras
(``pixel_spacing``, ``prediction_scores``) are ``compute`` arguments covering every image added, in order. Passing
label maps through Arrow costs about 1 s per 100 images of 224 x 224; ``segmentation_report`` skips that.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from usfmae_hf.evaluation.segmentation_metrics import segmentation_report

_DESCRIPTION = """\
Per-class and foreground-mean Dice, IoU and HD95 (pixels, and mm where a pixel spacing is known) of
integer label maps, dataset-level (pooled pixel counts) Dice/IoU and, on request, COCO mask mAP and
mAP@50 over connected lesion instances (pycocotools).

Empty masks are defined, never NaN: a class absent from both reference and prediction of an image has
Dice = IoU = 1.0 there (counted in `empty`), absent from one only 0.0; HD95 is undefined when either
mask is empty and such images are left out of the HD95 mean and counted (`hd95_undefined`); it is
not computed for background. "Mean"
figures average the foreground classes 1..num_labels-1; background is reported per class. Undefined
values are `None`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of H x W integer arrays): predicted label maps, ids 0..num_labels-1.
    references (`list` of H x W integer arrays): reference label maps (same size as the matching
        prediction; sizes may differ between images), ids 0..num_labels-1 or `ignore_index`.
    num_labels (`int`): number of labels including background (0).
    label_names (`list` of `str`, optional): one name per label; default background, class_1, ...
    pixel_spacing (`list`, optional): one (row, col) spacing in mm or None per image, in the order the
        images were added; enables the `hd95_mm` figures.
    ignore_index (`int`, optional): reference value excluded from every figure, e.g. 255.
    prediction_scores (`list` of H x W float arrays, optional): softmax probability of the predicted
        label at each pixel, one per image; scores the lesion instances (default 1.0).
    instances (`bool`, optional): also compute the instance mask mAP (needs pycocotools).
Returns:
    The summary dict of `segmentation_report`: dice_mean, iou_mean, dice_pooled_mean, iou_pooled_mean,
    hd95_px_mean, hd95_mm_mean, pixel_accuracy, per_class (name -> figures and counts), ... and with
    `instances=True` instance_map, instance_map_50 and instances.
Examples:
    >>> metric = load_segmentation_metric()
    >>> metric.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 1]]], num_labels=2)["dice_mean"]
    0.8
"""

_CITATION = """\
@article{taha2015metrics,
  title={Metrics for evaluating 3D medical image segmentation: analysis, selection, and tool},
  author={Taha, Abdel Aziz and Hanbury, Allan},
  journal={BMC Medical Imaging},
  volume={15},
  pages={29},
  year={2015}
}
"""

_LABEL_MAP = datasets.List(datasets.List(datasets.Value("int64")))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class UltrasoundSegmentation(evaluate.Metric):
    """Dice / IoU / HD95 and instance mask mAP with explicit handling of empty masks and absent classes."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _LABEL_MAP, "references": _LABEL_MAP}),
            reference_urls=["https://cocodataset.org/#detection-eval"],
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        label_names=None,
        pixel_spacing=None,
        ignore_index: int | None = None,
        prediction_scores=None,
        instances: bool = False,
    ):
        return segmentation_report(
            [np.asarray(prediction, dtype=np.int64) for prediction in predictions],
            [np.asarray(reference, dtype=np.int64) for reference in references],
            num_labels=num_labels,
            label_names=label_names,
            pixel_spacings=pixel_spacing,
            ignore_index=ignore_index,
            prediction_scores=prediction_scores,
            instances=instances,
        )
