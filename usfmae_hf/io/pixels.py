"""Array helpers shared by the readers: everything ends as an ``(H, W, 3)`` uint8 RGB array."""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from types import ModuleType

import numpy as np

from usfmae_hf.errors import UsfmaeError


def import_optional(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or fail with a one-line error naming the pip extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UsfmaeError(f"this needs {module.split('.')[0]} ({error}): pip install 'usfmae-hf[{extra}]'") from None


# Values converted to float64 at a time by stretch_to_uint8: 32 MiB of temporaries, whatever the array's size.
_STRETCH_BLOCK_VALUES = 1 << 22


def _float_blocks(array: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """``(slice along axis 0, block as float64 with NaN/inf as 0)`` over ``array``, a few million values each."""
    step = max(1, _STRETCH_BLOCK_VALUES // max(1, math.prod(array.shape[1:])))
    for start in range(0, array.shape[0], step):
        part = slice(start, start + step)
        yield part, np.nan_to_num(np.asarray(array[part], dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def stretch_to_uint8(array: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Map ``[low, high]`` (default: the array's finite min and max) linearly onto 0-255, clipping outside.

    NaN and infinite values count as 0. The float64 arithmetic runs block by block, so a large volume
    needs only its uint8 result besides itself.
    """
    array = np.asarray(array)
    values = array.reshape(array.shape or (1,))  # a 0-d array as one value
    if low is None or high is None:
        extremes = [(block.min(), block.max()) for _, block in _float_blocks(values)]
        low = float(min(lo for lo, _ in extremes)) if low is None else low
        high = float(max(hi for _, hi in extremes)) if high is None else high
    result = np.zeros(values.shape, dtype=np.uint8)
    if high > low:
        for part, block in _float_blocks(values):
            result[part] = np.clip(np.rint((block - low) * (255.0 / (high - low))), 0, 255)
    return result.reshape(array.shape)


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
