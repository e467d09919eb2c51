"""Content hashes shared by ingestion, leakage checks and the downstream adapters.

An image's identity is the SHA-256 of its decoded ``(H, W, 3)`` uint8 RGB pixels (the arrays
:func:`usfmae_hf.io.load_frames` yields), prefixed by the shape; so a PNG and its re-encoding as a
lossless TIFF, or a grey PNG and its RGB copy, hash the same, while file-level metadata never matters.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from usfmae_hf.io.images import pil_to_rgb_array


def pixel_sha256(rgb: np.ndarray) -> str:
    """Hex SHA-256 of an ``(H, W, 3)`` uint8 array's shape and C-order bytes."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    digest = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}x3:".encode())
    digest.update(np.ascontiguousarray(rgb).data)
    return digest.hexdigest()


def image_sha256(image: Image.Image) -> str:
    """:func:`pixel_sha256` of a PIL image converted to RGB as the readers convert it."""
    return pixel_sha256(pil_to_rgb_array(image))
