"""Frozen-feature probes (linear, k-NN) through the CLI, and the k-fold runner end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_segmentation import write_busbra
from test_finetuning import make_speckle_folders

from usfmae_hf.cli import main
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


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


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
    rows = _csv_rows(output / "test_predictions.csv")
    assert len(rows) == 12
    assert np.mean([row["label"] == row["prediction"] for row in rows]) == pytest.approx(results["test_accuracy"])
    for name in ("test_confusion_matrix.png", "test_roc.png", "validation_predictions.csv"):
        assert (output / name).stat().st_size > 0
    # the output directory is never overwritten by accident
    assert main(["probe", "--model", str(tiny_model_dir), *_data_flags(speckle_data), "--output-dir", str(output)]) == 2


def test_probe_quiet_draws_no_progress_bar(tiny_model_dir, speckle_data, tmp_path, capfd):
    """--quiet hides the probe's own image-check bars, which are shown otherwise."""
    argv = ["probe", "--model", str(tiny_model_dir), *_data_flags(speckle_data), "--method", "knn", "--k", "3"]
    assert main([*argv, "--output-dir", str(tmp_path / "shown")]) == 0
    assert "checking train images" in capfd.readouterr().err
    assert main([*argv, "--output-dir", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert capfd.readouterr().err == ""


def test_probabilities_cover_classes_never_seen_in_training():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(12, 4)), np.array([0, 2] * 6)  # class 1 absent
    probe = build_probe("knn", k=3).fit(features, labels)
    probabilities = class_probabilities(probe, features, 3)
    assert probabilities.shape == (12, 3) and (probabilities[:, 1] == 0).all()
    np.testing.assert_allclose(probabilities.sum(1), 1.0)


def test_probe_flags_a_validation_split_without_a_class(tiny_model_dir, tmp_path, capsys):
    import shutil

    root = make_speckle_folders(tmp_path / "data", {"train": 6, "validation": 3})
    shutil.rmtree(root / "validation" / "malignant")  # e.g. a patient-level validation split of one class
    output = tmp_path / "probe"
    flags = ["--train-dir", str(root / "train"), "--validation-dir", str(root / "validation")]
    assert main(["probe", "--model", str(tiny_model_dir), *flags, "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((output / "all_results.json").read_text())
    (warning,) = results["validation_warnings"]
    assert "no images of class(es) ['malignant']" in warning and f"WARNING: {warning}" in printed
    assert "(ABSENT: malignant)" in results["validation_headline"] and results["validation_roc_auc"] is None
    assert f"validation: {results['validation_headline']}" in printed


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
    summary = saved["summary"]
    fold_accuracy = [saved["folds"][fold]["test_accuracy"] for fold in ("0", "1")]
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(fold_accuracy)) and summary["accuracy"]["n"] == 2
    # the pooled accuracy is that of the 16 out-of-fold predictions; with 2 folds only the bootstrap CI exists
    rows = [row for fold in ("0", "1") for row in _csv_rows(output / f"fold_{fold}" / "test_predictions.csv")]
    assert summary["accuracy"]["pooled"] == pytest.approx(np.mean([r["label"] == r["prediction"] for r in rows]))
    assert summary["n_pooled"] == 16 and summary["resampled_unit"] == "images"
    assert summary["ci_method"].startswith("percentile bootstrap") and "not meaningful" in summary["fold_ci_method"]
    for metric in ("accuracy", "f1_macro", "roc_auc"):
        row = summary[metric]
        assert row["fold_ci_low"] is None and 0.0 <= row["ci_low"] <= row["pooled"] <= row["ci_high"] <= 1.0, metric


def test_cv_finetune_mode_forwards_trainer_flags(tiny_model_dir, fake_gist514, tmp_path):
    output = tmp_path / "cv"
    trainer_flags = "--max_steps 1 --use_cpu --report_to none --save_strategy no --per_device_train_batch_size 4"
    assert _cv(tiny_model_dir, fake_gist514, output, "--cv-method", "finetune", "--", *trainer_flags.split()) == 0
    saved = json.loads((output / "cv_results.json").read_text())
    assert saved["folds"]["1"]["recipe"]["head"] == "cls" and saved["folds"]["1"]["test_num_samples"] == 8
    assert saved["summary"]["f1_macro"]["n"] == 2
    assert (output / "fold_0" / "model.safetensors").is_file() and (output / "fold_1" / "test_roc.png").is_file()


def test_cv_resamples_patients_and_gives_a_fold_interval_from_three_folds(tiny_model_dir, tmp_path):
    write_busbra(tmp_path / "data", n_patients=15, size=32)
    output = tmp_path / "cv"
    flags = ["--task", "busbra", "--data-root", str(tmp_path / "data"), "--folds", "1", "2", "3"]
    assert (
        main(["cv", "--model", str(tiny_model_dir), *flags, "--method", "knn", "--k", "3", "--output-dir", str(output)])
        == 0
    )
    summary = json.loads((output / "cv_results.json").read_text())["summary"]
    # write_busbra: patient c is in test fold (c % 5) + 1, so folds 1-3 hold patients with c % 5 in {0, 1, 2}
    assert summary["resampled_unit"] == "patients"
    assert summary["n_resampled_units"] == sum(1 for c in range(1, 16) if c % 5 < 3)
    assert "logit" in summary["fold_ci_method"] and isinstance(summary["warnings"], list)
    for metric in ("accuracy", "balanced_accuracy", "mcc"):
        low, high = (-1.0, 1.0) if metric == "mcc" else (0.0, 1.0)
        row = summary[metric]
        assert low <= row["ci_low"] <= row["ci_high"] <= high, metric
        if row["fold_ci_low"] is not None:  # zero width when every fold scores the same
            assert low <= row["fold_ci_low"] <= row["fold_ci_high"] <= high, metric
    assert any(summary[metric]["fold_ci_low"] is not None for metric in ("accuracy", "balanced_accuracy", "mcc"))
