"""Segmentation sources given by the user: ``images/`` + ``masks/`` folders, or a ``datasets`` name or path.

Masks holding only 0/1 or 0/255 are background/lesion; other masks hold label ids, named by the
user's label names or ``background, class_1, ...``. One rule holds for the whole dataset, so every
split's masks are read before any is converted (:mod:`usfmae_hf.evaluation.segmentation_masks`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.evaluation.segmentation_masks import (
    BINARY_LABELS,
    binary_ids,
    checked_ids,
    mask_columns,
    mask_values,
    segmentation_dataset_dict,
)

SPLITS = ("train", "validation", "test")


def read_label_names(label_names: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    """A list of names, or a text file (one name per line) / JSON file (a list, or ``{"0": name, ...}``)."""
    if label_names is None:
        return None
    if isinstance(label_names, str | os.PathLike):
        path = Path(label_names)
        if not path.is_file():
            raise UsfmaeError(f"--label_names {path}: not a file (give a text file with one name per line, or JSON)")
        text = path.read_text()
        if path.suffix.lower() == ".json":
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as error:
                raise UsfmaeError(f"--label_names {path}: invalid JSON ({error})") from error
            if isinstance(loaded, dict):
                keys = sorted(loaded, key=lambda key: int(key) if str(key).isdigit() else -1)
                if [str(key) for key in keys] != [str(i) for i in range(len(keys))]:
                    raise UsfmaeError(f"--label_names {path}: keys must be the ids 0..{len(keys) - 1}")
                loaded = [loaded[key] for key in keys]
            names = loaded
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        names = list(label_names)
    if not all(isinstance(name, str) and name for name in names) or len(set(names)) != len(names):
        raise UsfmaeError(f"--label_names: names must be distinct non-empty strings, got {names}")
    if not 2 <= len(names) <= 256:
        raise UsfmaeError(f"--label_names: need 2..256 names (background first), got {len(names)}")
    return names


def _resolve_scheme(value_sets: list[set[int]], label_names: list[str] | None) -> tuple[list[str], bool]:
    """Label names and whether masks are binary (0/1 or 0/255 read as background/lesion).

    Masks are binary when every stored value is 0, 1 or 255 and two names (or none) are given; else
    the values are label ids, named by ``label_names`` or ``background, class_1, ...`` up to the largest.
    """
    present = set().union(*value_sets)
    binary = (label_names is None or len(label_names) == 2) and present <= {0, 1, 255}
    if label_names is None:
        largest = max(present, default=1)
        if not binary and largest > 255:
            raise UsfmaeError(f"mask values go up to {largest}; label ids must be 0..255")
        label_names = list(BINARY_LABELS) if binary else ["background", *(f"class_{i}" for i in range(1, largest + 1))]
    return label_names, binary


def _convert_masks(
    splits: dict[str, dict[str, list]], sources: dict[str, list], label_names: list[str] | None
) -> list[str]:
    """Add the ``mask`` and ``classes`` columns to ``splits`` from the masks in ``sources``; return the label names.

    One rule for the whole dataset (:func:`_resolve_scheme`), so a first pass gathers the values
    stored in every split's masks and a second converts them.
    """
    names = {split: _mask_names(splits[split]["id"], sources[split]) for split in splits}
    value_sets = [
        set(np.unique(mask_values(source, name)).tolist())
        for split in splits
        for source, name in zip(sources[split], names[split], strict=True)
    ]
    label_names, binary = _resolve_scheme(value_sets, label_names)

    def ids(source: Any, name: str) -> tuple[np.ndarray, str]:
        values = mask_values(source, name)
        return (binary_ids(values, name) if binary else checked_ids(values, label_names, name)), name

    for split, columns in splits.items():
        columns |= mask_columns(columns["image"], map(ids, sources[split], names[split]))
    return label_names


def _mask_names(ids: list[str], sources: list) -> list[str]:
    """How errors name a mask: its file, or ``<id> (mask)`` for masks held in a dataset without a path."""
    return [
        (source.get("path") or f"{name} (mask)") if isinstance(source, dict) else str(source)
        for source, name in zip(sources, ids, strict=True)
    ]


def _folder_pairs(split: str, directory: Path) -> tuple[list[str], list[Path], list[Path]]:
    """Matching ``images/<stem>.*`` and ``masks/<stem>.png`` of one split directory: (stems, images, masks)."""
    images_dir, masks_dir = directory / "images", directory / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise UsfmaeError(f"--{split}_dir {directory}: expected the folders images/ and masks/ (matching file stems)")
    suffixes = {suffix.lower() for suffix in Image.registered_extensions()}

    def by_stem(folder: Path, allowed: set[str]) -> dict[str, Path]:
        files: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in suffixes:
                continue
            if path.suffix.lower() not in allowed:
                raise UsfmaeError(f"{path}: masks must be PNG files (lossless label ids)")
            if path.stem in files:
                raise UsfmaeError(
                    f"{folder}: two files with the stem {path.stem!r}: {files[path.stem].name}, {path.name}"
                )
            files[path.stem] = path
        return files

    images, masks = by_stem(images_dir, suffixes), by_stem(masks_dir, {".png"})
    for missing, what, where in (
        (images.keys() - masks.keys(), "images have no mask", masks_dir),
        (masks.keys() - images.keys(), "masks have no image", images_dir),
    ):
        if missing:
            raise UsfmaeError(f"--{split}_dir: {len(missing)} {what} in {where}, e.g. {sorted(missing)[:5]}")
    if not images:
        raise UsfmaeError(f"--{split}_dir {directory}: no images in {images_dir}")
    stems = sorted(images)
    return stems, [images[s] for s in stems], [masks[s] for s in stems]


def load_segmentation_folders(dirs: dict[str, Path], label_names: list[str] | None):
    """Splits from folders (split -> directory holding ``images/`` and ``masks/`` with matching stems), as given."""
    splits, sources = {}, {}
    for split, directory in dirs.items():
        if not directory.is_dir():
            raise UsfmaeError(f"--{split}_dir {directory} is not a directory")
        stems, images, masks = _folder_pairs(split, directory)
        splits[split] = {"image": [str(p) for p in images], "id": stems}
        sources[split] = masks
    names = _convert_masks(splits, sources, label_names)
    description = (
        "Segmentation folders (images/ + masks/ per split): "
        + ", ".join(f"{split} {path}" for split, path in dirs.items())
        + "; splits used as given (no patient ids: check leakage by image content)."
    )
    return segmentation_dataset_dict(splits, names, description, {})


def load_segmentation_dataset(dataset_name: str, image_column: str, mask_column: str, label_names: list[str] | None):
    """The splits of the ``datasets`` name or path ``dataset_name``, Image columns ``image_column`` and ``mask_column``.

    Label names come from a ``classes`` ``Sequence(ClassLabel)`` column where there is one (``label_names``
    must then agree); ``patient`` and ``pixel_spacing`` columns are kept.
    """
    from datasets import ClassLabel, List, Value, load_dataset
    from datasets import Image as ImageFeature

    dataset = load_dataset(dataset_name)
    if "train" not in dataset:
        raise UsfmaeError(f"{dataset_name} has no 'train' split (splits: {', '.join(dataset)})")
    features = dataset["train"].features
    for column in (image_column, mask_column):
        if not isinstance(features.get(column), ImageFeature):
            raise UsfmaeError(f"{dataset_name}: no Image column {column!r} (columns: {', '.join(features)})")
    classes = features.get("classes")
    if isinstance(classes, List) and isinstance(classes.feature, ClassLabel):
        if label_names is not None and label_names != classes.feature.names:
            raise UsfmaeError(f"{dataset_name} names its labels {classes.feature.names}; --label_names differs")
        label_names = list(classes.feature.names)
    keep = {"patient": Value("string"), "pixel_spacing": Value("float64")}
    extra = {column: feature for column, feature in keep.items() if column in features}
    splits, sources = {}, {}
    for split in (s for s in SPLITS if s in dataset):
        ds = dataset[split].cast_column(image_column, ImageFeature(decode=False))
        ds = ds.cast_column(mask_column, ImageFeature(decode=False))
        ids = ds["id"] if "id" in ds.column_names else [f"{split}-{i}" for i in range(len(ds))]
        splits[split] = {"image": ds[image_column], "id": [str(i) for i in ids]} | {c: ds[c] for c in extra}
        sources[split] = ds[mask_column]
    names = _convert_masks(splits, sources, label_names)
    description = (
        f"Segmentation dataset {dataset_name} (columns {image_column!r}, {mask_column!r}); splits as published."
    )
    return segmentation_dataset_dict(splits, names, description, extra)
