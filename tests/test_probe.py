"""Frozen-feature probes (linear, k-NN) through the CLI, and the k-fold runner's summary statistics."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_finetuning import make_speckle_folders

from usfmae_hf.cli import main
from usfmae_hf.evaluation.crossval import summarize_folds
from usfmae_hf.evaluation.probe import build_probe, class_probabilities


@pytest.fixture(scope="module")
def speckle_data(tmp_path_factory) -> Path:
    return make_speckle_folders(tmp_path_factory.mktemp("speckle"), {"train": 10, "validation": 4, "test": 6})


def _data_flags(root: Path) -> list[str]:
    return [
        "--train-dir",
        str(root / "train"),
        "--validation-dir",
        str(root / "validation"),
        "--test-dir",
        str(root / "test"),
    ]


@pytest.mark.parametrize("method, dtype", [("linear", "fp32"), ("knn", "bf16")])
def test_probe_cli(method, dtype, tiny_model_dir, speckle_data, tmp_path, monkeypatch, capsys):
    import torch

    import usfmae_hf.inference.features

    real_load_encoder = usfmae_hf.inference.features.load_encoder
    loaded = []

    def spying_load_encoder(*args, **kwargs):
        loaded.append(real_load_encoder(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(usfmae_hf.inference.features, "load_encoder", spying_load_encoder)
    output = tmp_path / method
    assert (
        main(
            [
                "probe",
                "--model",
                str(tiny_model_dir),
                *_data_flags(speckle_data),
                "--method",
                method,
                "--k",
                "5",
                "--dtype",
                dtype,
                "--output-dir",
                str(output),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines()[0] == f"precision: {dtype} (requested)"
    assert next(loaded[0].parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    results = json.loads((output / "all_results.json").read_text())
    assert results["method"] == method and results["test_num_samples"] == 12
    assert (results["dtype"], results["precision"]) == (dtype, f"{dtype} (requested)")
    assert results["test_accuracy"] >= 0.9, results  # chance is 0.5: the classes differ in echogenicity
    with (output / "test_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    assert np.mean([row["label"] == row["prediction"] for row in rows]) == pytest.approx(results["test_accuracy"])
    for name in ("test_confusion_matrix.png", "test_roc.png", "validation_predictions.csv"):
        assert (output / name).stat().st_size > 0
    # the output directory is never overwritten by accident
    assert main(["probe", "--model", str(tiny_model_dir), *_data_flags(speckle_data), "--output-dir", str(output)]) == 2


def test_probabilities_cover_classes_never_seen_in_training():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(12, 4)), np.array([0, 2] * 6)  # class 1 absent
    probe = build_probe("knn", k=3).fit(features, labels)
    probabilities = class_probabilities(probe, features, 3)
    assert probabilities.shape == (12, 3) and (probabilities[:, 1] == 0).all()
    np.testing.assert_allclose(probabilities.sum(1), 1.0)


def test_summary_statistics_and_undefined_folds():
    from scipy import stats

    folds = [
        {"test_accuracy": a, "test_roc_auc": r} for a, r in ((0.8, 0.9), (0.7, None), (0.9, 0.85), (0.75, float("nan")))
    ]
    summary = summarize_folds(folds)
    accuracies = [0.8, 0.7, 0.9, 0.75]
    low, high = stats.t.interval(0.95, df=3, loc=np.mean(accuracies), scale=stats.sem(accuracies))
    row = summary["accuracy"]
    assert row["mean"] == pytest.approx(np.mean(accuracies)) and row["std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    # undefined AUROC folds are excluded and counted, not averaged as numbers
    assert summary["roc_auc"]["n"] == 2 and summary["roc_auc"]["n_undefined"] == 2
    assert summary["roc_auc"]["mean"] == pytest.approx(0.875)


def _fake_gist514(root: Path, rng: np.random.Generator) -> Path:
    """A GIST514-DB-shaped folder (COCO annotation files per split) of speckle images."""
    images = root / "usd514_jpeg_roi" / "images"
    annotations = root / "usd514_jpeg_roi" / "annotations"
    images.mkdir(parents=True)
    annotations.mkdir()
    names, labels = [], []
    for i in range(24):
        label = i % 2
        speckle = np.clip(rng.rayleigh(scale=(60, 170)[label] / 1.25, size=(36, 36)), 0, 255).astype(np.uint8)
        Image.fromarray(speckle, mode="L").save(images / f"img{i}.jpg", quality=95)
        names.append(f"img{i}.jpg")
        labels.append(label + 1)
    categories = [{"id": 1, "name": "lmym"}, {"id": 2, "name": "GIST"}]
    for split in (0, 1):
        test = {i for i in range(24) if i // 2 % 3 == split}  # 8 images, both classes
        for kind, members in (("train", [i for i in range(24) if i not in test]), ("val", sorted(test))):
            coco = {
                "images": [{"id": i, "file_name": names[i]} for i in members],
                "annotations": [{"id": i, "image_id": i, "category_id": labels[i]} for i in members],
                "categories": categories,
            }
            (annotations / f"{kind}_anno_crop_split_{split}.json").write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def fake_gist514(tmp_path_factory) -> Path:
    return _fake_gist514(tmp_path_factory.mktemp("gist"), np.random.default_rng(1))


def _cv(model: Path, data_root: Path, output: Path, *flags: str) -> int:
    return main(
        [
            "cv",
            "--model",
            str(model),
            "--task",
            "gist514",
            "--data-root",
            str(data_root),
            "--folds",
            "0",
            "1",
            "--output-dir",
            str(output),
            *flags,
        ]
    )


def test_cv_over_task_folds(tiny_model_dir, fake_gist514, tmp_path):
    output = tmp_path / "cv"
    assert _cv(tiny_model_dir, fake_gist514, output, "--method", "knn", "--k", "3", "--dtype", "fp32") == 0
    saved = json.loads((output / "cv_results.json").read_text())
    assert [saved["folds"][fold]["dtype"] for fold in ("0", "1")] == ["fp32", "fp32"]
    fold_accuracy = [saved["folds"][fold]["test_accuracy"] for fold in ("0", "1")]
    assert saved["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(fold_accuracy))
    assert saved["summary"]["accuracy"]["n"] == 2 and not math.isnan(saved["summary"]["accuracy"]["ci_low"])
    assert (output / "fold_1" / "test_predictions.csv").is_file()


def test_cv_finetune_mode_forwards_trainer_flags(tiny_model_dir, fake_gist514, tmp_path):
    output = tmp_path / "cv"
    trainer_flags = "--max_steps 1 --use_cpu --report_to none --save_strategy no --per_device_train_batch_size 4"
    assert _cv(tiny_model_dir, fake_gist514, output, "--cv-method", "finetune", "--", *trainer_flags.split()) == 0
    saved = json.loads((output / "cv_results.json").read_text())
    assert saved["folds"]["1"]["recipe"]["head"] == "cls" and saved["folds"]["1"]["test_num_samples"] == 8
    assert saved["summary"]["f1_macro"]["n"] == 2
    assert (output / "fold_0" / "model.safetensors").is_file() and (output / "fold_1" / "test_roc.png").is_file()
