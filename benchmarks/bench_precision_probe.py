#!/usr/bin/env python
"""Benchmark: what bf16 features cost a linear probe on a labelled ultrasound task (issue 15, item 2).

The task: every distinct frame of the real ultrasound DICOMs that ``pydicom-data`` ships (GE, Philips,
ALOKA, SonoSite; stills and a 120-frame cine), each as two random crops (50-100% of the area), each crop
flipped top to bottom or not at random: upright or flipped? ``--train-share`` of the frames (at random)
give the training images, the others the validation images. Neighbouring cine frames fall on both sides,
so the accuracy flatters the task; what this measures is the difference between the precisions.

For each model, the linear probe of ``usfmae probe --method linear`` (the library's
:func:`usfmae_hf.evaluation.probe.run_probe`, standardised features) runs twice on the same images:
``--dtype fp32`` and ``--dtype bf16``. Each fits its own probe on its own features, as a user switching
precision would. Prints, per split seed, the validation accuracy of each, how many validation predictions
changed and the largest change of a predicted probability; then the mean accuracy difference, beside the
accuracy's binomial standard error for scale. The cosine similarity of bf16 to fp32 features (0.9999 and
more) says little here: a probe standardises every feature, so what counts is the bf16 error against how
much a feature varies between images (``bench_inference.py`` prints both).

Models: a random-weight ViT-B/16 at 224 px and the quickstart's small MAE architecture (random weights),
plus any converted model folder given with ``--model`` (the quickstart's ``pretrain/final``, the released
USF-MAE weights). bf16 is only fast where the hardware has bf16 matrix units; the answer does not depend
on that. Run (about 6 minutes on 2 cores with one extra small model):

    python benchmarks/bench_precision_probe.py [--model DIR ...] [--seeds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_inference import random_model_directory  # this folder is on sys.path when a script in it runs
from bench_processor_backends import augmented_views

from usfmae_hf.precision import cpu_name, describe_precision

LABELS = ("upright", "flipped")  # label 1 of augmented_views: flipped top to bottom
VIEWS = 2  # crops of each frame


def distinct_frames(frame_stride: int) -> list[np.ndarray]:
    """The pydicom-data ultrasound frames (every ``frame_stride``-th of a cine), each pixel content once."""
    from pydicom.data import get_testdata_file

    from usfmae_hf.io import load_frames
    from usfmae_hf.io.hashing import pixel_sha256
    from usfmae_hf.quickstart.runner import ULTRASOUND_DICOMS

    distinct = {}  # US1_J2KR is US1_UNCR again, OBXXXX1A comes in three encodings
    for name in ULTRASOUND_DICOMS:
        for frame in load_frames(get_testdata_file(name), frame_stride=frame_stride):
            image = np.asarray(frame.image)
            distinct.setdefault(pixel_sha256(image), image)
    return list(distinct.values())


def write_task(frames: list[np.ndarray], root: Path, train_frames: int, seed: int) -> dict[str, Path]:
    """``root/{train,validation}/{upright,flipped}/NNNN.png``; returns the split folders.

    The views of ``train_frames`` frames go to train, those of the others to validation: each frame gives
    ``VIEWS`` random crops, each flipped or not at random (``bench_processor_backends.augmented_views``).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(frames))
    splits = {"train": order[:train_frames], "validation": order[train_frames:]}
    for split, indices in splits.items():
        images, labels = augmented_views([frames[index] for index in indices], VIEWS, rng)
        for number, (image, label) in enumerate(zip(images, labels)):
            target = root / split / LABELS[label] / f"{number:04d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.convert("RGB").save(target)
    return {split: root / split for split in splits}


def predictions(output_dir: Path) -> dict[str, tuple[int, np.ndarray]]:
    """image id -> (predicted class, class probabilities) from ``validation_predictions.csv``."""
    with open(output_dir / "validation_predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return {
        row["id"]: (int(row["prediction"]), np.array([float(row[f"prob_{name}"]) for name in LABELS])) for row in rows
    }


def compare(model: str, task: dict[str, Path], output: Path, device: str | None) -> dict[str, float]:
    """Probe ``model`` on ``task`` in fp32 and in bf16; the two accuracies and how the predictions differ."""
    from usfmae_hf.evaluation.probe import run_probe

    data = {"train_dir": str(task["train"]), "validation_dir": str(task["validation"])}
    results, predicted = {}, {}
    for dtype in ("fp32", "bf16"):
        results[dtype] = run_probe(
            model,
            output / dtype,
            method="linear",
            data=data,
            dtype=dtype,
            device=device,
            overwrite=True,
            progress=False,
        )
        predicted[dtype] = predictions(output / dtype)
    fp32, bf16 = predicted["fp32"], predicted["bf16"]
    return {
        "fp32": results["fp32"]["validation_accuracy"],
        "bf16": results["bf16"]["validation_accuracy"],
        "changed": sum(fp32[key][0] != bf16[key][0] for key in fp32),
        "images": len(fp32),
        "largest": max(float(np.abs(fp32[key][1] - bf16[key][1]).max()) for key in fp32),
    }


def report(label: str, rows: list[dict[str, float]]) -> None:
    """One line per split seed and the mean accuracy difference over them."""
    print(f"  {label}:")
    for seed, row in enumerate(rows):
        print(
            f"    seed {seed}: accuracy fp32 {row['fp32']:.4f}, bf16 {row['bf16']:.4f} "
            f"({row['bf16'] - row['fp32']:+.4f}); "
            f"predictions changed {row['changed']} of {row['images']}; largest probability change {row['largest']:.4f}"
        )
    differences = [row["bf16"] - row["fp32"] for row in rows]
    changed = sum(row["changed"] for row in rows) / sum(row["images"] for row in rows)
    accuracy = float(np.mean([row["fp32"] for row in rows]))
    standard_error = np.sqrt(accuracy * (1 - accuracy) / rows[0]["images"])
    print(
        f"    mean bf16 - fp32 accuracy {np.mean(differences):+.4f} (from {min(differences):+.4f} to "
        f"{max(differences):+.4f}); {changed:.1%} of validation predictions changed; for scale, the fp32 "
        f"accuracy's binomial standard error is {standard_error:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="a converted model folder to probe as well (repeatable), e.g. the quickstart's pretrain/final",
    )
    parser.add_argument(
        "--frame-stride", type=int, default=1, help="every Nth frame of the cine (default: 1, all 120 frames)"
    )
    parser.add_argument(
        "--train-share",
        type=float,
        default=0.5,
        help="share of the frames whose images train the probe (default: 0.5); the others' images validate it",
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="random train/validation splits and crops, 0, 1, ... (default: 3)"
    )
    parser.add_argument("--device", default=None, help="where the encoder runs (default: CPU)")
    args = parser.parse_args()
    if args.seeds < 1 or args.frame_stride < 1:
        parser.error("--seeds and --frame-stride must be at least 1")

    from usfmae_hf.errors import UsfmaeError
    from usfmae_hf.launch import library_progress_bars
    from usfmae_hf.model.directory import model_type
    from usfmae_hf.quickstart.runner import SMALL_MAE

    for path in args.model:  # before minutes of work on the built-in models
        try:
            model_type(path)
        except UsfmaeError as error:
            parser.error(f"--model {error}")

    device = torch.device(args.device or "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads; "
        f"--dtype auto: {describe_precision('auto', device)}"
    )
    frames = distinct_frames(args.frame_stride)
    train_frames = round(args.train_share * len(frames))
    if not 0 < train_frames < len(frames):
        parser.error(f"--train-share {args.train_share} leaves no frame for train or for validation")
    print(
        f"task: {len(frames)} distinct pydicom-data ultrasound frames, each as {VIEWS} random crops flipped top to "
        f"bottom or not at random; {VIEWS * train_frames} train, {VIEWS * (len(frames) - train_frames)} "
        f"validation images (split by frame), {args.seeds} seeds"
    )
    with tempfile.TemporaryDirectory() as directory, library_progress_bars(False):
        work = Path(directory)
        models = {
            "random ViT-B/16 (224 px)": random_model_directory(str(work / "vit-b")),
            "small MAE (quickstart architecture, 64 px, random)": random_model_directory(
                str(work / "small"), **SMALL_MAE
            ),
            **{path: path for path in args.model},
        }
        rows: dict[str, list[dict[str, float]]] = {label: [] for label in models}
        for seed in range(args.seeds):
            task = write_task(frames, work / f"task-{seed}", train_frames, seed)
            for index, (label, model) in enumerate(models.items()):
                rows[label].append(compare(model, task, work / f"probe-{seed}-{index}", args.device))
        for label, model_rows in rows.items():
            report(label, model_rows)


if __name__ == "__main__":
    main()
