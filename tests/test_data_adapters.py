"""Downstream adapters (BUS-BRA, MMOTU-2D, GIST514-DB) on replicas of the released layouts, and leakage checks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.evaluation import (
    BUSBRA_CLASSES,
    MMOTU2D_CLASSES,
    DataLeakageError,
    check_leakage,
    load_busbra,
    load_gist514,
    load_mmotu2d,
)


def save_noise(path: Path, seed: int, mode: str = "L") -> None:
    shape = (16, 20) if mode == "L" else (16, 20, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)


def write_busbra(folder: Path) -> dict:
    """BUS-BRA as released, into ``folder``: Images/, Masks/, bus_data.csv, 5- and 10-fold CSVs with an
    image-level validation split."""
    rows, folds = [], {}
    for case in range(1, 31):
        sides = ["s"] if case % 3 == 0 else ["l", "r"]
        pathology = "malignant" if case % 4 == 0 else "benign"
        folds[case] = (case % 5) + 1
        for side in sides:
            image_id = f"bus_{case:04d}-{side}"
            save_noise(folder / "Images" / f"{image_id}.png", len(rows) + 1)
            save_noise(folder / "Masks" / f"mask_{case:04d}-{side}.png", 5000 + len(rows))
            rows.append((image_id, case, pathology, side))
    with open(folder / "bus_data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "Case", "Histology", "Pathology", "BIRADS", "Device", "Width", "Height", "Side", "BBOX"])
        sides = {"l": "left", "r": "right", "s": "single"}
        for image_id, case, pathology, side in rows:
            writer.writerow([image_id, case, "Fibroadenoma", pathology, 4, "GE", 20, 16, sides[side], "[1, 2, 10, 8]"])
    for n_folds in (5, 10):
        with open(folder / f"{n_folds}-fold-cv.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["ID", "Pathology", "kFold", *(f"valid_{k}" for k in range(1, n_folds + 1))])
            for image_id, case, pathology, side in rows:
                fold = (case % n_folds) + 1
                # image-level validation: the left and right images of a patient can land on both sides
                valid = ["" if k == fold else (0 if side == "r" and case % 2 else 1) for k in range(1, n_folds + 1)]
                writer.writerow([image_id, pathology, fold, *valid])
    return {"rows": rows, "folds": folds}


@pytest.fixture(scope="module")
def busbra(tmp_path_factory):
    root = tmp_path_factory.mktemp("busbra")
    return {"root": root, **write_busbra(root / "downloads" / "BUSBRA")}


@pytest.mark.parametrize("fold", [1, 4])
def test_busbra_official_test_fold_and_patient_level_validation(busbra, fold):
    splits = load_busbra(busbra["root"], fold=fold, val_fraction=0.25, seed=1)
    assert list(splits) == ["train", "validation", "test"]
    expected_test = {image_id for image_id, case, *_ in busbra["rows"] if busbra["folds"][case] == fold}
    assert set(splits["test"]["id"]) == expected_test
    assert sorted([*splits["train"]["id"], *splits["validation"]["id"], *splits["test"]["id"]]) == sorted(
        r[0] for r in busbra["rows"]
    )
    assert len(splits["validation"]) > 0
    assert splits["train"].features["label"].names == list(BUSBRA_CLASSES)
    pathology = {image_id: p for image_id, _, p, _ in busbra["rows"]}
    for split in splits.values():
        assert [BUSBRA_CLASSES[label] for label in split["label"]] == [pathology[i] for i in split["id"]]
    report = check_leakage(splits, group_column="case")
    assert report.ok and report.split_sizes["test"] == len(expected_test)
    assert "Case" in splits["test"].info.description and f"fold {fold}" in splits["test"].info.description
    assert splits["train"][0]["image"].size == (20, 16)


def test_busbra_ten_folds_and_bad_arguments(busbra, tmp_path):
    splits = load_busbra(busbra["root"] / "downloads" / "BUSBRA", fold=10, n_folds=10)
    assert set(splits["test"]["id"]) == {i for i, case, *_ in busbra["rows"] if case % 10 == 9}
    with pytest.raises(UsfmaeError, match="fold must be in 1..5"):
        load_busbra(busbra["root"], fold=6)
    with pytest.raises(UsfmaeError, match="no BUS-BRA found"):
        load_busbra(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(busbra["root"] / "downloads" / "BUSBRA", copy)
    (copy / "Images" / "bus_0001-l.png").unlink()
    with pytest.raises(UsfmaeError, match="1 listed images are missing"):
        load_busbra(copy)


def test_the_released_image_level_split_leaks_patients(busbra):
    """check_leakage catches what the CSV's valid_1 column does: one patient in train and validation."""
    from datasets import Dataset, DatasetDict

    folder = busbra["root"] / "downloads" / "BUSBRA"
    case = {image_id: str(c) for image_id, c, *_ in busbra["rows"]}
    with open(folder / "5-fold-cv.csv", newline="") as handle:
        assignment = {row["ID"]: row["valid_1"] for row in csv.DictReader(handle)}

    def split(value: str) -> Dataset:
        ids = [i for i, v in assignment.items() if v == value]
        return Dataset.from_dict(
            {"image": [str(folder / "Images" / f"{i}.png") for i in ids], "id": ids, "case": [case[i] for i in ids]}
        )

    provided = DatasetDict(train=split("1"), validation=split("0"))
    with pytest.raises(DataLeakageError, match="shared groups"):
        check_leakage(provided, group_column="case")
    report = check_leakage(provided, group_column="case", raise_on_leak=False)
    assert not report.ok and report.shared_groups["train/validation"] and not report.shared_images


@pytest.fixture(scope="module")
def mmotu(tmp_path_factory):
    """MMOTU-2D under MMOTU/OTU_2d: JPEG images, masks in annotations/, *_cls.txt with mixed whitespace."""
    root = tmp_path_factory.mktemp("mmotu")
    folder = root / "MMOTU" / "OTU_2d"
    lines = {"train_cls.txt": [], "val_cls.txt": []}
    for image_id in range(1, 57):
        label = image_id % 8
        save_noise(folder / "images" / f"{image_id}.JPG", image_id, mode="RGB")
        for mask in (f"{image_id}.PNG", f"{image_id}_binary.PNG", f"{image_id}_binary_binary.PNG"):
            save_noise(folder / "annotations" / mask, 9000 + image_id)
        split = "val_cls.txt" if image_id > 40 else "train_cls.txt"
        separator = "\t" if image_id % 2 else "  "
        lines[split].append(f"{image_id}.JPG{separator}{label}")
    for name, content in lines.items():
        (folder / name).write_text("\n".join(content) + "\n\n")
    (folder / "train.txt").write_text("\n".join(str(i) for i in range(1, 41)))
    return root


def test_mmotu2d_official_split_and_stratified_validation(mmotu):
    splits = load_mmotu2d(mmotu, val_fraction=0.25, seed=0)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (30, 10, 16)
    assert set(splits["test"]["id"]) == {str(i) for i in range(41, 57)}
    assert splits["test"].features["label"].names == list(MMOTU2D_CLASSES)
    for split in splits.values():
        assert list(split["label"]) == [int(i) % 8 for i in split["id"]]
    assert set(splits["validation"]["label"]) >= set(range(8)) - {0, 1}  # stratified: nearly every class
    assert check_leakage(splits).ok
    assert "val_cls.txt" in splits["train"].info.description


def _shrink_mmotu(source: Path, destination: Path, n_train: int) -> Path:
    shutil.copytree(source / "MMOTU" / "OTU_2d", destination)
    lines = (destination / "train_cls.txt").read_text().split("\n")
    (destination / "train_cls.txt").write_text("\n".join(lines[:n_train]) + "\n")
    return destination


def test_small_training_sets_fall_back_or_fail_in_one_line(mmotu, tmp_path, caplog):
    """16 images in 8 classes cannot be split stratified at 20% (4 < 8): unstratified, with a warning."""
    splits = load_mmotu2d(_shrink_mmotu(mmotu, tmp_path / "sixteen", 16), val_fraction=0.2)
    assert (len(splits["train"]), len(splits["validation"])) == (12, 4)
    assert set(splits["train"]["id"]).isdisjoint(splits["validation"]["id"])
    assert "MMOTU-2D" in caplog.text and "unstratified" in caplog.text
    with pytest.raises(UsfmaeError, match=r"MMOTU-2D: 1 training images cannot be split.*at least 2"):
        load_mmotu2d(_shrink_mmotu(mmotu, tmp_path / "one", 1))


def test_identical_images_across_splits_are_caught(mmotu, tmp_path):
    copy = tmp_path / "OTU_2d"
    shutil.copytree(mmotu / "MMOTU" / "OTU_2d", copy)
    shutil.copy(copy / "images" / "3.JPG", copy / "images" / "50.JPG")  # test image 50 == train image 3
    with pytest.raises(DataLeakageError, match="identical images"):
        check_leakage(load_mmotu2d(copy))


def coco(images: list[tuple[int, str, int]]) -> dict:
    return {
        "images": [{"id": i, "file_name": name, "width": 20, "height": 16} for i, name, _ in images],
        "annotations": [
            {"id": 100 + i, "image_id": i, "category_id": category, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}
            for i, _, category in images
        ],
        "categories": [{"id": 2, "name": "GIST"}, {"id": 1, "name": "lmym"}],
    }


@pytest.fixture(scope="module")
def gist(tmp_path_factory):
    """GIST514-DB: usd514_jpeg_roi/images/*.jpg and COCO train/val files per cross-validation split."""
    root = tmp_path_factory.mktemp("gist")
    folder = root / "usd514_jpeg_roi"
    images = [(i, f"{'gist' if i % 3 else 'lmym'}_{i:03d}.jpg", 2 if i % 3 else 1) for i in range(1, 31)]
    for i, name, _ in images:
        save_noise(folder / "images" / name, 300 + i, mode="RGB")
    for split in range(5):
        held_out = [im for im in images if im[0] % 5 == split]
        train = [im for im in images if im[0] % 5 != split]
        (folder / "annotations").mkdir(exist_ok=True)
        (folder / "annotations" / f"train_anno_crop_split_{split}.json").write_text(json.dumps(coco(train)))
        (folder / "annotations" / f"val_anno_crop_split_{split}.json").write_text(json.dumps(coco(held_out)))
    return root


def test_gist514_coco_split(gist):
    splits = load_gist514(gist, split=1, seed=3)
    assert set(splits["test"]["id"]) == {f"{'gist' if i % 3 else 'lmym'}_{i:03d}" for i in range(1, 31) if i % 5 == 1}
    assert len(splits["train"]) + len(splits["validation"]) == 24 and len(splits["validation"]) == 5
    assert splits["train"].features["label"].names == ["lmym", "GIST"]
    for split in splits.values():
        assert [split.features["label"].names[label] for label in split["label"]] == [
            "GIST" if i.startswith("gist") else "lmym" for i in split["id"]
        ]
    assert check_leakage(splits).ok
    with pytest.raises(UsfmaeError, match="split must be in 0..4"):
        load_gist514(gist, split=5)
