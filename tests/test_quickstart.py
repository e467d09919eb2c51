"""The README's main job, ``usfmae quickstart``, at reduced size (``--smoke``): outputs exist and load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_smoke_run_produces_loadable_outputs(tmp_path):
    out = tmp_path / "quickstart-output"
    result = subprocess.run(
        [sys.executable, "-m", "usfmae_hf.cli", "quickstart", "--output", str(out), "--smoke"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for number in range(1, 8):
        assert f"[{number}/7]" in result.stdout  # visible progress through every stage

    from datasets import load_dataset
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, ViTMAEModel

    build = load_dataset(str(out / "dataset"), split="train")
    assert len(build) > 0 and {"image", "dataset", "path", "frame", "group", "sha256"} <= set(build.column_names)
    assert isinstance(AutoModel.from_pretrained(out / "pretrain" / "final"), ViTMAEModel)
    assert AutoImageProcessor.from_pretrained(out / "pretrain" / "final").size == {"height": 64, "width": 64}
    classifier = AutoModelForImageClassification.from_pretrained(out / "finetune", trust_remote_code=True)
    assert set(classifier.config.id2label.values()) == {"flipped", "upright"}
    results = json.loads((out / "finetune" / "all_results.json").read_text())
    assert 0.0 <= results["validation_accuracy"] <= 1.0
    for figure in ("reconstruction.png", "pretrain/training_curves.png", "finetune/validation_confusion_matrix.png"):
        assert (out / figure).stat().st_size > 1000, figure
    assert (out / "features.parquet").stat().st_size > 0
    report = (out / "REPORT.md").read_text()
    for section in (
        "## Steps and exact commands",
        "usfmae ingest",
        "usfmae convert",
        "training/pretrain_mae.py",
        "training/finetune_classification.py",
        "## The same on the real USF-MAE release",
    ):
        assert section in report
    assert "validation_accuracy" in report


def test_quickstart_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "usfmae_hf.cli", "quickstart", "--output", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "not empty" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
