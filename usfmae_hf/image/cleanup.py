"""Ultrasound-specific clean-up of RGB frames: scan-area cropping and burned-in annotation removal.

Both work on ``(H, W, 3)`` uint8 RGB arrays (what :func:`usfmae_hf.io.load_frames` yields) with
OpenCV (``pip install 'usfmae-hf[annotations]'``).

* :func:`crop_to_scan_area` keeps the bounding box of the largest textured, non-background region:
  the B-mode sector or rectangle, without the text, rulers and logos around it.
* :func:`remove_annotations` follows USF-MAE's offline de-annotation: masks of
  burned-in text and grey caliper marks (bright, thin strokes) and of coloured markers (saturated
  pixels) are OR-ed, closed and opened with a 5x5 kernel, and inpainted (Navier-Stokes, radius 3).
  USF-MAE found text with OCR; a white top-hat finds the same thin bright glyphs without an OCR
  engine. Colour Doppler is saturated too and is removed with the markers, as in USF-MAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from usfmae_hf.io.pixels import import_optional


def _cv2():
    return import_optional("cv2", "annotations")


@dataclass(frozen=True)
class AnnotationThresholds:
    """Detector settings of :func:`annotation_mask` (defaults fit 8-bit scanner exports).

    Attributes:
        min_stroke_brightness: grey level a text/caliper pixel must reach.
        min_stroke_contrast: white top-hat response (brightness above the local background) of a stroke.
        stroke_kernel: size of the top-hat kernel; strokes thinner than this are found.
        min_saturation: HSV saturation above which a pixel counts as a coloured marker.
        min_colour_value: HSV value a coloured marker must reach (dark tints are not markers).
    """

    min_stroke_brightness: int = 150
    min_stroke_contrast: int = 70
    stroke_kernel: int = 11
    min_saturation: int = 80
    min_colour_value: int = 60


def annotation_mask(image: np.ndarray, thresholds: AnnotationThresholds = AnnotationThresholds()) -> np.ndarray:
    """Return a boolean ``(H, W)`` mask of burned-in text, calipers and coloured markers in ``image``."""
    cv2 = _cv2()
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (thresholds.stroke_kernel, thresholds.stroke_kernel))
    top_hat = cv2.morphologyEx(grey, cv2.MORPH_TOPHAT, kernel)
    strokes = (grey >= thresholds.min_stroke_brightness) & (top_hat >= thresholds.min_stroke_contrast)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    coloured = (hsv[..., 1] >= thresholds.min_saturation) & (hsv[..., 2] >= thresholds.min_colour_value)
    detected = (strokes | coloured).astype(np.uint8)
    square = np.ones((5, 5), np.uint8)
    # Closing joins the glyphs of a word into one block, so inpainting fills the word rather than
    # leaving islands between strokes; opening keeps only the solid blocks of those joins. Opening
    # alone would erase thin isolated strokes (dotted lines, 1-px calipers), so the detections
    # themselves stay in, and a 3x3 dilation covers their anti-aliased edges.
    blocks = cv2.morphologyEx(cv2.morphologyEx(detected, cv2.MORPH_CLOSE, square), cv2.MORPH_OPEN, square)
    return cv2.dilate(blocks | detected, np.ones((3, 3), np.uint8)).astype(bool)


def remove_annotations(image: np.ndarray, thresholds: AnnotationThresholds = AnnotationThresholds()) -> np.ndarray:
    """Return ``image`` with burned-in annotations inpainted (Navier-Stokes, radius 3); input unchanged."""
    cv2 = _cv2()
    mask = annotation_mask(image, thresholds)
    if not mask.any():
        return image.copy()
    return cv2.inpaint(np.ascontiguousarray(image), mask.astype(np.uint8), 3, cv2.INPAINT_NS)


def scan_area_box(image: np.ndarray, *, background_level: int = 6) -> tuple[int, int, int, int]:
    """Return ``(top, bottom, left, right)`` (end-exclusive) of the largest textured non-background region.

    Pixels brighter than ``background_level`` with some local texture (flat UI panels have none) and
    outside :func:`annotation_mask` form the candidate mask; closing fills speckle holes and dark
    anechoic areas, and an opening with a kernel of ~3% of the image size detaches text, rulers and
    dotted lines from the scan. The whole image is returned when nothing qualifies.
    """
    cv2 = _cv2()
    height, width = image.shape[:2]
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mean = cv2.blur(grey, (7, 7))
    variance = cv2.blur(grey * grey, (7, 7)) - mean * mean
    mask = ((grey > background_level) & (variance > 4.0) & ~annotation_mask(image)).astype(np.uint8)
    size = max(3, int(round(0.03 * min(height, width))) | 1)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return 0, height, 0, width
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    left, top, box_width, box_height = (int(v) for v in stats[largest, :4])
    return top, top + box_height, left, left + box_width


def crop_to_scan_area(image: np.ndarray, *, background_level: int = 6) -> np.ndarray:
    """Return the part of ``image`` inside :func:`scan_area_box`."""
    top, bottom, left, right = scan_area_box(image, background_level=background_level)
    return np.ascontiguousarray(image[top:bottom, left:right])
