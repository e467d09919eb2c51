"""The record every reader yields (:class:`Frame`) and the file-type facts readers are chosen by."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
VOLUME_SUFFIXES = frozenset({".nii", ".nii.gz", ".mha", ".mhd", ".nrrd"})
VIDEO_SUFFIXES = frozenset({".avi", ".mp4", ".mov", ".mkv"})
SUPPORTED_SUFFIXES: frozenset[str] = IMAGE_SUFFIXES | DICOM_SUFFIXES | VOLUME_SUFFIXES | VIDEO_SUFFIXES


@dataclass(frozen=True)
class Frame:
    """One 2-D picture taken from a file.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB array.
        index: frame (cine, video) or slice (volume) index within the file; 0 for still images.
        metadata: reader-specific facts (``format``, ``num_frames``, DICOM ``photometric_interpretation``,
            volume ``axis``/``spacing``, video ``fps``/``time`` ...), plain JSON-able values.
    """

    image: np.ndarray
    index: int
    metadata: dict[str, Any] = field(default_factory=dict)


def file_suffix(path: str | os.PathLike) -> str:
    """Lower-case suffix of ``path``, with ``.nii.gz`` recognised as one suffix."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with a DICOM Part 10 preamble (128 bytes, then ``DICM``)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False
