"""The quickstart's ``REPORT.md``: what ran, what it measured, and the same steps on the real release.

Every command it shows is one of the installed programs (``usfmae ...``, ``accelerate launch -m
usfmae_hf...``, ``python -c``), so that it runs from any folder, not only from a source checkout.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usfmae_hf.atomic import atomic_write_text
from usfmae_hf.version import __version__


@dataclass
class Step:
    """One quickstart stage as the report shows it: title, equivalent command, time, notes."""

    title: str
    command: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


REAL_RELEASE_COMMANDS = """\
# 1. Convert the released USF-MAE checkpoint (100 epochs, the recommended one), verified number-for-number
usfmae convert USF-MAE_100ep.pth --output usf-mae-vit-base
usfmae convert USF-MAE_100ep.pth --output usf-mae-vit-base-encoder --format vit   # encoder only

# 2. Ingest the OpenUS-46 datasets you downloaded (one folder per dataset under /data/OpenUS-46)
usfmae ingest /data/OpenUS-46 --output openus46-build --num-proc 8 --frame-stride 4 --slice-stride 2

# 3. Continue pretraining on 8 GPUs (1 GPU: usfmae pretrain with the same flags; multi-node, FSDP and DeepSpeed:
#    the accelerate configs in the repository's training/ folder)
accelerate launch --multi_gpu --num_processes 8 -m usfmae_hf.pretraining \\
    --model_name_or_path usf-mae-vit-base --dataset_dir openus46-build --output_dir runs/pretrain \\
    --recipe usfmae --num_train_epochs 100 --per_device_train_batch_size 64 --checkpointing_steps 1000

# 4. Features and reconstructions
usfmae features /data/my-scans --model usf-mae-vit-base --output features.parquet
usfmae reconstruct scan.dcm --model usf-mae-vit-base --output reconstruction.png

# 5. Fine-tune and evaluate on a held-out USF-MAE evaluation set (BUS-BRA fold 1), then push
usfmae finetune --model_name_or_path usf-mae-vit-base \\
    --task busbra --data_root /data/BUSBRA --fold 1 --recipe mae --output_dir runs/busbra-f1 \\
    --num_train_epochs 50 --per_device_train_batch_size 32 --eval_strategy epoch
usfmae probe --model usf-mae-vit-base --task busbra --data_root /data/BUSBRA --fold 1 --method linear --output-dir runs/busbra-probe

# 6. Publish
usfmae push usf-mae-vit-base --repo-id your-org/usf-mae-vit-base
"""


def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _metrics_table(results: dict) -> list[str]:
    rows = [
        (k, v)
        for k, v in sorted(results.items())
        if k.startswith(("validation_", "test_")) and isinstance(v, (int, float))
    ]
    lines = ["| metric | value |", "|---|---|"]
    lines += [
        f"| `{name}` | {value:.4f} |" if isinstance(value, float) else f"| `{name}` | {value} |" for name, value in rows
    ]
    return lines


def write_report(path: Path, steps: Sequence[Step], results: Mapping[str, Any]) -> Path:
    """Write ``REPORT.md`` for a finished quickstart run from its steps and recorded results."""
    import torch
    import transformers

    out = path.parent
    log = results["pretrain_log"]
    finetune_dir = results["finetune_dir"]
    lines = [
        "# USF-MAE quickstart report",
        "",
        f"usfmae-hf {__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU cores. "
        f"Total time: {sum(s.seconds for s in steps):.0f} s.",
        "",
        "Everything below ran on the real ultrasound DICOM files shipped by `pydicom-data` "
        f"({', '.join(results['dicoms'])}). The released USF-MAE weights are not downloadable here, so a small "
        "randomly initialised MAE in USF-MAE's original checkpoint layout stands in for them; the last section "
        "gives the same steps for the real checkpoints and datasets.",
        "",
        "## Steps and exact commands",
        "",
        "| # | step | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {i} | {step.title} | {step.seconds:.1f} |" for i, step in enumerate(steps, 1)]
    lines.append("")
    for i, step in enumerate(steps, 1):
        lines += [f"**{i}. {step.title}**", "", "```bash", step.command, "```", ""]
        if step.notes:
            lines += ["```text", *step.notes[-8:], "```", ""]

    lines += [
        "## Data",
        "",
        f"Ingest summary and duplicates: `{_relative(out / 'dataset' / 'ingest_report.md', out)}`.",
        "",
    ]

    lines += ["## Continued pretraining", ""]
    if log:
        first, last = log[0], log[-1]
        lines += [
            f"{len(log)} optimizer steps; loss {first['loss']:.4f} at step {first['step']} -> "
            f"{last['loss']:.4f} at step {last['step']}.",
            "",
            f"![training curves]({_relative(out / 'pretrain' / 'training_curves.png', out)})",
            "",
        ]
    difference = results["processor_difference"]
    lines += [
        "## Loading back, features and reconstruction",
        "",
        f"Loaded back as {results['loaded']}: `usfmae_hf.image.processor.load_image_processor(dir)` gives USF-MAE's "
        "exact transform (PIL resize, NEAREST); `AutoImageProcessor.from_pretrained(dir)` would give the default "
        "torchvision backend, whose NEAREST picks other source pixels at non-integer scales. Measured on the first "
        "frame of each file, default backend minus exact, in normalised units:",
        "",
        "| input size | max abs diff | mean abs diff | files differing |",
        "|---|---|---|---|",
        *(
            f"| {size} px{' (this model)' if i == 0 else ' (USF-MAE)'} | {d['max']:.3f} | {d['mean']:.5f} | "
            f"{d['images_differing']}/{len(results['dicoms'])} |"
            for i, (size, d) in enumerate(difference.items())
        ),
        "",
        "The package's commands and `usfmae_hf.inference.pipelines.pipeline(task, model=dir)` always use the exact "
        "processor.",
        "",
        f"Features: `{_relative(results['features'], out)}`.",
        "",
        "![reconstruction](reconstruction.png)",
        "",
    ]

    task = results["task"]
    counts = task.counts
    finetune_log = results["finetune_log"]
    validation_scans = sum(entry["split"] == "validation" for entry in task.scans.values())
    lines += [
        "## Fine-tuning (upright vs flipped scans)",
        "",
        "The MAE-recipe head (mean of patch tokens, saved with its code) fine-tuned with the Trainer on a "
        "labelled task built from the ingested (de-duplicated) frames: each frame upright and flipped vertically. "
        "The split is by scan: files the ingest found sharing a frame's content (by pixel SHA-256 or perceptual "
        "hash) are one scan, every frame of a cine belongs to its scan, and a whole scan goes to train or to "
        "validation (largest first, about a third of the frames to validation). Validation therefore holds only "
        "scans never seen in training: the accuracy measures transfer to other scans and vendors, not recall of "
        f"training frames (train {sum(counts['train'].values())} images, validation "
        f"{sum(counts['validation'].values())}).",
        "",
        "| scan | files | frames | split |",
        "|---|---|---|---|",
        *(
            f"| {scan} | {', '.join(entry['files'])} | {entry['frames']} | {entry['split']} |"
            for scan, entry in task.scans.items()
        ),
        "",
        f"Leakage check (`usfmae_hf.evaluation.check_leakage`, scans and pixel SHA-256): {results['leakage']}.",
        "",
        *(
            [
                f"Training loss {finetune_log[0]['loss']:.3f} at step {finetune_log[0]['step']} -> "
                f"{finetune_log[-1]['loss']:.3f} at step {finetune_log[-1]['step']}: how well the training scans are "
                "fitted; the validation figures below say whether that transfers to unseen scans.",
                "",
            ]
            if finetune_log
            else []
        ),
        f"Read the figures with care: {validation_scans} validation scans give "
        f"{sum(counts['validation'].values())} images, so one image moves the accuracy by "
        f"{1 / max(1, sum(counts['validation'].values())):.3f}, and chance is 0.5.",
        "",
        *_metrics_table(results["finetune"]),
        "",
    ]
    confusion = finetune_dir / "validation_confusion_matrix.png"
    if confusion.exists():
        lines += [f"![confusion matrix]({_relative(confusion, out)})", ""]
    lines += [
        "## The same on the real USF-MAE release and OpenUS-46",
        "",
        "```bash",
        REAL_RELEASE_COMMANDS.rstrip(),
        "```",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))
    return path
