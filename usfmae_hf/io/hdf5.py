"""HDF5 frame stacks through h5py (optional): the layout of the Thyroid US Cineclip dataset.

Not dispatched by :func:`usfmae_hf.io.load_frames`: an HDF5 file is only an image stack when the
dataset's layout says so, so the dataset build calls :func:`read_hdf5_frames` for the datasets
whose catalogue formats include HDF5.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from usfmae_hf.errors import UnreadableImageError
from usfmae_hf.io.frame import Frame
from usfmae_hf.io.pixels import to_rgb_uint8

HDF5_SUFFIXES = frozenset({".h5", ".hdf5"})


def read_hdf5_frames(path: Path, frame_stride: int) -> Iterator[Frame]:
    """Frames of the Thyroid US Cineclip HDF5 file (``image`` stack, ``annot_id`` per frame as group)."""
    try:
        import h5py
    except ImportError:
        raise UnreadableImageError(f"{path}: HDF5 is not supported without h5py (pip install h5py)") from None

    with h5py.File(path, "r") as handle:
        images = handle["image"]
        annot_ids = handle["annot_id"] if "annot_id" in handle else None
        for index in range(0, len(images), frame_stride):
            metadata: dict[str, Any] = {"format": "HDF5"}
            if annot_ids is not None:
                value = annot_ids[index]
                metadata["group"] = value.decode() if isinstance(value, bytes) else str(value)
            yield Frame(to_rgb_uint8(np.asarray(images[index])), index, metadata)
