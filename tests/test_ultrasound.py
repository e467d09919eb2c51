"""Scan-area cropping and annotation removal, measured on real scanner exports and a synthetic scan."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from usfmae_hf.image.cleanup import annotation_mask, crop_to_scan_area, remove_annotations, scan_area_box
from usfmae_hf.io import load_image


def rgb(path) -> np.ndarray:
    return np.asarray(load_image(path))


def white_fraction(image: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Fraction of (near) pure-white pixels: burned-in glyphs are drawn at full brightness, tissue rarely is."""
    top, bottom, left, right = box
    return float((image[top:bottom, left:right].min(axis=-1) >= 245).mean())


def saturated_fraction(image: np.ndarray) -> float:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    return float(((hsv[..., 1] > 80) & (hsv[..., 2] > 60)).mean())


# (top, bottom, left, right) boxes read off the images by eye
ECHO_TEXT_BOXES = {
    "Adult Echo": (25, 48, 10, 145),
    "TIS0.4 MI 1.4": (25, 48, 825, 990),
    "Asc Ao Diam": (62, 115, 85, 335),
    "caliper 1": (312, 327, 621, 636),
    "caliper 2": (428, 443, 682, 697),
    "65bpm": (728, 750, 930, 997),
}
ECHO_TISSUE = (250, 420, 300, 480)


def test_text_and_calipers_are_removed_and_tissue_kept(ultrasound_dicoms):
    image = rgb(ultrasound_dicoms["JPGLosslessP14SV1_1s_1f_8b.dcm"])
    cleaned = remove_annotations(image)
    for name, box in ECHO_TEXT_BOXES.items():
        assert white_fraction(image, box) > 0.03, name  # the annotation is there ...
        assert white_fraction(cleaned, box) < 0.002, name  # ... and gone
    top, bottom, left, right = ECHO_TISSUE
    changed = np.any(cleaned[top:bottom, left:right] != image[top:bottom, left:right], axis=-1).mean()
    assert changed < 0.05  # the scan itself is left (almost) untouched
    assert image.shape == cleaned.shape and not np.shares_memory(image, cleaned)


def test_coloured_markers_are_removed(ultrasound_dicoms):
    image = rgb(ultrasound_dicoms["US1_UNCR.dcm"])  # power Doppler, colour bars
    assert saturated_fraction(image) > 0.02
    assert saturated_fraction(remove_annotations(image)) < 0.001


def test_inpainting_restores_a_synthetic_scan():
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.normal(90, 40, (200, 260)).astype(np.float32), (0, 0), 2)
    clean = np.repeat(np.clip(texture, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    annotated = clean.copy()
    cv2.putText(annotated, "GAIN 60 12cm", (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
    cv2.drawMarker(annotated, (180, 140), (255, 255, 0), cv2.MARKER_CROSS, 15, 2)
    cv2.drawMarker(annotated, (90, 150), (0, 255, 0), cv2.MARKER_TILTED_CROSS, 15, 2)
    drawn = np.any(annotated != clean, axis=-1)
    assert annotation_mask(annotated)[drawn].mean() > 0.99
    before = np.abs(annotated.astype(float) - clean)[drawn].mean()
    after = np.abs(remove_annotations(annotated).astype(float) - clean)[drawn].mean()
    assert before > 100 and after < 30, (before, after)
    assert not annotation_mask(clean).mean() > 0.01  # speckle alone is not taken for annotations


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # scan-area edges measured by eye: (top, bottom, left, right) each with a tolerance
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", (163, 655, 145, 903)),
        ("US1_UNCR.dcm", (108, 337, 14, 623)),
        ("color3d_jpeg_baseline.dcm", (45, 403, 140, 465)),
        ("gdcm-US-ALOKA-16.dcm", (25, 416, 32, 640)),
    ],
)
def test_scan_area_box_on_real_scans(ultrasound_dicoms, name, expected):
    image = rgb(ultrasound_dicoms[name])
    box = scan_area_box(image)
    tolerance = 0.03 * max(image.shape[:2])
    assert np.abs(np.array(box) - np.array(expected)).max() <= tolerance, box
    top, bottom, left, right = box
    np.testing.assert_array_equal(crop_to_scan_area(image), image[top:bottom, left:right])


def test_blank_image_is_not_cropped():
    blank = np.zeros((20, 30, 3), np.uint8)
    assert scan_area_box(blank) == (0, 20, 0, 30)
    np.testing.assert_array_equal(remove_annotations(blank), blank)
