"""Segmentation data: images with label masks as leakage-safe ``DatasetDict``s (train / validation / test).

Every source becomes splits with the columns ``image`` (``datasets.Image``; files are read lazily),
``mask`` (``datasets.Image``: single-channel PNG of label ids ``0..K-1``, decoded as mode ``L``),
``classes`` (the label ids present in that mask, ``Sequence(ClassLabel)`` naming all ``K`` labels,
background first: ``ds.features["classes"].feature.names``), ``id`` (file stem), plus ``patient`` where
the layout knows patients and ``pixel_spacing`` (mm; None when unknown) where it knows the spacing.
Masks are converted once, at load time, whatever their stored form (0/1 or 0/255 binaries, colour
codes, outlines), so every consumer reads plain label ids; a value that is not a label is an error.

Sources (:func:`load_segmentation_images`): ``--train_dir`` etc. holding ``images/`` + ``masks/``, a
``datasets`` name or path with image and mask columns, or a ``--task`` of :data:`SEGMENTATION_TASKS`
(BUS-BRA, BUSI, MMOTU-2D binary and 8-class, HC18). The task adapters find their dataset under
``data_root`` like :mod:`usfmae_hf.evaluation.adapters`, use the official test split where there is
one, carve validation by patient where patients are known, and record the protocol in
``Dataset.info.description``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.evaluation.adapters import (
    MMOTU2D_CLASSES,
    _carve_validation,
    _find_marker,
    _image_files,
    _read_cls_file,
    _resolve,
    _take,
    load_busbra,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BINARY_LABELS",
    "HC18_LABELS",
    "MMOTU2D_PALETTE",
    "MMOTU2D_SEG_LABELS",
    "SEGMENTATION_TASKS",
    "load_busbra_seg",
    "load_busi_seg",
    "load_hc18_seg",
    "load_mmotu2d_seg",
    "load_mmotu2d_seg8",
    "load_segmentation_images",
]

BINARY_LABELS = ("background", "lesion")
HC18_LABELS = ("background", "head")
MMOTU2D_SEG_LABELS = ("background", *MMOTU2D_CLASSES)
# RGB of each class in MMOTU-2D's colour annotations (annotations/<id>.PNG), in MMOTU2D_CLASSES order.
# Source: the dataset authors' loader, cv516Buaa/MMOTU_DS2Net mmseg/datasets/mmotu.py (the 8-class
# PALETTE beside CLASSES), and the same table applied to the released files in
# adamtupper/usaugment-experiments scripts/data/mmotu/prepare_mmotu.py (PIXEL_TO_CLASS).
MMOTU2D_PALETTE: dict[tuple[int, int, int], int] = {
    (0, 0, 0): 0,
    (64, 0, 0): 1,
    (0, 64, 0): 2,
    (0, 0, 64): 3,
    (64, 0, 64): 4,
    (64, 64, 0): 5,
    (64, 64, 64): 6,
    (0, 128, 0): 7,
    (0, 0, 128): 8,
}

# --task name -> (loader in this module, its fold keyword or None, display name for model cards)
SEGMENTATION_TASKS: dict[str, tuple[str, str | None, str]] = {
    "busbra_seg": ("load_busbra_seg", "fold", "BUS-BRA"),
    "busi_seg": ("load_busi_seg", None, "BUSI"),
    "mmotu2d_seg": ("load_mmotu2d_seg", None, "MMOTU-2D"),
    "mmotu2d_seg8": ("load_mmotu2d_seg8", None, "MMOTU-2D"),
    "hc18_seg": ("load_hc18_seg", None, "HC18"),
}

SPLITS = ("train", "validation", "test")
_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "LA", "PA")
_HC18_IMAGE = re.compile(r"^(\d+)_(\d*)HC$", re.IGNORECASE)
_BUSI_MASK = re.compile(r"^(.+)_mask(?:_\d+)?$", re.IGNORECASE)


# ---------------------------------------------------------------- masks


def _file(source: str | os.PathLike | dict) -> str | os.PathLike | io.BytesIO:
    """What ``Image.open`` reads for a path or a ``datasets.Image`` ``{"bytes", "path"}`` item."""
    if isinstance(source, dict):
        return io.BytesIO(source["bytes"]) if source.get("bytes") else source["path"]
    return source


def _open(source: str | os.PathLike | dict, name: str) -> Image.Image:
    """The decoded mask image; an undecodable one is an :class:`UnreadableImageError` naming it."""
    try:
        image = Image.open(_file(source))
        image.load()
        return image
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"{name}: cannot decode the mask ({error}); re-export it as PNG") from error


def _mask_values(source: str | os.PathLike | dict, name: str) -> np.ndarray:
    """The stored values of a label mask as a 2-D integer array (palette images give their indices).

    Grey masks saved as RGB(A) with three equal channels are accepted; real colour is not a label id.
    """
    image = _open(source, name)
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


def _binary_ids(values: np.ndarray, name: str) -> np.ndarray:
    """0/1 or 0/255 -> 0/1 (background/foreground); anything else is an error naming the value."""
    present = set(np.unique(values).tolist())
    if present <= {0, 1}:
        return values
    if present <= {0, 255}:
        return values // 255
    bad = min(present - ({0, 1} if 1 in present else {0, 255}))
    raise UsfmaeError(f"{name}: binary mask holds value {bad}; expected 0/1 or 0/255 (background/foreground)")


def _checked_ids(values: np.ndarray, label_names: Sequence[str], name: str) -> np.ndarray:
    if (bad := int(values.min(initial=0))) < 0 or (bad := int(values.max(initial=0))) >= len(label_names):
        raise UsfmaeError(
            f"{name}: mask value {bad} is not a label id (0..{len(label_names) - 1}: {', '.join(label_names)}); "
            "fix the mask or pass --label_names with one name per id"
        )
    return values


def _mmotu_colour_ids(source: Path) -> np.ndarray:
    rgb = np.asarray(_open(source, str(source)).convert("RGB")).astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    palette = {(r << 16) | (g << 8) | b: index for (r, g, b), index in MMOTU2D_PALETTE.items()}
    colours, inverse = np.unique(codes, return_inverse=True)
    if unknown := [int(c) for c in colours if int(c) not in palette]:
        colour = ((unknown[0] >> 16) & 255, (unknown[0] >> 8) & 255, unknown[0] & 255)
        raise UsfmaeError(f"{source}: colour {colour} is not in the MMOTU-2D class palette; is it an MMOTU annotation?")
    return np.array([palette[int(c)] for c in colours])[inverse.reshape(codes.shape)]


def _fill_outline(source: Path, bridge: int = 3) -> tuple[np.ndarray, bool]:
    """Solid mask from a drawn outline (HC18), and whether the convex-hull fallback filled it.

    Gaps of up to ``2 * bridge`` pixels are closed by dilating the outline ``bridge`` times (3x3), filling
    the holes and eroding the solid back as much: the closing of the filled shape, which is the shape
    itself for a convex head. The outline is padded first so that the erosion does not eat into heads
    at the image border. An outline that still encloses nothing (a head cut by the image border) is
    filled as the convex hull of its pixels, exact for an ellipse cut along one border.
    """
    from scipy import ndimage

    outline = _mask_values(source, str(source)) > 0
    if not outline.any():
        raise UsfmaeError(f"{source}: the annotation is empty; expected a head outline")
    square, pad = np.ones((3, 3), bool), bridge + 1
    thick = ndimage.binary_dilation(np.pad(outline, pad), square, iterations=bridge)
    solid = ndimage.binary_fill_holes(thick)
    if solid.sum() == thick.sum():
        return _convex_hull_mask(outline, source), True
    solid = ndimage.binary_erosion(solid, square, iterations=bridge)[pad:-pad, pad:-pad]
    return (solid | outline).astype(np.int64), False


def _convex_hull_mask(outline: np.ndarray, source: Path) -> np.ndarray:
    from PIL import ImageDraw
    from scipy.spatial import ConvexHull, QhullError

    rows, cols = np.nonzero(outline)
    points = np.c_[cols, rows]
    try:
        hull = points[ConvexHull(points).vertices]
    except QhullError as error:
        raise UsfmaeError(f"{source}: the outline encloses no area; expected a head outline") from error
    canvas = Image.new("L", outline.shape[::-1], 0)
    ImageDraw.Draw(canvas).polygon([tuple(map(int, p)) for p in hull], fill=1, outline=1)
    return np.asarray(canvas).astype(np.int64) | outline


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


def _mask_columns(images: list, masks: Iterable[tuple[np.ndarray, str]]) -> dict[str, list]:
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


def _segmentation_dict(
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


# ---------------------------------------------------------------- generic sources


def _read_label_names(label_names: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
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
        set(np.unique(_mask_values(source, name)).tolist())
        for split in splits
        for source, name in zip(sources[split], names[split], strict=True)
    ]
    label_names, binary = _resolve_scheme(value_sets, label_names)

    def ids(source: Any, name: str) -> tuple[np.ndarray, str]:
        values = _mask_values(source, name)
        return (_binary_ids(values, name) if binary else _checked_ids(values, label_names, name)), name

    for split, columns in splits.items():
        columns |= _mask_columns(columns["image"], map(ids, sources[split], names[split]))
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


def _load_folders(dirs: dict[str, Path], label_names: list[str] | None):
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
    return _segmentation_dict(splits, names, description, {})


def _load_named_dataset(dataset_name: str, image_column: str, mask_column: str, label_names: list[str] | None):
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
    return _segmentation_dict(splits, names, description, extra)


# ---------------------------------------------------------------- task adapters


def _binary_file(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    return _binary_ids(_mask_values(path, str(path)), str(path)), str(path)


def load_busbra_seg(root: str | os.PathLike, fold: int = 1, n_folds: int = 5, val_fraction: float = 0.2, seed: int = 0):
    """BUS-BRA lesion masks (``Masks/mask_NNNN-x.png`` for ``Images/bus_NNNN-x.png``), background/lesion.

    The splits are those of :func:`~usfmae_hf.evaluation.adapters.load_busbra`: test = the official,
    patient-disjoint fold ``fold`` of ``{n_folds}-fold-cv.csv``; the other folds split into train and
    validation by patient. Extra columns: ``patient`` (``Case``) and ``pathology`` (benign/malignant).
    """
    from datasets import ClassLabel, Value
    from datasets import Image as ImageFeature

    classification = load_busbra(root, fold=fold, n_folds=n_folds, val_fraction=val_fraction, seed=seed)
    splits = {}
    for split, ds in classification.items():
        images = [item["path"] for item in ds.cast_column("image", ImageFeature(decode=False))["image"]]
        masks_dir = Path(images[0]).parent.parent / "Masks"
        names = [f"mask_{image_id.removeprefix('bus_')}.png" for image_id in ds["id"]]
        masks = _resolve(_image_files(masks_dir, "BUS-BRA"), names, f"BUS-BRA masks in {masks_dir}")
        splits[split] = {"image": images, "id": ds["id"], "patient": ds["case"], "pathology": ds["label"]}
        splits[split] |= _mask_columns(images, map(_binary_file, masks))
    description = (
        "BUS-BRA breast lesion segmentation (background/lesion; Masks/mask_*.png, 0/255 read as 0/1). "
        f"Splits shared with the benign/malignant adapter: {classification['train'].info.description}"
    )
    pathology = ClassLabel(names=classification["train"].features["label"].names)
    return _segmentation_dict(splits, BINARY_LABELS, description, {"patient": Value("string"), "pathology": pathology})


def _busi_pairs(folder: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Images and their masks (``<stem>_mask.png``, ``<stem>_mask_1.png``, ...) in one BUSI class folder."""
    images: dict[str, Path] = {}
    masks: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".png" or path.name.startswith("."):
            continue
        if match := _BUSI_MASK.match(path.stem):
            masks.setdefault(match.group(1), []).append(path)
        else:
            images[path.stem] = path
    for missing, what in (
        (images.keys() - masks.keys(), "images have no mask"),
        (masks.keys() - images.keys(), "masks have no image"),
    ):
        if missing:
            raise UsfmaeError(f"BUSI: {len(missing)} {what} in {folder}, e.g. {sorted(missing)[:5]}")
    return images, masks


def _union(paths: list[Path]) -> tuple[np.ndarray, str]:
    masks = [_binary_file(path)[0] for path in paths]
    if len({mask.shape for mask in masks}) > 1:
        raise UsfmaeError(f"BUSI: the masks {[p.name for p in paths]} differ in size")
    return np.maximum.reduce(masks), str(paths[0])


def load_busi_seg(root: str | os.PathLike, test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 0):
    """BUSI breast lesions, background/lesion: a lesion mask is the union of ``<name>_mask.png``, ``_mask_1``, ...

    BUSI publishes no split and no patient ids: test and then validation are carved by a seeded split
    stratified by class folder (benign / malignant / normal). Extra column: ``category``.
    """
    from datasets import ClassLabel

    folder = _find_marker(root, "benign (1).png", "BUSI").parent.parent
    categories = [c for c in ("benign", "malignant", "normal") if (folder / c).is_dir()]
    columns: dict[str, list] = {"image": [], "id": [], "category": []}
    mask_files = []
    for index, category in enumerate(categories):
        images, masks = _busi_pairs(folder / category)
        for stem in sorted(images):
            columns["image"].append(str(images[stem]))
            columns["id"].append(stem)
            columns["category"].append(index)
            mask_files.append(masks[stem])
    columns |= _mask_columns(columns["image"], map(_union, mask_files))
    labels = np.asarray(columns["category"])
    rest, test = _carve_validation(labels, None, test_fraction, seed, dataset="BUSI")
    train, validation = _carve_validation(labels[rest], None, val_fraction, seed, dataset="BUSI")
    description = (
        "BUSI breast lesion segmentation (background/lesion; a lesion is the union of <name>_mask*.png). "
        "BUSI has no official split and no patient ids: test = StratifiedShuffleSplit by class folder "
        f"(test_size={test_fraction}, random_state={seed}), validation carved from the rest the same way "
        f"(test_size={val_fraction}). Near-duplicate images are reported in BUSI: check leakage by image content."
    )
    splits = {
        "train": _take(columns, rest[train]),
        "validation": _take(columns, rest[validation]),
        "test": _take(columns, test),
    }
    return _segmentation_dict(splits, BINARY_LABELS, description, {"category": ClassLabel(names=categories)})


def _read_stems(path: Path) -> list[str]:
    if not path.is_file():
        raise UsfmaeError(f"MMOTU-2D: {path} is missing (the segmentation split: one image id per line)")
    return [Path(line.strip()).stem for line in path.read_text().splitlines() if line.strip()]


def load_mmotu2d_seg(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, multiclass: bool = False):
    """MMOTU-2D ovarian tumour masks from the official segmentation split (``train.txt`` / ``val.txt``).

    Binary (default): ``annotations/<id>_binary.PNG``, background/lesion. ``multiclass=True``: the colour
    annotations ``annotations/<id>.PNG`` mapped through :data:`MMOTU2D_PALETTE` to background + the 8
    tumour classes. ``val.txt`` is the release's test set; validation is carved from ``train.txt``,
    stratified by the image's tumour class (``train_cls.txt``); there are no patient ids.
    """
    folder = _find_marker(root, "train_cls.txt", "MMOTU-2D").parent
    train_stems, test_stems = _read_stems(folder / "train.txt"), _read_stems(folder / "val.txt")
    image_files = _image_files(folder / "images", "MMOTU-2D")
    annotation_files = _image_files(folder / "annotations", "MMOTU-2D")
    suffix = ".PNG" if multiclass else "_binary.PNG"

    def read(path: str) -> tuple[np.ndarray, str]:
        return (_mmotu_colour_ids(Path(path)), path) if multiclass else _binary_file(path)

    def columns(stems: list[str]) -> dict[str, list]:
        images = _resolve(image_files, [f"{s}.JPG" for s in stems], "MMOTU-2D")
        annotations = _resolve(annotation_files, [f"{s}{suffix}" for s in stems], "MMOTU-2D annotations")
        return {"image": images, "id": stems} | _mask_columns(images, map(read, annotations))

    image_class = {Path(name).stem: label for name, label in zip(*_read_cls_file(folder / "train_cls.txt"))}
    train_all, test = columns(train_stems), columns(test_stems)
    strata = np.asarray([image_class.get(stem, -1) for stem in train_stems])
    train, validation = _carve_validation(strata, None, val_fraction, seed, dataset="MMOTU-2D")
    task = "8 tumour classes (colour annotations <id>.PNG)" if multiclass else "background/lesion (<id>_binary.PNG)"
    description = (
        f"MMOTU-2D ovarian tumour segmentation, {task}. test: the release's val.txt; train/validation: train.txt "
        f"split with StratifiedShuffleSplit by image class from train_cls.txt (test_size={val_fraction}, "
        f"random_state={seed}); no patient ids are published."
    )
    labels = MMOTU2D_SEG_LABELS if multiclass else BINARY_LABELS
    splits = {"train": _take(train_all, train), "validation": _take(train_all, validation), "test": test}
    return _segmentation_dict(splits, labels, description, {})


def load_mmotu2d_seg8(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0):
    """MMOTU-2D with background + the 8 tumour classes: :func:`load_mmotu2d_seg` with ``multiclass=True``."""
    return load_mmotu2d_seg(root, val_fraction=val_fraction, seed=seed, multiclass=True)


def _find_hc18(root: str | os.PathLike) -> Path:
    """The ``training_set`` folder holding ``*HC_Annotation.png`` in ``root`` or below."""
    root = Path(root)
    if not root.is_dir():
        raise UsfmaeError(f"{root}: not a folder")
    candidates = [root] if root.name.lower() == "training_set" else []
    candidates += sorted(p for p in root.rglob("*") if p.is_dir() and p.name.lower() == "training_set")
    found = [p for p in candidates if any(p.glob("*_Annotation.png"))]
    if not found:
        raise UsfmaeError(f"no HC18 found under {root} (looked for training_set/ with *_HC_Annotation.png)")
    if len(found) > 1:
        raise UsfmaeError(f"several HC18 copies under {root}: {', '.join(map(str, found[:3]))}; pass one of them")
    return found[0]


def _hc18_measurements(folder: Path) -> dict[str, tuple[float, float]]:
    """file name -> (pixel size mm, head circumference mm) from ``training_set_pixel_size_and_HC.csv``, if present."""
    import csv

    for path in (folder / "training_set_pixel_size_and_HC.csv", folder.parent / "training_set_pixel_size_and_HC.csv"):
        if path.is_file():
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            try:
                return {
                    row["filename"].strip(): (float(row["pixel size(mm)"]), float(row["head circumference (mm)"]))
                    for row in rows
                }
            except (KeyError, ValueError) as error:
                raise UsfmaeError(
                    f"{path}: expected the columns filename,pixel size(mm),head circumference (mm) ({error!r})"
                ) from error
    return {}


def load_hc18_seg(root: str | os.PathLike, test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 0):
    """HC18 fetal heads, background/head: each ``NNN_HC_Annotation.png`` outline filled into a solid mask.

    Only the training set is annotated, so test and then validation are carved from it by patient: the
    leading number of the file name (``010_HC.png`` and ``010_2HC.png`` come from one examination).
    ``pixel_spacing`` and ``head_circumference_mm`` come from ``training_set_pixel_size_and_HC.csv`` when
    it sits beside (or in) ``training_set/``; None otherwise.
    """
    from datasets import Value

    folder = _find_hc18(root)
    images = sorted(p for p in folder.glob("*.png") if _HC18_IMAGE.match(p.stem))
    if missing := [p.name for p in images if not (folder / f"{p.stem}_Annotation.png").is_file()]:
        raise UsfmaeError(f"HC18: {len(missing)} images in {folder} have no _Annotation.png, e.g. {missing[:5]}")
    measured = _hc18_measurements(folder)
    hull_filled = []

    def filled(image: Path) -> tuple[np.ndarray, str]:
        annotation = folder / f"{image.stem}_Annotation.png"
        mask, by_hull = _fill_outline(annotation)
        if by_hull:
            hull_filled.append(annotation.name)
        return mask, str(annotation)

    columns = {
        "image": [str(p) for p in images],
        "id": [p.stem for p in images],
        "patient": [_HC18_IMAGE.match(p.stem).group(1) for p in images],
        "pixel_spacing": [measured.get(p.name, (None, None))[0] for p in images],
        "head_circumference_mm": [measured.get(p.name, (None, None))[1] for p in images],
    }
    columns |= _mask_columns(columns["image"], map(filled, images))
    if hull_filled:
        logger.warning(
            "HC18: %d outlines enclose no area (cut by the image border?), filled as convex hulls, e.g. %s",
            len(hull_filled),
            hull_filled[:3],
        )
    patients = np.asarray(columns["patient"])
    rest, test = _carve_validation(np.zeros(len(images)), patients, test_fraction, seed, dataset="HC18")
    train, validation = _carve_validation(np.zeros(len(rest)), patients[rest], val_fraction, seed, dataset="HC18")
    description = (
        "HC18 fetal head segmentation (background/head; outlines filled after bridging gaps of up to 6 pixels, "
        "as a convex hull when they enclose nothing). Only training_set/ is annotated: test = GroupShuffleSplit "
        f"by patient (the leading number of the file name; test_size={test_fraction}, random_state={seed}), "
        "validation carved "
        f"from the rest the same way (test_size={val_fraction}). pixel_spacing (mm): "
        + (
            "training_set_pixel_size_and_HC.csv."
            if measured
            else "unknown (training_set_pixel_size_and_HC.csv not found)."
        )
    )
    splits = {
        "train": _take(columns, rest[train]),
        "validation": _take(columns, rest[validation]),
        "test": _take(columns, test),
    }
    extra = {"patient": Value("string"), "pixel_spacing": Value("float64"), "head_circumference_mm": Value("float64")}
    return _segmentation_dict(splits, HC18_LABELS, description, extra)


# ---------------------------------------------------------------- entry point


def load_segmentation_images(
    *,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    test_dir: str | None = None,
    dataset_name: str | None = None,
    image_column: str = "image",
    mask_column: str = "mask",
    task: str | None = None,
    data_root: str | None = None,
    fold: int | None = None,
    label_names: Sequence[str] | str | os.PathLike | None = None,
):
    """Load one segmentation source: ``images/`` + ``masks/`` directories, a ``datasets`` name/path, or a ``--task``.

    Directories: each of ``train_dir`` / ``validation_dir`` / ``test_dir`` holds ``images/`` (any image
    format) and ``masks/`` (PNG) with matching file stems. Masks holding only 0/1 or 0/255 are
    background/lesion; other masks hold label ids, named by ``label_names`` (a list, or a text file
    with one name per line, or a JSON list) or ``background, class_1, ...``. A ``dataset_name`` needs
    Image columns ``image_column`` and ``mask_column``; its label names come from a ``classes``
    ``Sequence(ClassLabel)`` column if it has one. ``task`` is a key of :data:`SEGMENTATION_TASKS`,
    read from ``data_root`` (``fold`` selects the official fold where the dataset has folds).
    """
    sources = [train_dir is not None, dataset_name is not None, task is not None]
    if sum(sources) != 1:
        raise UsfmaeError("give exactly one data source: --train_dir, --dataset_name or --task")
    if task is not None:
        if label_names is not None:
            raise UsfmaeError(f"--task {task} has fixed label names; --label_names does not apply")
        return _load_segmentation_task(task, data_root, fold)
    names = _read_label_names(label_names)
    if train_dir is not None:
        dirs = {"train": train_dir, "validation": validation_dir, "test": test_dir}
        return _load_folders({split: Path(path) for split, path in dirs.items() if path is not None}, names)
    return _load_named_dataset(dataset_name, image_column, mask_column, names)


def _load_segmentation_task(task: str, data_root: str | None, fold: int | None):
    if task not in SEGMENTATION_TASKS:
        raise UsfmaeError(f"unknown segmentation task {task!r}; choose one of {', '.join(SEGMENTATION_TASKS)}")
    if data_root is None:
        raise UsfmaeError(f"--task {task} needs --data_root (the folder where the dataset was unpacked)")
    loader_name, fold_keyword, display = SEGMENTATION_TASKS[task]
    kwargs = {}
    if fold is not None:
        if fold_keyword is None:
            raise UsfmaeError(f"{display} ({task}) has a single split; --fold does not apply")
        kwargs[fold_keyword] = fold
    return globals()[loader_name](data_root, **kwargs)
