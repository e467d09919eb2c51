"""The segmentation ``--task`` adapters: BUS-BRA, BUSI, MMOTU-2D (binary and 8-class) and HC18.

Each finds its dataset under ``root`` like :mod:`usfmae_hf.evaluation.adapters`, converts the release's
masks (0/255 binaries, MMOTU-2D's colour codes, HC18's head outlines) to label ids, uses the official
test split where there is one, carves validation by patient where patients are known, and records the
protocol in ``Dataset.info.description``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.evaluation.adapters import MMOTU2D_CLASSES, load_busbra
from usfmae_hf.evaluation.dataset_files import (
    carve_validation,
    find_marker,
    image_files,
    read_cls_file,
    resolve_files,
    take_rows,
)
from usfmae_hf.evaluation.segmentation_masks import (
    BINARY_LABELS,
    binary_mask_file,
    mask_columns,
    mask_values,
    open_mask,
    segmentation_dataset_dict,
)

logger = logging.getLogger(__name__)

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

_HC18_IMAGE = re.compile(r"^(\d+)_(\d*)HC$", re.IGNORECASE)
_BUSI_MASK = re.compile(r"^(.+)_mask(?:_\d+)?$", re.IGNORECASE)


def _mmotu_colour_ids(source: Path) -> np.ndarray:
    rgb = np.asarray(open_mask(source, str(source)).convert("RGB")).astype(np.int64)
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

    outline = mask_values(source, str(source)) > 0
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
        masks = resolve_files(image_files(masks_dir, "BUS-BRA"), names, f"BUS-BRA masks in {masks_dir}")
        splits[split] = {"image": images, "id": ds["id"], "patient": ds["case"], "pathology": ds["label"]}
        splits[split] |= mask_columns(images, map(binary_mask_file, masks))
    description = (
        "BUS-BRA breast lesion segmentation (background/lesion; Masks/mask_*.png, 0/255 read as 0/1). "
        f"Splits shared with the benign/malignant adapter: {classification['train'].info.description}"
    )
    pathology = ClassLabel(names=classification["train"].features["label"].names)
    return segmentation_dataset_dict(
        splits, BINARY_LABELS, description, {"patient": Value("string"), "pathology": pathology}
    )


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
    masks = [binary_mask_file(path)[0] for path in paths]
    if len({mask.shape for mask in masks}) > 1:
        raise UsfmaeError(f"BUSI: the masks {[p.name for p in paths]} differ in size")
    return np.maximum.reduce(masks), str(paths[0])


def load_busi_seg(root: str | os.PathLike, test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 0):
    """BUSI breast lesions, background/lesion: a lesion mask is the union of ``<name>_mask.png``, ``_mask_1``, ...

    BUSI publishes no split and no patient ids: test and then validation are carved by a seeded split
    stratified by class folder (benign / malignant / normal). Extra column: ``category``.
    """
    from datasets import ClassLabel

    folder = find_marker(root, "benign (1).png", "BUSI").parent.parent
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
    columns |= mask_columns(columns["image"], map(_union, mask_files))
    labels = np.asarray(columns["category"])
    rest, test = carve_validation(labels, None, test_fraction, seed, dataset="BUSI")
    train, validation = carve_validation(labels[rest], None, val_fraction, seed, dataset="BUSI")
    description = (
        "BUSI breast lesion segmentation (background/lesion; a lesion is the union of <name>_mask*.png). "
        "BUSI has no official split and no patient ids: test = StratifiedShuffleSplit by class folder "
        f"(test_size={test_fraction}, random_state={seed}), validation carved from the rest the same way "
        f"(test_size={val_fraction}). Near-duplicate images are reported in BUSI: check leakage by image content."
    )
    splits = {
        "train": take_rows(columns, rest[train]),
        "validation": take_rows(columns, rest[validation]),
        "test": take_rows(columns, test),
    }
    return segmentation_dataset_dict(splits, BINARY_LABELS, description, {"category": ClassLabel(names=categories)})


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
    folder = find_marker(root, "train_cls.txt", "MMOTU-2D").parent
    train_stems, test_stems = _read_stems(folder / "train.txt"), _read_stems(folder / "val.txt")
    jpegs = image_files(folder / "images", "MMOTU-2D")
    annotation_files = image_files(folder / "annotations", "MMOTU-2D")
    suffix = ".PNG" if multiclass else "_binary.PNG"

    def read(path: str) -> tuple[np.ndarray, str]:
        return (_mmotu_colour_ids(Path(path)), path) if multiclass else binary_mask_file(path)

    def columns(stems: list[str]) -> dict[str, list]:
        images = resolve_files(jpegs, [f"{s}.JPG" for s in stems], "MMOTU-2D")
        annotations = resolve_files(annotation_files, [f"{s}{suffix}" for s in stems], "MMOTU-2D annotations")
        return {"image": images, "id": stems} | mask_columns(images, map(read, annotations))

    image_class = {Path(name).stem: label for name, label in zip(*read_cls_file(folder / "train_cls.txt"))}
    train_all, test = columns(train_stems), columns(test_stems)
    strata = np.asarray([image_class.get(stem, -1) for stem in train_stems])
    train, validation = carve_validation(strata, None, val_fraction, seed, dataset="MMOTU-2D")
    task = "8 tumour classes (colour annotations <id>.PNG)" if multiclass else "background/lesion (<id>_binary.PNG)"
    description = (
        f"MMOTU-2D ovarian tumour segmentation, {task}. test: the release's val.txt; train/validation: train.txt "
        f"split with StratifiedShuffleSplit by image class from train_cls.txt (test_size={val_fraction}, "
        f"random_state={seed}); no patient ids are published."
    )
    labels = MMOTU2D_SEG_LABELS if multiclass else BINARY_LABELS
    splits = {"train": take_rows(train_all, train), "validation": take_rows(train_all, validation), "test": test}
    return segmentation_dataset_dict(splits, labels, description, {})


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
    columns |= mask_columns(columns["image"], map(filled, images))
    if hull_filled:
        logger.warning(
            "HC18: %d outlines enclose no area (cut by the image border?), filled as convex hulls, e.g. %s",
            len(hull_filled),
            hull_filled[:3],
        )
    patients = np.asarray(columns["patient"])
    rest, test = carve_validation(np.zeros(len(images)), patients, test_fraction, seed, dataset="HC18")
    train, validation = carve_validation(np.zeros(len(rest)), patients[rest], val_fraction, seed, dataset="HC18")
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
        "train": take_rows(columns, rest[train]),
        "validation": take_rows(columns, rest[validation]),
        "test": take_rows(columns, test),
    }
    extra = {"patient": Value("string"), "pixel_spacing": Value("float64"), "head_circumference_mm": Value("float64")}
    return segmentation_dataset_dict(splits, HC18_LABELS, description, extra)
