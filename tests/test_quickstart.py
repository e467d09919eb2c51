"""The README's main job, ``usfmae quickstart``, at reduced size (``--smoke``): outputs exist and load.

Also its labelled task: split by scan, so that no image content (and no copy of a scan) is in both splits.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _array_digest(pixels: np.ndarray) -> str:
    """SHA-256 of an array's shape and bytes (written here, independently of usfmae_hf.io.hashing)."""
    return hashlib.sha256(repr(pixels.shape).encode() + np.ascontiguousarray(pixels).tobytes()).hexdigest()


def _pixel_digest(path: Path) -> str:
    with Image.open(path) as image:
        return _array_digest(np.asarray(image.convert("RGB")))


def _digests_by_split(task_dir: Path) -> dict[str, set[str]]:
    return {
        split: {_pixel_digest(path) for path in (task_dir / split).rglob("*.png")} for split in ("train", "validation")
    }


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``usfmae quickstart --smoke``, run once for the tests of this module that read its outputs."""
    out = tmp_path_factory.mktemp("quickstart") / "quickstart-output"
    result = subprocess.run(
        [sys.executable, "-m", "usfmae_hf.cli", "quickstart", "--output", str(out), "--smoke"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


@pytest.mark.slow
def test_quickstart_smoke_run_produces_loadable_outputs(smoke_run):
    out, result = smoke_run
    for number in range(1, 9):
        assert f"[{number}/8]" in result.stdout  # visible progress through every stage

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
        "usfmae pretrain",
        "usfmae finetune",
        "accelerate launch --multi_gpu --num_processes 8 -m usfmae_hf.pretraining",
        "## The same on the real USF-MAE release",
    ):
        assert section in report
    assert "validation_accuracy" in report
    assert "UsfmaeImageProcessor (PIL backend, exact)" in report and "load_image_processor" in report
    assert (
        "Leakage check (`usfmae_hf.evaluation.check_leakage`, scans and pixel SHA-256): no groups (scan) and image "
        "content shared between splits" in report
    )
    digests = _digests_by_split(out / "orientation-task")
    assert digests["train"] and digests["validation"] and not digests["train"] & digests["validation"]


def _report_commands(report: str) -> list[list[str]]:
    """The commands of every ``bash`` block of a report, continuation lines joined and comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", report, flags=re.DOTALL)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words:
                commands.append(words)
    return commands


def _probes(commands: list[list[str]]) -> list[list[str]]:
    """What shows that the program of each command is installed: ``PROGRAM [SUB-COMMAND] --help``, and for the
    ``python -c CODE`` commands one ``python -c`` importing every name they import (running them would redo the
    quickstart's work)."""
    probes, imports = [], []
    for words in commands:
        program = shutil.which(words[0]) or shutil.which(words[0], path=str(Path(sys.executable).parent))
        assert program is not None, f"{words[0]} is not installed: {shlex.join(words)}"
        if words[0] == "usfmae":
            probes.append([program, words[1], "--help"])
        elif words[0] == "accelerate":
            assert words[1] == "launch" and "-m" in words, shlex.join(words)  # a module, not a script path
            probes.append([sys.executable, "-m", words[words.index("-m") + 1], "--help"])
        else:
            assert words[:2] == ["python", "-c"], shlex.join(words)
            found = [node for node in ast.walk(ast.parse(words[2])) if isinstance(node, ast.ImportFrom)]
            assert found, words[2]
            imports += [f"from {node.module} import {', '.join(a.name for a in node.names)}" for node in found]
    unique = list(dict.fromkeys(tuple(probe) for probe in probes))
    return [list(probe) for probe in unique] + (
        [[sys.executable, "-c", "; ".join(dict.fromkeys(imports))]] if imports else []
    )


@pytest.mark.slow
def test_every_command_of_the_report_runs_from_any_folder(smoke_run, tmp_path):
    out, _ = smoke_run
    commands = _report_commands((out / "REPORT.md").read_text())
    assert len(commands) >= 15
    programs = {tuple(words[:2]) for words in commands}
    assert {("usfmae", "pretrain"), ("usfmae", "finetune"), ("accelerate", "launch"), ("python", "-c")} <= programs
    assert not [words for words in commands if any("training/" in word for word in words)]
    for probe in _probes(commands):
        result = subprocess.run(probe, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{shlex.join(probe)}: {result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr


def test_quickstart_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "usfmae_hf.cli", "quickstart", "--output", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "not empty" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def ingested(ultrasound_dicoms, tmp_path_factory) -> Path:
    """The pydicom-data ultrasound files ingested as the quickstart does (every 20th cine frame)."""
    from usfmae_hf.ingest import IngestOptions, ingest
    from usfmae_hf.quickstart.runner import RAW_FOLDER, collect_ultrasound_dicoms

    root = tmp_path_factory.mktemp("quickstart_ingest")
    collect_ultrasound_dicoms(root / "raw" / RAW_FOLDER)
    ingest(root / "raw", root / "dataset", options=IngestOptions(frame_stride=20), progress=False)
    return root / "dataset"


def test_orientation_task_keeps_every_scan_and_its_copies_in_one_split(ingested, ultrasound_dicoms, tmp_path):
    from usfmae_hf.io import load_frames
    from usfmae_hf.quickstart.task import build_orientation_task, check_task_leakage

    task = build_orientation_task(ingested, tmp_path / "task")
    digests = _digests_by_split(tmp_path / "task")
    assert digests["train"] and digests["validation"] and not digests["train"] & digests["validation"]
    assert check_task_leakage(tmp_path / "task").ok

    # Files sharing any frame content, found here by hashing every frame of the raw files, share a split.
    frames = {name: {_array_digest(f.image) for f in load_frames(path)} for name, path in ultrasound_dicoms.items()}
    split_of = {name: entry["split"] for entry in task.scans.values() for name in entry["files"]}
    copies = [(a, b) for a, b in itertools.combinations(sorted(frames), 2) if frames[a] & frames[b]]
    assert {("US1_J2KR.dcm", "US1_UNCR.dcm"), ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm")} <= set(copies)
    assert all(split_of[a] == split_of[b] for a, b in copies)

    # Both orientations of a frame, and all frames of a file, are in one split.
    with open(tmp_path / "task" / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    splits_of_source, labels_of_frame = {}, {}
    for row in rows:
        splits_of_source.setdefault(row["source"], set()).add(row["split"])
        labels_of_frame.setdefault((row["source"], row["frame"], row["split"]), []).append(row["label"])
    assert all(len(splits) == 1 for splits in splits_of_source.values())
    assert all(sorted(labels) == ["flipped", "upright"] for labels in labels_of_frame.values())
    assert sum(len(entry["files"]) for entry in task.scans.values()) == len(ultrasound_dicoms)
    assert sum(sum(counts.values()) for counts in task.counts.values()) == len(rows)


def test_leakage_check_catches_a_scan_in_both_splits(ingested, tmp_path):
    import shutil

    from usfmae_hf.evaluation import DataLeakageError
    from usfmae_hf.quickstart.task import MANIFEST, build_orientation_task, check_task_leakage

    task_dir = tmp_path / "task"
    build_orientation_task(ingested, task_dir)
    with open(task_dir / MANIFEST, newline="") as handle:
        rows = list(csv.DictReader(handle))
    moved = next(row for row in rows if row["split"] == "validation")
    copy = {**moved, "split": "train", "file": moved["file"].replace("validation/", "train/", 1)}
    shutil.copyfile(task_dir / moved["file"], task_dir / copy["file"])
    with open(task_dir / MANIFEST, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([*rows, copy])
    with pytest.raises(DataLeakageError, match="shared groups.*identical images"):
        check_task_leakage(task_dir)
