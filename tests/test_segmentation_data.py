"""Segmentation adapters on synthetic replicas of the released layouts: splits, leakage, masks, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_segmentation import (
    MMOTU_COLOURS,
    truth,
    write_busbra,
    write_busi,
    write_generic,
    write_hc18,
    write_mmotu,
)

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.evaluation import MMOTU2D_CLASSES, check_leakage
from usfmae_hf.evaluation.segmentation_data import SEGMENTATION_TASKS, load_segmentation_images

COLUMNS = ["image", "mask", "classes", "id"]


def _one_line_error(match: str, **kwargs) -> str:
    with pytest.raises(UsfmaeError, match=match) as caught:
        load_segmentation_images(**kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def _check_masks(dataset, folder: Path, expected=lambda ids: ids) -> int:
    """Every mask decodes as mode L, equals the writer's truth (mapped by ``expected``) and lists its classes."""
    checked = 0
    for split in dataset.values():
        for row in split:
            mask = row["mask"]
            assert mask.mode == "L" and mask.size == row["image"].size
            want = expected(truth(folder, row["id"]))
            assert np.array_equal(np.asarray(mask), want), row["id"]
            assert row["classes"] == np.unique(want).tolist()
            checked += 1
    return checked


def _ids(dataset) -> dict[str, set[str]]:
    return {name: set(split["id"]) for name, split in dataset.items()}


@pytest.mark.parametrize("scale_255", [False, True])
def test_generic_binary_masks_stored_as_01_or_0255(tmp_path, scale_255):
    root = write_generic(tmp_path, 4, 2, n_test=2, scale_255=scale_255, seed=int(scale_255))
    stored = np.unique(np.asarray(Image.open(root / "train" / "masks" / "scan_train_000.png")))
    assert stored.tolist() == ([0, 255] if scale_255 else [0, 1])
    dataset = load_segmentation_images(
        train_dir=str(root / "train"), validation_dir=str(root / "validation"), test_dir=str(root / "test")
    )
    assert list(dataset) == ["train", "validation", "test"]
    assert _ids(dataset)["validation"] == {"scan_validation_000", "scan_validation_001"}
    features = dataset["train"].features
    assert list(features) == COLUMNS and features["classes"].feature.names == ["background", "lesion"]
    assert _check_masks(dataset, root) == 8


def test_generic_multiclass_names(tmp_path):
    root = write_generic(tmp_path, 6, 0, n_classes=4)
    default = load_segmentation_images(train_dir=str(root / "train"))
    assert list(default) == ["train"]
    assert default["train"].features["classes"].feature.names == ["background", "class_1", "class_2", "class_3"]
    assert _check_masks(default, root) == 6
    assert any(len(row) == 3 for row in default["train"]["classes"])  # the scans with a second lesion

    names = ["background", "cyst", "solid", "calcification"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n\n")
    (tmp_path / "names.json").write_text(json.dumps({str(i): name for i, name in enumerate(names)}))
    for given in (names, str(tmp_path / "names.txt"), tmp_path / "names.json"):
        loaded = load_segmentation_images(train_dir=str(root / "train"), label_names=given)
        assert loaded["train"].features["classes"].feature.names == names

    message = _one_line_error("not a label id", train_dir=str(root / "train"), label_names=names[:3])
    assert "scan_train_" in message and "mask value 3" in message


def test_generic_pairing_and_value_errors(tmp_path):
    root = write_generic(tmp_path, 3, 0)
    train = root / "train"
    (train / "masks" / "scan_train_001.png").rename(tmp_path / "moved.png")
    assert "scan_train_001" in _one_line_error("1 images have no mask", train_dir=str(train))
    (tmp_path / "moved.png").rename(train / "masks" / "scan_train_001.png")
    (train / "masks" / "orphan.png").write_bytes((train / "masks" / "scan_train_001.png").read_bytes())
    assert "orphan" in _one_line_error("1 masks have no image", train_dir=str(train))
    (train / "masks" / "orphan.png").unlink()

    mask_path = train / "masks" / "scan_train_002.png"
    values = np.asarray(Image.open(mask_path)).copy()
    values[0, :3] = [1, 255, 0]  # 1 and 255 in one binary mask: which convention?
    Image.fromarray(values).save(mask_path)
    assert "scan_train_002.png" in _one_line_error("binary mask holds value 255", train_dir=str(train))
    Image.fromarray(np.stack([values * 0, values * 0, values], -1).astype(np.uint8)).save(mask_path)
    _one_line_error("colour mask", train_dir=str(train))
    mask_path.unlink()
    Image.fromarray(values).save(mask_path.with_suffix(".jpg"))
    _one_line_error("masks must be PNG", train_dir=str(train))
    _one_line_error("expected the folders images/ and masks/", train_dir=str(tmp_path))


def test_generic_mask_size_must_match_its_image(tmp_path):
    root = write_generic(tmp_path, 2, 0)
    mask = root / "train" / "masks" / "scan_train_000.png"
    Image.open(mask).resize((10, 10)).save(mask)
    _one_line_error("the mask is 10x10 but its image is 64x64", train_dir=str(root / "train"))


@pytest.fixture(scope="module")
def busbra(tmp_path_factory):
    return write_busbra(tmp_path_factory.mktemp("busbra"), n_patients=20, seed=1)


@pytest.mark.parametrize("fold", [1, 3])
def test_busbra_official_fold_patient_level_validation_and_masks(busbra, fold):
    dataset = load_segmentation_images(task="busbra_seg", data_root=str(busbra.parent), fold=fold)
    with open(busbra / "5-fold-cv.csv", newline="") as handle:
        folds = {row["ID"]: int(row["kFold"]) for row in csv.DictReader(handle)}
    assert _ids(dataset)["test"] == {image_id for image_id, k in folds.items() if k == fold}
    assert set().union(*_ids(dataset).values()) == set(folds) and len(dataset["validation"]) > 0
    check_leakage(dataset, "patient")  # raises on a patient or an identical image in two splits
    assert {row["patient"] for row in dataset["test"]} == {str(int(i[4:8])) for i in _ids(dataset)["test"]}
    assert dataset["train"].features["classes"].feature.names == ["background", "lesion"]
    assert dataset["train"].features["pathology"].names == ["benign", "malignant"]
    pathology = {row["id"]: row["pathology"] for split in dataset.values() for row in split}
    assert all(pathology[i] == int(int(i[4:8]) % 4 == 0) for i in pathology)
    assert _check_masks(dataset, busbra) == len(folds)
    assert f"official fold {fold}" in dataset["test"].info.description


def test_busi_union_masks_and_seeded_split(tmp_path):
    folder = write_busi(tmp_path, n_per_class=6)
    assert (folder / "benign" / "benign (1)_mask_1.png").is_file()
    dataset = load_segmentation_images(task="busi_seg", data_root=str(tmp_path))
    ids = _ids(dataset)
    assert sum(map(len, ids.values())) == 18 and not (ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    assert len(dataset["test"]) > 0 and len(dataset["validation"]) > 0
    assert _check_masks(dataset, folder) == 18
    # the union is not just the first mask: benign (1) has two lesions
    first = np.asarray(Image.open(folder / "benign" / "benign (1)_mask.png")) // 255
    assert (truth(folder, "benign (1)") > first).any()
    rows = {row["id"]: row for split in dataset.values() for row in split}
    assert rows["normal (2)"]["classes"] == [0] and rows["malignant (3)"]["classes"] == [0, 1]
    assert "no official split" in dataset["train"].info.description


@pytest.fixture(scope="module")
def mmotu(tmp_path_factory):
    return write_mmotu(tmp_path_factory.mktemp("mmotu"), n_train=24, n_test=8, seed=2)


def test_mmotu_eight_classes_from_colours_and_binary(mmotu):
    multi = load_segmentation_images(task="mmotu2d_seg8", data_root=str(mmotu.parent))
    names = multi["train"].features["classes"].feature.names
    assert names == ["background", *MMOTU2D_CLASSES]
    assert _ids(multi)["test"] == {str(i) for i in range(25, 33)}
    assert _ids(multi)["train"] | _ids(multi)["validation"] == {str(i) for i in range(1, 25)}
    assert _check_masks(multi, mmotu) == 32
    # independent: the colour painted in the annotation -> its class id, by the writer's colour table
    annotation = np.asarray(Image.open(mmotu / "annotations" / "13.PNG"))
    lesion = annotation.any(-1)
    colour = tuple(annotation[lesion][0].tolist())
    row = next(r for split in multi.values() for r in split if r["id"] == "13")
    assert set(np.asarray(row["mask"])[lesion].tolist()) == {MMOTU_COLOURS.index(colour) + 1}

    binary = load_segmentation_images(task="mmotu2d_seg", data_root=str(mmotu.parent))
    assert binary["train"].features["classes"].feature.names == ["background", "lesion"]
    assert _ids(binary) == _ids(multi)  # the same seeded split for both tasks
    assert _check_masks(binary, mmotu, expected=lambda ids: (ids > 0).astype(np.int64)) == 32


def test_mmotu_unknown_colour_is_one_line(tmp_path):
    folder = write_mmotu(tmp_path, n_train=6, n_test=2)
    path = folder / "annotations" / "3.PNG"
    annotation = np.asarray(Image.open(path)).copy()
    annotation[0, 0] = (12, 34, 56)
    Image.fromarray(annotation).save(path)
    message = _one_line_error(
        r"colour \(12, 34, 56\) is not in the MMOTU-2D", task="mmotu2d_seg8", data_root=str(tmp_path)
    )
    assert "3.PNG" in message
    load_segmentation_images(task="mmotu2d_seg", data_root=str(tmp_path))  # the binary task reads _binary.PNG


@pytest.mark.parametrize("with_csv", [True, False])
def test_hc18_outlines_filled_patient_split_and_spacing(tmp_path, with_csv):
    root = write_hc18(tmp_path, n_patients=12, with_csv=with_csv, n_cut=2, seed=3)
    annotation = np.asarray(Image.open(root / "training_set" / "000_HC_Annotation.png")) > 0
    assert annotation.sum() < 0.2 * truth(root, "000_HC").sum()  # an outline, not a mask
    dataset = load_segmentation_images(task="hc18_seg", data_root=str(root))
    assert dataset["train"].features["classes"].feature.names == ["background", "head"]
    check_leakage(dataset, "patient")
    rows = {row["id"]: row for split in dataset.values() for row in split}
    assert len(rows) == 16 and {"001_HC", "001_2HC"} <= set(rows) and rows["001_2HC"]["patient"] == "001"
    for image_id, row in rows.items():
        head, filled = truth(root, image_id).astype(bool), np.asarray(row["mask"]).astype(bool)
        assert (head & filled).sum() / (head | filled).sum() >= 0.98, image_id
    if with_csv:
        with open(root / "training_set_pixel_size_and_HC.csv", newline="") as handle:
            spacing = {r["filename"][:-4]: float(r["pixel size(mm)"]) for r in csv.DictReader(handle)}
        assert {i: row["pixel_spacing"] for i, row in rows.items()} == spacing
    else:
        assert all(row["pixel_spacing"] is None for row in rows.values())


def test_dataset_name_source(tmp_path):
    from datasets import ClassLabel, Dataset, Features, List
    from datasets import Image as ImageFeature

    root = write_generic(tmp_path / "raw", 3, 2, n_classes=3)
    names = ["background", "cyst", "nodule"]
    features = Features({"img": ImageFeature(), "seg": ImageFeature(), "classes": List(ClassLabel(names=names))})
    published = tmp_path / "published"
    published.mkdir()
    for split in ("train", "validation"):
        stems = sorted(p.stem for p in (root / split / "images").iterdir())
        Dataset.from_dict(
            {
                "img": [str(root / split / "images" / f"{s}.png") for s in stems],
                "seg": [str(root / split / "masks" / f"{s}.png") for s in stems],
                "classes": [[0] for _ in stems],
            },
            features=features,
        ).to_parquet(published / f"{split}.parquet")
    dataset = load_segmentation_images(dataset_name=str(published), image_column="img", mask_column="seg")
    assert list(dataset) == ["train", "validation"] and dataset["validation"]["id"] == ["validation-0", "validation-1"]
    assert dataset["train"].features["classes"].feature.names == names
    for name, split in dataset.items():
        stems = sorted(p.stem for p in (root / name / "images").iterdir())
        for stem, row in zip(stems, split, strict=True):
            assert np.array_equal(np.asarray(row["mask"]), truth(root, stem))
            assert row["classes"] == np.unique(truth(root, stem)).tolist()  # recomputed, not copied
    _one_line_error("no Image column 'mask'", dataset_name=str(published), image_column="img")


def test_source_and_task_errors(tmp_path):
    assert set(SEGMENTATION_TASKS) == {"busbra_seg", "busi_seg", "mmotu2d_seg", "mmotu2d_seg8", "hc18_seg"}
    _one_line_error("exactly one data source")
    _one_line_error("exactly one data source", train_dir=str(tmp_path), task="busi_seg")
    _one_line_error("unknown segmentation task", task="camus", data_root=str(tmp_path))
    _one_line_error("needs --data_root", task="hc18_seg")
    _one_line_error("--fold does not apply", task="busi_seg", data_root=str(tmp_path), fold=2)
    _one_line_error("--label_names does not apply", task="busi_seg", data_root=str(tmp_path), label_names=["a", "b"])
    _one_line_error("no BUSI found", task="busi_seg", data_root=str(tmp_path))
    _one_line_error("no HC18 found", task="hc18_seg", data_root=str(tmp_path))
    _one_line_error("need 2..256 names", train_dir=str(tmp_path), label_names=["only"])
