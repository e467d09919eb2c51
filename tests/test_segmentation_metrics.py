"""Segmentation metrics against independent implementations.

Dice/IoU: scikit-learn on flattened pixels and hand counts. HD95: a brute force in this file (boundaries by
``skimage.segmentation.find_boundaries``, all pairwise distances by ``scipy.spatial.distance.cdist``). Mask mAP:
hand-built cases whose AP follows from COCO's 101-point interpolation, derived in the comments, and a cross-check
of instance construction against torchmetrics. torchmetrics' ``MeanAveragePrecision`` offers only the pycocotools
and faster_coco_eval backends (the latter is not installed), so it shares the AP arithmetic with the code under
test; that comparison checks how instances and scores are built (here by ``skimage.measure.label``), not the AP.
"""

from __future__ import annotations

import csv
import io
import json
import time

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from skimage.measure import label as skimage_label
from skimage.segmentation import find_boundaries
from sklearn.metrics import f1_score, jaccard_score

from usfmae_hf.evaluation.segmentation_metrics import (
    hd95,
    instance_average_precision,
    load_segmentation_metric,
    per_image_rows,
    score_images,
    segmentation_report,
    summarise,
)

IGNORE = 255
#: COCO's 101 recall thresholds 0.00..1.00: a precision of 1 up to recall 0.5 covers 51 of them
AP_RECALL_HALF = 51 / 101


def random_maps(seed: int, num_labels: int = 4, count: int = 6, ignore: bool = False, noise: float = 0.03):
    """Blobby reference maps of varying sizes and noisy predictions; some classes absent from some images."""
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for _ in range(count):
        height, width = rng.integers(20, 41), rng.integers(20, 41)
        reference = np.zeros((height, width), dtype=np.int64)
        rows, cols = np.ogrid[:height, :width]
        for label in range(1, num_labels):
            if rng.random() < 0.25:  # class absent from this reference
                continue
            centre, radius = rng.integers(0, [height, width]), rng.integers(3, 10)
            reference[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2] = label
        prediction = np.roll(reference, (rng.integers(-3, 4), rng.integers(-3, 4)), axis=(0, 1))
        flip = rng.random(reference.shape) < noise
        prediction[flip] = rng.integers(0, num_labels, size=flip.sum())
        if ignore:
            reference[rng.random(reference.shape) < 0.05] = IGNORE
        predictions.append(prediction)
        references.append(reference)
    return predictions, references


def sklearn_scores(prediction: np.ndarray, reference: np.ndarray, label: int) -> tuple[float, float]:
    """Per-class Dice (= F1) and IoU (= Jaccard) of flattened pixels; 1.0 when the class is absent from both."""
    keep = reference.ravel() != IGNORE
    truth, guess = reference.ravel()[keep] == label, prediction.ravel()[keep] == label
    return (
        f1_score(truth, guess, zero_division=1.0),
        jaccard_score(truth, guess, zero_division=1.0),
    )


def brute_force_hd95(prediction_mask: np.ndarray, reference_mask: np.ndarray, spacing=(1.0, 1.0)) -> float:
    """95th percentile of the union of both directed boundary-to-boundary distance sets, by all pairs."""

    def boundary_points(mask):
        # Padding makes the image edge count as a boundary; "inner" + connectivity 1 = 4-neighbour boundary.
        padded = find_boundaries(np.pad(mask, 1).astype(np.uint8), mode="inner", connectivity=1)[1:-1, 1:-1]
        return np.argwhere(padded) * np.asarray(spacing)

    distances = cdist(boundary_points(prediction_mask), boundary_points(reference_mask))
    return float(np.percentile(np.concatenate([distances.min(axis=1), distances.min(axis=0)]), 95))


def test_dice_iou_match_scikit_learn_per_image_and_pooled():
    predictions, references = random_maps(0)
    names = ["background", "cyst", "solid", "wall"]
    report = segmentation_report(predictions, references, num_labels=4, label_names=names)
    scores = score_images(predictions, references, num_labels=4)
    for label, name in enumerate(names):
        expected = np.array([sklearn_scores(p, r, label) for p, r in zip(predictions, references)])
        assert [image.dice[label] for image in scores] == pytest.approx(expected[:, 0], abs=1e-12)
        assert [image.iou[label] for image in scores] == pytest.approx(expected[:, 1], abs=1e-12)
        assert report["per_class"][name]["dice"] == pytest.approx(expected[:, 0].mean(), abs=1e-12)
        assert report["per_class"][name]["iou"] == pytest.approx(expected[:, 1].mean(), abs=1e-12)
        pooled = sklearn_scores(
            np.concatenate([p.ravel() for p in predictions]), np.concatenate([r.ravel() for r in references]), label
        )
        assert report["per_class"][name]["dice_pooled"] == pytest.approx(pooled[0], abs=1e-12)
        assert report["per_class"][name]["iou_pooled"] == pytest.approx(pooled[1], abs=1e-12)
    foreground = [report["per_class"][name] for name in names[1:]]
    assert report["dice_mean"] == pytest.approx(np.mean([entry["dice"] for entry in foreground]), abs=1e-12)
    assert report["iou_pooled_mean"] == pytest.approx(np.mean([entry["iou_pooled"] for entry in foreground]))
    # the fixture must exercise both conventions: pooled and per-image means differ, some classes are absent
    assert abs(report["dice_mean"] - report["dice_pooled_mean"]) > 1e-3
    assert sum(entry["reference_only"] + entry["prediction_only"] + entry["empty"] for entry in foreground) > 0


def test_hand_counted_dice_iou():
    reference = np.array([[0, 1, 1], [0, 1, 1], [2, 2, 0]])
    prediction = np.array([[1, 1, 1], [0, 1, 0], [2, 0, 0]])
    report = segmentation_report([prediction], [reference], num_labels=3)
    # class 1: |P| = 4, |R| = 4, overlap 3 -> Dice 6/8, IoU 3/5; class 2: |P| = 1, |R| = 2, overlap 1 -> 2/3, 1/2
    assert report["per_class"]["class_1"]["dice"] == pytest.approx(6 / 8)
    assert report["per_class"]["class_1"]["iou"] == pytest.approx(3 / 5)
    assert report["per_class"]["class_2"]["dice"] == pytest.approx(2 / 3)
    assert report["per_class"]["class_2"]["iou"] == pytest.approx(1 / 2)
    # background: |P| = 4, |R| = 3, overlap 2 -> Dice 4/7; not part of the mean
    assert report["per_class"]["background"]["dice"] == pytest.approx(4 / 7)
    assert report["dice_mean"] == pytest.approx((6 / 8 + 2 / 3) / 2)
    assert report["pixel_accuracy"] == pytest.approx(6 / 9)


def test_ignore_index_is_excluded_everywhere():
    predictions, references = random_maps(1, ignore=True)
    report = segmentation_report(predictions, references, num_labels=4, ignore_index=IGNORE)
    for label, name in enumerate(report["label_names"]):
        expected = np.mean([sklearn_scores(p, r, label)[0] for p, r in zip(predictions, references)])
        assert report["per_class"][name]["dice"] == pytest.approx(expected, abs=1e-12)
    assert report["evaluated_pixels"] == sum(int((r != IGNORE).sum()) for r in references)
    # a prediction on ignored pixels changes nothing
    changed = [np.where(r == IGNORE, 3, p) for p, r in zip(predictions, references)]
    assert segmentation_report(changed, references, num_labels=4, ignore_index=IGNORE) == report
    with pytest.raises(ValueError, match="labels must lie"):
        segmentation_report(predictions, references, num_labels=4)  # 255 is not a label without ignore_index


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.3, 0.7)])
def test_hd95_matches_brute_force(spacing):
    predictions, references = random_maps(2, count=5)
    spacings = [spacing, None, spacing, spacing, spacing]
    scores = score_images(predictions, references, num_labels=4, pixel_spacings=spacings)
    checked = 0
    for prediction, reference, image, image_spacing in zip(predictions, references, scores, spacings):
        for label in range(1, 4):
            p, r = prediction == label, reference == label
            if not p.any() or not r.any():
                assert image.hd95_px[label] is None and image.hd95_mm[label] is None
                continue
            assert image.hd95_px[label] == pytest.approx(brute_force_hd95(p, r), abs=1e-6)
            if image_spacing is None:
                assert image.hd95_mm[label] is None
            else:
                assert image.hd95_mm[label] == pytest.approx(brute_force_hd95(p, r, spacing), abs=1e-6)
            checked += 1
    assert checked >= 8


def test_hd95_of_masks_touching_the_image_edge_and_split_in_parts():
    reference = np.zeros((30, 40), dtype=bool)
    reference[:10, :12] = True  # touches two image edges
    reference[20:25, 30:38] = True
    prediction = np.zeros_like(reference)
    prediction[2:12, 0:9] = True
    prediction[18:24, 33:40] = True
    assert hd95(prediction, reference) == pytest.approx(brute_force_hd95(prediction, reference), abs=1e-6)
    spacing = (0.45, 1.3)
    assert hd95(prediction, reference, spacing) == pytest.approx(
        brute_force_hd95(prediction, reference, spacing), abs=1e-6
    )
    assert hd95(reference, reference) == 0.0
    assert hd95(prediction, np.zeros_like(reference)) is None


def test_empty_and_absent_classes_are_defined_and_counted():
    shape = (12, 12)
    blank = np.zeros(shape, dtype=np.int64)
    lesion = blank.copy()
    lesion[3:7, 3:7] = 1
    shifted = np.roll(lesion, 2, axis=1)
    only_predicted = blank.copy()
    only_predicted[8:10, 8:10] = 2
    references = [lesion, blank, lesion, blank]
    predictions = [shifted, blank, blank, only_predicted]
    names = ["background", "lesion", "calcification", "never"]
    report = segmentation_report(
        predictions,
        references,
        num_labels=4,
        label_names=names,
        pixel_spacings=[(0.5, 0.5), None, None, None],
        instances=True,
    )
    json.dumps(report, allow_nan=False)  # no NaN anywhere, instance figures included

    lesion_entry = report["per_class"]["lesion"]
    # images: overlap Dice 2*8/32, both empty -> 1, missed -> 0, both empty -> 1
    assert lesion_entry["dice"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert (lesion_entry["empty"], lesion_entry["reference_only"], lesion_entry["prediction_only"]) == (2, 1, 0)
    assert lesion_entry["hd95_undefined"] == 3
    assert lesion_entry["hd95_px"] == pytest.approx(brute_force_hd95(shifted == 1, lesion == 1))
    assert lesion_entry["hd95_mm"] == pytest.approx(brute_force_hd95(shifted == 1, lesion == 1, (0.5, 0.5)))
    assert lesion_entry["hd95_mm_undefined"] == 3

    calcification = report["per_class"]["calcification"]  # present in one prediction only
    assert calcification["dice"] == pytest.approx(3 / 4) and calcification["iou"] == pytest.approx(3 / 4)
    assert (calcification["empty"], calcification["prediction_only"]) == (3, 1)
    assert calcification["hd95_px"] is None and calcification["hd95_undefined"] == 4
    assert calcification["dice_pooled"] == 0.0

    never = report["per_class"]["never"]
    assert never["dice"] == never["dice_pooled"] == 1.0 and never["empty"] == 4
    assert report["hd95_px_undefined_classes"] == ["calcification", "never"]
    assert report["hd95_px_mean"] == pytest.approx(lesion_entry["hd95_px"])  # undefined classes left out
    assert report["dice_mean"] == pytest.approx((lesion_entry["dice"] + 3 / 4 + 1.0) / 3)

    # instances: one lesion in the references (twice), one detection (IoU 8/24 < 0.5) -> AP 0; the
    # calcification detection has no ground truth in any image, so the class has no AP and costs nothing
    assert report["instances"]["per_class"]["lesion"]["ap_50"] == 0.0
    assert report["instances"]["per_class"]["calcification"]["ap"] is None
    assert report["instance_map"] == 0.0


def test_nothing_defined_gives_none_not_nan():
    blank = [np.zeros((5, 6), dtype=np.int64)] * 2
    report = segmentation_report(blank, blank, num_labels=2, instances=True)
    assert report["hd95_px_mean"] is None and report["hd95_mm_mean"] is None
    assert report["instance_map"] is None and report["instance_map_50"] is None
    assert report["dice_mean"] == 1.0 and report["per_class"]["class_1"]["empty"] == 2
    json.dumps(report, allow_nan=False)


def test_per_image_rows_make_a_csv():
    predictions, references = random_maps(3, num_labels=3, count=3)
    scores = score_images(predictions, references, num_labels=3, pixel_spacings=[(0.2, 0.2)] * 3)
    rows = per_image_rows(scores, ["bg", "a", "b"], image_ids=["x1", "x2", "x3"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "class", "dice", "iou", "hd95_px", "hd95_mm"])
    writer.writeheader()
    writer.writerows(rows)
    parsed = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert len(parsed) == 9 and [row["id"] for row in parsed[:4]] == ["x1", "x1", "x1", "x2"]
    row = next(row for row in parsed if row["id"] == "x2" and row["class"] == "a")
    assert float(row["dice"]) == pytest.approx(sklearn_scores(predictions[1], references[1], 1)[0])
    assert parsed[0]["hd95_px"] == ""  # background: not computed
    assert summarise(scores, ["bg", "a", "b"])["per_class"]["a"]["dice"] == pytest.approx(
        np.mean([float(r["dice"]) for r in parsed if r["class"] == "a"])
    )


def lesion_image(*boxes, shape=(40, 40), label=1):
    image = np.zeros(shape, dtype=np.int64)
    for top, left, bottom, right in boxes:
        image[top:bottom, left:right] = label
    return image


def test_map_perfect_match_is_one():
    reference = lesion_image((2, 2, 10, 10), (20, 20, 30, 35))
    result = instance_average_precision([reference], [reference], num_labels=2)
    assert result["map"] == pytest.approx(1.0) and result["map_50"] == pytest.approx(1.0)
    assert result["reference_instances"] == result["predicted_instances"] == 2


def test_map_one_of_two_instances_found_at_iou_point_six():
    reference = lesion_image((0, 0, 2, 5), (20, 20, 30, 30))
    prediction = lesion_image((0, 0, 2, 3))  # 6 of the 10 pixels of the first lesion: IoU 0.6
    result = instance_average_precision([prediction], [reference], num_labels=2)
    # One detection, a true positive while IoU 0.6 >= threshold: precision 1 at recall 1/2, so the interpolated
    # precision is 1 at recall thresholds 0.00..0.50 (51 of 101) and 0 above: AP = 51/101. It matches at the
    # thresholds 0.50, 0.55, 0.60 (3 of 10) and is a false positive above: mAP = 3 * 51/101 / 10.
    assert result["map_50"] == pytest.approx(AP_RECALL_HALF)
    assert result["map"] == pytest.approx(3 * AP_RECALL_HALF / 10)


def test_map_false_positive_scored_higher_halves_ap():
    reference = lesion_image((5, 5, 15, 15))
    prediction = lesion_image((5, 5, 15, 15), (25, 25, 30, 30))
    confidence = np.where(prediction == 1, 0.6, 0.0)
    confidence[25:30, 25:30] = 0.9
    result = instance_average_precision([prediction], [reference], num_labels=2, prediction_scores=[confidence])
    # Ranked FP (0.9) then TP (0.6): precision 0, 1/2 at recall 0, 1; interpolated precision is 1/2 at every
    # recall threshold, at every IoU threshold (the TP has IoU 1): AP = 1/2.
    assert result["map"] == pytest.approx(0.5) and result["map_50"] == pytest.approx(0.5)
    confidence[25:30, 25:30] = 0.3  # the true positive now ranks first: AP = 1
    result = instance_average_precision([prediction], [reference], num_labels=2, prediction_scores=[confidence])
    assert result["map"] == pytest.approx(1.0)


def test_map_scores_are_component_means():
    reference = lesion_image((5, 5, 15, 15))
    prediction = lesion_image((5, 5, 15, 15), (25, 25, 27, 27))
    confidence = np.where(prediction == 1, 0.6, 0.0)
    confidence[25:27, 25:27] = [[0.95, 0.3], [0.3, 0.3]]  # max 0.95 > 0.6 but mean 0.4625 < 0.6
    result = instance_average_precision([prediction], [reference], num_labels=2, prediction_scores=[confidence])
    assert result["map"] == pytest.approx(1.0)  # TP ranked first: scored by the mean, not the maximum


def test_map_instances_are_8_connected():
    reference = lesion_image((0, 0, 2, 2), (2, 2, 4, 4))  # two squares touching at a corner: one instance
    prediction = lesion_image((0, 0, 2, 2))  # IoU 4/8 with it
    result = instance_average_precision([prediction], [reference], num_labels=2)
    assert result["reference_instances"] == 1
    # one GT, one TP at IoU 0.5 only: AP 1 at threshold 0.50, 0 at the nine others (4-connectivity would give
    # two GT instances and map_50 = 51/101)
    assert result["map_50"] == pytest.approx(1.0)
    assert result["map"] == pytest.approx(0.1)


def test_map_without_detections_is_zero_and_without_truth_none():
    reference = lesion_image((5, 5, 15, 15))
    blank = np.zeros_like(reference)
    assert instance_average_precision([blank], [reference], num_labels=2)["map"] == 0.0
    result = instance_average_precision([reference], [blank], num_labels=2)
    assert result["map"] is None and result["per_class"]["class_1"]["predicted_instances"] == 1


def test_map_instance_construction_matches_torchmetrics():
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    predictions, references = random_maps(4, num_labels=3, count=5, noise=0.002)
    rng = np.random.default_rng(5)
    confidences = [rng.uniform(0.4, 1.0, size=p.shape) for p in predictions]

    def instances(label_map, confidence=None):
        masks, labels, scores = [], [], []
        for label in (1, 2):
            components = skimage_label(label_map == label, connectivity=2)
            for index in range(1, components.max() + 1):
                masks.append(components == index)
                labels.append(label)
                scores.append(1.0 if confidence is None else confidence[components == index].mean())
        shape = (len(masks), *label_map.shape)
        return {
            "masks": torch.from_numpy(np.array(masks, dtype=bool).reshape(shape)),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores, dtype=torch.float64),
        }

    # torchmetrics' default thresholds are float32-rounded (0.6000000238...), which moves results at exact ties;
    # COCO's own float64 thresholds are passed instead.
    metric = MeanAveragePrecision(
        iou_type="segm",
        iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
        rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
    )
    metric.update(
        [instances(p, c) for p, c in zip(predictions, confidences)],
        [{key: value for key, value in instances(r).items() if key != "scores"} for r in references],
    )
    expected = metric.compute()
    result = instance_average_precision(predictions, references, num_labels=3, prediction_scores=confidences)
    assert 0.05 < result["map"] < 0.95  # a non-degenerate fixture
    assert result["map"] == pytest.approx(float(expected["map"]), abs=1e-6)
    assert result["map_50"] == pytest.approx(float(expected["map_50"]), abs=1e-6)


def test_evaluate_module_loads_offline_and_equals_report():
    predictions, references = random_maps(6, ignore=True)
    spacings = [(0.2, 0.3)] * 3 + [None] * 3
    rng = np.random.default_rng(7)
    confidences = [rng.uniform(0.5, 1.0, size=p.shape) for p in predictions]
    kwargs = dict(
        num_labels=4,
        label_names=["bg", "a", "b", "c"],
        ignore_index=IGNORE,
        prediction_scores=confidences,
        instances=True,
    )
    expected = segmentation_report(predictions, references, pixel_spacings=spacings, **kwargs)
    metric = load_segmentation_metric()
    metric.add_batch(predictions=predictions[:2], references=references[:2])
    result = metric.compute(predictions=predictions[2:], references=references[2:], pixel_spacing=spacings, **kwargs)
    assert result == expected
    assert json.loads(json.dumps(result, allow_nan=False)) == expected


def test_bad_inputs_are_refused():
    good = np.zeros((4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="differ"):
        segmentation_report([good], [np.zeros((4, 5), dtype=np.int64)], num_labels=2)
    with pytest.raises(ValueError, match="labels must lie"):
        segmentation_report([good + 2], [good], num_labels=2)
    with pytest.raises(ValueError, match="integer label map"):
        segmentation_report([good.astype(float)], [good], num_labels=2)
    with pytest.raises(ValueError, match="distinct names"):
        segmentation_report([good], [good], num_labels=2, label_names=["a", "a"])
    with pytest.raises(ValueError, match="pixel spacing"):
        segmentation_report([good], [good], num_labels=2, pixel_spacings=[(0.0, 1.0)])
    with pytest.raises(ValueError, match="probabilities"):
        instance_average_precision([good], [good], num_labels=2, prediction_scores=[good + 2.0])


def test_hundred_images_of_224_are_fast():
    rng = np.random.default_rng(8)
    rows, cols = np.ogrid[:224, :224]
    references = []
    for _ in range(100):
        reference = np.zeros((224, 224), dtype=np.int64)
        for label in (1, 2):
            centre, radius = rng.integers(40, 184, size=2), rng.integers(8, 30)
            reference[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2] = label
        references.append(reference)
    predictions = [np.roll(r, 4, axis=1) for r in references]
    start = time.perf_counter()
    report = segmentation_report(predictions, references, num_labels=3, pixel_spacings=[(0.1, 0.1)] * 100)
    elapsed = time.perf_counter() - start
    assert report["hd95_px_mean"] is not None
    # measured ~0.15 s on 2 busy cores; the bound only catches a per-pixel Python loop
    assert elapsed < 10.0
