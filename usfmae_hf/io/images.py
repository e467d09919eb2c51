"""Still images (PNG, JPEG, BMP, TIFF) through Pillow, multi-page TIFFs as frames."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from usfmae_hf.errors import UnreadableImageError
from usfmae_hf.io.frame import Frame
from usfmae_hf.io.pixels import to_rgb_uint8

# Pillow modes holding more than 8 bits per sample; ``convert("RGB")`` would clip them at 255.
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """Return a PIL image as ``(H, W, 3)`` uint8 RGB.

    8-bit modes (L, RGB, RGBA, P, LA, CMYK, 1 ...) go through ``convert("RGB")``, exactly as USF-MAE's
    data loader does; 16-bit and float images are stretched from their min/max to 0-255 instead of clipped.
    """
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return to_rgb_uint8(np.asarray(image))
    return np.asarray(image.convert("RGB"))


def read_image_frames(path: Path) -> Iterator[Frame]:
    """Yield the page(s) of an image file (one frame, index 0, for ordinary images)."""
    try:
        with Image.open(path) as image:
            num_frames = getattr(image, "n_frames", 1)
            metadata = {"format": image.format, "mode": image.mode, "num_frames": num_frames}
            for index, page in enumerate(ImageSequence.Iterator(image)):
                yield Frame(pil_to_rgb_array(page), index, dict(metadata))
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"{path}: {error}") from None
