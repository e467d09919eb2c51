"""Array helpers shared by the readers: everything ends as an ``(H, W, 3)`` uint8 RGB array."""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

from usfmae_hf.errors import UsfmaeError


def import_optional(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or fail with a one-line error naming the pip extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UsfmaeError(f"this needs {module.split('.')[0]} ({error}): pip install 'usfmae-hf[{extra}]'") from None


def stretch_to_uint8(array: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Map ``[low, high]`` (default: the array's finite min and max) linearly onto 0-255, clipping outside."""
    values = np.nan_to_num(np.asarray(array, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Return ``array`` (grey ``(H, W)``/``(H, W, 1)``, RGB or RGBA) as a C-contiguous ``(H, W, 3)`` uint8 array.

    uint8 data are kept as they are; other types are stretched from their min/max to 0-255. Alpha is
    dropped, as ``PIL.Image.convert("RGB")`` does.
    """
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim == 2:
        array = array[..., None].repeat(3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected a grey, RGB or RGBA image, got an array of shape {array.shape}")
    if array.dtype != np.uint8:
        array = stretch_to_uint8(array)
    return np.ascontiguousarray(array)
