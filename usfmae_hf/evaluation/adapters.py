"""Downstream evaluation sets as leakage-safe ``DatasetDict``s (train / validation / test).

Each loader finds its dataset under ``root`` (the unpacked folder or any folder above it) by a marker
file, reads the official test split, carves the validation split out of the training data (by patient
where patients are known), and records the protocol in ``Dataset.info.description``. Columns:
``image`` (``datasets.Image``, read lazily from the files), ``label`` (``ClassLabel``), ``id`` (file stem),
plus the patient column where one exists.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from usfmae_hf.errors import UsfmaeError

logger = logging.getLogger(__name__)

__all__ = ["BUSBRA_CLASSES", "MMOTU2D_CLASSES", "load_busbra", "load_gist514", "load_mmotu2d"]

BUSBRA_CLASSES = ("benign", "malignant")
MMOTU2D_CLASSES = (
    "chocolate cyst",
    "serous cystadenoma",
    "teratoma",
    "theca cell tumor",
    "simple cyst",
    "normal ovary",
    "mucinous cystadenoma",
    "high grade serous cystadenoma",
)


def _find_marker(root: str | os.PathLike, name: str, dataset: str) -> Path:
    """The one file called ``name`` in ``root`` or below (hidden folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise UsfmaeError(f"{root}: not a folder")
    if (root / name).is_file():
        return root / name
    found = sorted(
        p
        for p in root.rglob(name)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not found:
        raise UsfmaeError(f"no {dataset} found under {root} (looked for {name})")
    if len(found) > 1:
        raise UsfmaeError(
            f"several {dataset} copies under {root}: {', '.join(map(str, found[:3]))}; pass one of their folders"
        )
    return found[0]


def _image_files(folder: Path, dataset: str) -> dict[str, Path]:
    """Lower-case file name -> path for the files of ``folder`` (file-name case differs between copies)."""
    if not folder.is_dir():
        raise UsfmaeError(f"{dataset}: image folder {folder} is missing")
    return {p.name.lower(): p for p in folder.iterdir() if p.is_file()}


def _resolve(files: dict[str, Path], names: list[str], dataset: str) -> list[str]:
    missing = [name for name in names if name.lower() not in files]
    if missing:
        raise UsfmaeError(f"{dataset}: {len(missing)} listed images are missing, e.g. {missing[:3]}")
    return [str(files[name.lower()]) for name in names]


def _carve_validation(
    labels: np.ndarray, groups: np.ndarray | None, val_fraction: float, seed: int, *, dataset: str
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (train, validation): patient-disjoint when ``groups`` is given, else stratified by label.

    A split too small to stratify (fewer validation images than classes, or a class with one image)
    falls back to an unstratified shuffle split, with a warning; fewer than two images (or patients)
    is one clear error naming the dataset.
    """
    from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit, StratifiedShuffleSplit

    if not 0.0 < val_fraction < 1.0:
        raise UsfmaeError(f"val_fraction must be in (0, 1), got {val_fraction}")
    units = len(set(groups.tolist())) if groups is not None else len(labels)
    if units < 2:
        what = "patients" if groups is not None else "training images"
        raise UsfmaeError(f"{dataset}: {units} {what} cannot be split into train and validation; at least 2 are needed")
    if groups is not None:
        splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        return next(splitter.split(labels, labels, groups))
    n_validation = max(1, int(np.ceil(val_fraction * len(labels))))
    _, counts = np.unique(labels, return_counts=True)
    if n_validation < len(counts) or counts.min() < 2 or len(labels) - n_validation < len(counts):
        logger.warning(
            "%s: %d training images in %d classes are too few for a stratified %.0f%% validation split; "
            "using an unstratified one (some classes may be missing from validation)",
            dataset,
            len(labels),
            len(counts),
            100 * val_fraction,
        )
        splitter = ShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        return next(splitter.split(labels))
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    return next(splitter.split(labels, labels))


def _dataset_dict(
    splits: dict[str, dict[str, list]], class_names: tuple[str, ...], description: str, extra: tuple[str, ...] = ()
):
    from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image, Value

    features = Features(
        {"image": Image(), "label": ClassLabel(names=list(class_names)), "id": Value("string")}
        | {column: Value("string") for column in extra}
    )
    return DatasetDict(
        {
            name: Dataset.from_dict(columns, info=DatasetInfo(description=description, features=features), split=name)
            for name, columns in splits.items()
        }
    )


def _take(columns: dict[str, list], indices) -> dict[str, list]:
    return {key: [values[i] for i in indices] for key, values in columns.items()}


def load_busbra(root: str | os.PathLike, fold: int = 1, n_folds: int = 5, val_fraction: float = 0.2, seed: int = 0):
    """BUS-BRA benign/malignant with the official patient-disjoint test fold and a patient-level validation split.

    The test split is fold ``fold`` of ``{n_folds}-fold-cv.csv`` (rows whose ``valid_{fold}`` is empty);
    the other folds are split into train/validation by patient (``Case`` of ``bus_data.csv``) with
    ``GroupShuffleSplit`` - not by the CSV's image-level ``valid_{fold}`` column, which puts images of one
    patient on both sides. Extra column: ``case``.
    """
    import pandas as pd

    csv_path = _find_marker(root, "bus_data.csv", "BUS-BRA")
    folds_path = csv_path.parent / f"{n_folds}-fold-cv.csv"
    if not folds_path.is_file():
        raise UsfmaeError(f"BUS-BRA: {folds_path} is missing (n_folds={n_folds}; the release has 5 and 10)")
    if not 1 <= fold <= n_folds:
        raise UsfmaeError(f"BUS-BRA: fold must be in 1..{n_folds}, got {fold}")
    table = pd.read_csv(csv_path, dtype={"ID": str, "Case": str}).merge(
        pd.read_csv(folds_path, dtype={"ID": str})[["ID", f"valid_{fold}"]], on="ID", how="inner", validate="one_to_one"
    )
    pathology = table["Pathology"].str.strip().str.lower()
    if not pathology.isin(BUSBRA_CLASSES).all():
        raise UsfmaeError(f"BUS-BRA: unexpected Pathology values {sorted(set(pathology) - set(BUSBRA_CLASSES))}")
    files = _image_files(csv_path.parent / "Images", "BUS-BRA")
    columns = {
        "image": _resolve(files, [f"{i}.png" for i in table["ID"]], "BUS-BRA"),
        "label": [BUSBRA_CLASSES.index(p) for p in pathology],
        "id": list(table["ID"]),
        "case": list(table["Case"]),
    }
    is_test = table[f"valid_{fold}"].isna().to_numpy()
    rest = np.flatnonzero(~is_test)
    train, validation = _carve_validation(
        np.asarray(columns["label"])[rest], table["Case"].to_numpy()[rest], val_fraction, seed, dataset="BUS-BRA"
    )
    description = (
        f"BUS-BRA benign vs malignant. test: official fold {fold} of {n_folds}-fold-cv.csv (valid_{fold} empty, "
        f"patient-disjoint). train/validation: the other folds split by patient (Case) with "
        f"GroupShuffleSplit(test_size={val_fraction}, random_state={seed}); the CSV's image-level "
        f"valid_{fold} train/validation assignment is not used."
    )
    splits = {
        "train": _take(columns, rest[train]),
        "validation": _take(columns, rest[validation]),
        "test": _take(columns, np.flatnonzero(is_test)),
    }
    return _dataset_dict(splits, BUSBRA_CLASSES, description, extra=("case",))


def _read_cls_file(path: Path) -> tuple[list[str], list[int]]:
    names, labels = [], []
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise UsfmaeError(f"{path}:{line_number}: expected '<image> <label>', got {line!r}")
        names.append(fields[0])
        labels.append(int(fields[1]))
    return names, labels


def load_mmotu2d(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0):
    """MMOTU-2D ovarian tumours, 8 classes: official train/test from ``train_cls.txt``/``val_cls.txt``.

    The release's ``val_cls.txt`` is its test set; validation is carved from ``train_cls.txt``,
    stratified by class (there are no patient ids, so only image content can be checked for leakage).
    """
    train_file = _find_marker(root, "train_cls.txt", "MMOTU-2D")
    test_file = train_file.parent / "val_cls.txt"
    if not test_file.is_file():
        raise UsfmaeError(f"MMOTU-2D: {test_file} is missing")
    files = _image_files(train_file.parent / "images", "MMOTU-2D")

    def columns(path: Path) -> dict[str, list]:
        names, labels = _read_cls_file(path)
        if bad := sorted({label for label in labels if label >= len(MMOTU2D_CLASSES)}):
            raise UsfmaeError(f"{path}: labels {bad} are outside 0..{len(MMOTU2D_CLASSES) - 1}")
        return {"image": _resolve(files, names, "MMOTU-2D"), "label": labels, "id": [Path(n).stem for n in names]}

    train_all, test = columns(train_file), columns(test_file)
    train, validation = _carve_validation(np.asarray(train_all["label"]), None, val_fraction, seed, dataset="MMOTU-2D")
    description = (
        "MMOTU-2D ovarian tumour classification (8 classes). test: the release's val_cls.txt. "
        f"train/validation: train_cls.txt split with StratifiedShuffleSplit(test_size={val_fraction}, "
        f"random_state={seed}); no patient ids are published."
    )
    splits = {"train": _take(train_all, train), "validation": _take(train_all, validation), "test": test}
    return _dataset_dict(splits, MMOTU2D_CLASSES, description)


def _read_coco_labels(path: Path) -> tuple[list[str], list[int], tuple[str, ...]]:
    """Image file names, their labels (index of the category in id order) and the class names."""
    coco = json.loads(path.read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict[int, set[int]] = {}
    for annotation in coco["annotations"]:
        per_image.setdefault(annotation["image_id"], set()).add(index[annotation["category_id"]])
    names, labels = [], []
    for image in coco["images"]:
        found = per_image.get(image["id"], set())
        if len(found) != 1:
            raise UsfmaeError(f"{path}: image {image['file_name']} has {len(found)} distinct categories, expected 1")
        names.append(image["file_name"])
        labels.append(found.pop())
    return names, labels, tuple(c["name"] for c in categories)


def load_gist514(root: str | os.PathLike, split: int = 0, val_fraction: float = 0.2, seed: int = 0):
    """GIST514-DB, GIST vs leiomyoma (``lmym``), from the COCO files of cross-validation split ``split``.

    Trains on ``train_anno_crop_split_{split}.json``, tests on ``val_anno_crop_split_{split}.json``;
    validation is carved from the training images, stratified by class (patient ids are not published).
    """
    if not 0 <= split <= 4:
        raise UsfmaeError(f"GIST514-DB: split must be in 0..4, got {split}")
    train_file = _find_marker(root, f"train_anno_crop_split_{split}.json", "GIST514-DB")
    test_file = train_file.parent / f"val_anno_crop_split_{split}.json"
    if not test_file.is_file():
        raise UsfmaeError(f"GIST514-DB: {test_file} is missing")
    files = _image_files(train_file.parent.parent / "images", "GIST514-DB")

    def columns(path: Path) -> tuple[dict[str, list], tuple[str, ...]]:
        names, labels, classes = _read_coco_labels(path)
        names = [re.split(r"[\\/]", n)[-1] for n in names]
        return {
            "image": _resolve(files, names, "GIST514-DB"),
            "label": labels,
            "id": [Path(n).stem for n in names],
        }, classes

    (train_all, classes), (test, test_classes) = columns(train_file), columns(test_file)
    if classes != test_classes:
        raise UsfmaeError(f"GIST514-DB: train and test categories differ: {classes} vs {test_classes}")
    train, validation = _carve_validation(
        np.asarray(train_all["label"]), None, val_fraction, seed, dataset="GIST514-DB"
    )
    description = (
        f"GIST514-DB endoscopic ultrasound, classes {list(classes)} (lmym = leiomyoma). test: "
        f"val_anno_crop_split_{split}.json; train/validation: train_anno_crop_split_{split}.json split with "
        f"StratifiedShuffleSplit(test_size={val_fraction}, random_state={seed}); patient ids unverified, not used."
    )
    splits = {"train": _take(train_all, train), "validation": _take(train_all, validation), "test": test}
    return _dataset_dict(splits, classes, description)
