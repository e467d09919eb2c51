"""Segmentation masks: decoding stored masks into label ids, and the ``DatasetDict`` that holds them.

Masks are read whatever their stored form (grey, palette, 16-bit, grey saved as RGB), checked as label
ids (or as 0/1 / 0/255 binaries) and stored once as single-channel PNGs of ``uint8`` label ids, with
the ids present in each (``classes``), so that every consumer of a segmentation split reads plain label
ids. The sources (:mod:`usfmae_hf.evaluation.segmentation_sources`) and the task adapters
(:mod:`usfmae_hf.evaluation.segmentation_tasks`) build their splits with these.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from usfmae_hf.errors import UnreadableImageError, UsfmaeError

#: label names of binary masks (0/1 or 0/255)
BINARY_LABELS = ("background", "lesion")

_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "LA", "PA")


def _file(source: str | os.PathLike | dict) -> str | os.PathLike | io.BytesIO:
    """What ``Image.open`` reads for a path or a ``datasets.Image`` ``{"bytes", "path"}`` item."""
    if isinstance(source, dict):
        return io.BytesIO(source["bytes"]) if source.get("bytes") else source["path"]
    return source


def open_mask(source: str | os.PathLike | dict, name: str) -> Image.Image:
    """The decoded mask image; an undecodable one is an :class:`UnreadableImageError` naming it."""
    try:
        image = Image.open(_file(source))
        image.load()
        return image
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"{name}: cannot decode the mask ({error}); re-export it as PNG") from error


def mask_values(source: str | os.PathLike | dict, name: str) -> np.ndarray:
    """The stored values of a label mask as a 2-D integer array (palette images give their indices).

    Grey masks saved as RGB(A) with three equal channels are accepted; real colour is not a label id.
    """
    image = open_mask(source, name)
    if image.mode in _MASK_MODES:
        values = np.asarray(image)
        values = values[..., 0] if values.ndim == 3 else values
    elif image.mode in ("RGB", "RGBA"):
        rgb = np.asarray(image)[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])).all():
            raise UsfmaeError(f"{name}: a colour mask; expected one channel of label ids (0, 1, ...)")
        values = rgb[..., 0]
    else:
        raise UsfmaeError(f"{name}: mask mode {image.mode} is not a label image; expected 8-bit grey label ids")
    return values.astype(np.int64)


def binary_ids(values: np.ndarray, name: str) -> np.ndarray:
    """0/1 or 0/255 -> 0/1 (background/foreground); anything else is an error naming the value."""
    present = set(np.unique(values).tolist())
    if present <= {0, 1}:
        return values
    if present <= {0, 255}:
        return values // 255
    bad = min(present - ({0, 1} if 1 in present else {0, 255}))
    raise UsfmaeError(f"{name}: binary mask holds value {bad}; expected 0/1 or 0/255 (background/foreground)")


def checked_ids(values: np.ndarray, label_names: Sequence[str], name: str) -> np.ndarray:
    """``values`` if all are label ids of ``label_names``; else an error naming the lowest or highest value."""
    if (bad := int(values.min(initial=0))) < 0 or (bad := int(values.max(initial=0))) >= len(label_names):
        raise UsfmaeError(
            f"{name}: mask value {bad} is not a label id (0..{len(label_names) - 1}: {', '.join(label_names)}); "
            "fix the mask or pass --label_names with one name per id"
        )
    return values


def _encode(ids: np.ndarray) -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.fromarray(ids.astype(np.uint8), "L").save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _image_size(source: str | os.PathLike | dict) -> tuple[int, int] | None:
    """(width, height) from the header; None when unreadable (left to ``drop_unreadable``)."""
    try:
        with Image.open(_file(source)) as handle:
            return handle.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def mask_columns(images: list, masks: Iterable[tuple[np.ndarray, str]]) -> dict[str, list]:
    """Columns ``mask`` (PNG of uint8 label ids) and ``classes`` (ids present) for ``images``' label-id masks.

    ``masks`` yields ``(ids, name)`` lazily, so only one decoded mask is held at a time; a mask whose
    size differs from its image's is an error naming it.
    """
    encoded, classes = [], []
    for image, (ids, name) in zip(images, masks, strict=True):
        size = _image_size(image)
        if size is not None and size != ids.shape[::-1]:
            raise UsfmaeError(f"{name}: the mask is {ids.shape[1]}x{ids.shape[0]} but its image is {size[0]}x{size[1]}")
        encoded.append(_encode(ids))
        classes.append(np.unique(ids).tolist())
    return {"mask": encoded, "classes": classes}


def segmentation_dataset_dict(
    splits: dict[str, dict[str, list]], label_names: Sequence[str], description: str, extra: dict[str, Any]
):
    """``DatasetDict`` from per-split columns ``image``, ``mask``, ``classes``, ``id`` and the ``extra`` features."""
    from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, List, Value
    from datasets import Image as ImageFeature

    features = Features(
        {
            "image": ImageFeature(),
            "mask": ImageFeature(),
            "classes": List(ClassLabel(names=list(label_names))),
            "id": Value("string"),
            **extra,
        }
    )
    return DatasetDict(
        {
            name: Dataset.from_dict(
                {column: columns[column] for column in features},
                info=DatasetInfo(description=description, features=features),
                split=name,
            )
            for name, columns in splits.items()
        }
    )


def binary_mask_file(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """The 0/1 ids of the binary mask file ``path`` (0/1 or 0/255 stored), and its name for errors."""
    return binary_ids(mask_values(path, str(path)), str(path)), str(path)
