"""What a pretraining run prints at its start (setup, plan, warnings) and at its end (result, outputs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from usfmae_hf.pretraining.checkpointing import list_checkpoints
from usfmae_hf.pretraining.modeling import Plan


def lr_plan_warnings(plan: Plan) -> list[str]:
    """Warnings about a schedule that does not do what its name says."""
    warnings = []
    if plan.min_lr >= plan.peak_lr:
        warnings.append(
            f"--min_lr {plan.min_lr:.3g} is at or above the peak lr {plan.peak_lr:.3g} (effective batch "
            f"{plan.effective_batch_size}): after warmup the 'cosine decay' "
            f"{'climbs' if plan.min_lr > plan.peak_lr else 'stays flat'}; lower --min_lr or raise "
            "--learning_rate / --base_learning_rate"
        )
    if plan.warmup_steps >= plan.total_steps:
        warnings.append(f"warmup takes all {plan.total_steps} steps: the lr never decays")
    return warnings


def start_lines(
    *,
    processes: int,
    distributed_type: str,
    device: torch.device,
    precision: str,
    threads: int,
    workers: int,
    per_device_batch: int,
    accumulation: int,
    plan: Plan,
    dataset_size: int | None,
    output_dir: Path,
    start_step: int,
) -> list[str]:
    """The run's setup in a few lines: processes, devices, precision, batch, lr plan, data, output folder."""
    worker_text = f"{workers} DataLoader workers x 1 thread" if workers else "no DataLoader workers"
    images = "a stream (size unknown)" if dataset_size is None else f"{dataset_size} images"
    lines = [
        f"processes: {processes} ({distributed_type}), device {device}, precision {precision}",
        f"threads: {threads} torch threads per process, {worker_text}",
        f"effective batch: {per_device_batch} per process x {accumulation} accumulation x {processes} processes"
        f" = {plan.effective_batch_size}",
        f"lr plan: linear warmup {plan.warmup_steps} steps to peak {plan.peak_lr:.3g}, cosine to {plan.min_lr:.3g}"
        f" at step {plan.total_steps}",
        f"data: {images}; output folder: {output_dir}",
    ]
    if start_step:
        lines.append(f"resuming at step {start_step} of {plan.total_steps}")
    return lines


def end_lines(records: Sequence[dict], output_dir: Path, final: Path, bad_images: int, images: int) -> list[str]:
    """The run's result and where every output is."""
    lines = []
    if records:
        last = records[-1]
        window = records[-10:]
        mean = sum(record["loss"] for record in window) / len(window)
        lines.append(
            f"final loss {last['loss']:.4f} at step {last['step']} (mean of the last {len(window)} steps {mean:.4f}); "
            f"{images} images, {bad_images} unreadable images skipped"
        )
    outputs = [("model", final), ("log", output_dir / "log.jsonl"), ("curves", output_dir / "training_curves.png")]
    previews = output_dir / "reconstructions"
    if previews.is_dir():
        outputs.append(("reconstructions", previews))
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        outputs.append(("checkpoints", ", ".join(path.name for path in checkpoints) + f" in {output_dir}"))
    lines += [f"{name}: {path}" for name, path in outputs]
    return lines
