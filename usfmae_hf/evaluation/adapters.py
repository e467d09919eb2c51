"""Downstream evaluation sets as leakage-safe ``DatasetDict``s (train / validation / test).

Each loader finds its dataset under ``root`` (the unpacked folder or any folder above it) by a marker
file, reads the official test split, carves the validation split out of the training data (by patient
where patients are known), and records the protocol in ``Dataset.info.description``. Columns:
``image`` (``datasets.Image``, read lazily from the files), ``label`` (``ClassLabel``), ``id`` (file stem),
plus the patient column where one exists.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.evaluation.dataset_files import (
    carve_validation,
    find_marker,
    image_files,
    read_cls_file,
    resolve_files,
    take_rows,
)

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


def load_busbra(root: str | os.PathLike, fold: int = 1, n_folds: int = 5, val_fraction: float = 0.2, seed: int = 0):
    """BUS-BRA benign/malignant with the official patient-disjoint test fold and a patient-level validation split.

    The test split is fold ``fold`` of ``{n_folds}-fold-cv.csv`` (rows whose ``valid_{fold}`` is empty);
    the other folds are split into train/validation by patient (``Case`` of ``bus_data.csv``) with
    ``GroupShuffleSplit`` - not by the CSV's image-level ``valid_{fold}`` column, which puts images of one
    patient on both sides. Extra column: ``case``.
    """
    import pandas as pd

    csv_path = find_marker(root, "bus_data.csv", "BUS-BRA")
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
    files = image_files(csv_path.parent / "Images", "BUS-BRA")
    columns = {
        "image": resolve_files(files, [f"{i}.png" for i in table["ID"]], "BUS-BRA"),
        "label": [BUSBRA_CLASSES.index(p) for p in pathology],
        "id": list(table["ID"]),
        "case": list(table["Case"]),
    }
    is_test = table[f"valid_{fold}"].isna().to_numpy()
    rest = np.flatnonzero(~is_test)
    train, validation = carve_validation(
        np.asarray(columns["label"])[rest], table["Case"].to_numpy()[rest], val_fraction, seed, dataset="BUS-BRA"
    )
    description = (
        f"BUS-BRA benign vs malignant. test: official fold {fold} of {n_folds}-fold-cv.csv (valid_{fold} empty, "
        f"patient-disjoint). train/validation: the other folds split by patient (Case) with "
        f"GroupShuffleSplit(test_size={val_fraction}, random_state={seed}); the CSV's image-level "
        f"valid_{fold} train/validation assignment is not used."
    )
    splits = {
        "train": take_rows(columns, rest[train]),
        "validation": take_rows(columns, rest[validation]),
        "test": take_rows(columns, np.flatnonzero(is_test)),
    }
    return _dataset_dict(splits, BUSBRA_CLASSES, description, extra=("case",))


def load_mmotu2d(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0):
    """MMOTU-2D ovarian tumours, 8 classes: official train/test from ``train_cls.txt``/``val_cls.txt``.

    The release's ``val_cls.txt`` is its test set; validation is carved from ``train_cls.txt``,
    stratified by class (there are no patient ids, so only image content can be checked for leakage).
    """
    train_file = find_marker(root, "train_cls.txt", "MMOTU-2D")
    test_file = train_file.parent / "val_cls.txt"
    if not test_file.is_file():
        raise UsfmaeError(f"MMOTU-2D: {test_file} is missing")
    files = image_files(train_file.parent / "images", "MMOTU-2D")

    def columns(path: Path) -> dict[str, list]:
        names, labels = read_cls_file(path)
        if bad := sorted({label for label in labels if label >= len(MMOTU2D_CLASSES)}):
            raise UsfmaeError(f"{path}: labels {bad} are outside 0..{len(MMOTU2D_CLASSES) - 1}")
        return {"image": resolve_files(files, names, "MMOTU-2D"), "label": labels, "id": [Path(n).stem for n in names]}

    train_all, test = columns(train_file), columns(test_file)
    train, validation = carve_validation(np.asarray(train_all["label"]), None, val_fraction, seed, dataset="MMOTU-2D")
    description = (
        "MMOTU-2D ovarian tumour classification (8 classes). test: the release's val_cls.txt. "
        f"train/validation: train_cls.txt split with StratifiedShuffleSplit(test_size={val_fraction}, "
        f"random_state={seed}); no patient ids are published."
    )
    splits = {"train": take_rows(train_all, train), "validation": take_rows(train_all, validation), "test": test}
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
    train_file = find_marker(root, f"train_anno_crop_split_{split}.json", "GIST514-DB")
    test_file = train_file.parent / f"val_anno_crop_split_{split}.json"
    if not test_file.is_file():
        raise UsfmaeError(f"GIST514-DB: {test_file} is missing")
    files = image_files(train_file.parent.parent / "images", "GIST514-DB")

    def columns(path: Path) -> tuple[dict[str, list], tuple[str, ...]]:
        names, labels, classes = _read_coco_labels(path)
        names = [re.split(r"[\\/]", n)[-1] for n in names]
        return {
            "image": resolve_files(files, names, "GIST514-DB"),
            "label": labels,
            "id": [Path(n).stem for n in names],
        }, classes

    (train_all, classes), (test, test_classes) = columns(train_file), columns(test_file)
    if classes != test_classes:
        raise UsfmaeError(f"GIST514-DB: train and test categories differ: {classes} vs {test_classes}")
    train, validation = carve_validation(np.asarray(train_all["label"]), None, val_fraction, seed, dataset="GIST514-DB")
    description = (
        f"GIST514-DB endoscopic ultrasound, classes {list(classes)} (lmym = leiomyoma). test: "
        f"val_anno_crop_split_{split}.json; train/validation: train_anno_crop_split_{split}.json split with "
        f"StratifiedShuffleSplit(test_size={val_fraction}, random_state={seed}); patient ids unverified, not used."
    )
    splits = {"train": take_rows(train_all, train), "validation": take_rows(train_all, validation), "test": test}
    return _dataset_dict(splits, classes, description)
