"""What a pretraining run prints at its start (setup, plan, warnings) and at its end (result, outputs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from usfmae_hf.pretraining.arguments import USFMAE_GRID, PretrainingArguments, usfmae_grid_misses
from usfmae_hf.pretraining.checkpointing import list_checkpoints
from usfmae_hf.pretraining.modeling import Plan

#: Entries of :func:`training_table` that the start summary prints as its optimizer line.
OPTIMIZER_ENTRIES = ("learning rate", "weight decay", "AdamW betas", "gradient clipping")


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
    optimizer: Mapping[str, Any] | None = None,
    dataset_size: int | None,
    output_dir: Path,
    start_step: int,
) -> list[str]:
    """The run's setup in a few lines: processes, devices, precision, batch, lr plan, data, output folder.

    ``optimizer``, a :func:`training_table`, adds a line with its lr rule, weight decay, betas and clipping.
    """
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
    if optimizer:  # after the lr plan
        lines.insert(-1, "optimizer: AdamW, " + ", ".join(f"{name} {optimizer[name]}" for name in OPTIMIZER_ENTRIES))
    if start_step:
        lines.append(f"resuming at step {start_step} of {plan.total_steps}")
    return lines


def training_table(
    args: PretrainingArguments,
    plan: Plan,
    *,
    scaling_batch: int,
    precision: str,
    initialised_from: str,
    config: Any,
) -> dict[str, Any]:
    """The model card's table of training settings: what a run's weights came from and how they were trained.

    ``scaling_batch`` is the B of lr = blr x B / 256; a ``--recipe usfmae`` run also names its point of
    USF-MAE's grid, or how it leaves it.
    """
    if args.learning_rate is not None:
        learning_rate = f"{plan.peak_lr:g} (--learning_rate)"
    else:
        learning_rate = f"{plan.peak_lr:g} = blr {args.base_learning_rate:g} x {scaling_batch} / 256"
    decayed = "all parameters" if args.decay_all_parameters else "weight matrices (none on biases, norms, tokens)"
    table: dict[str, Any] = {
        "recipe": args.recipe,
        "initialised from": initialised_from,
        "effective batch size": plan.effective_batch_size,
        "learning rate": learning_rate,
        "weight decay": f"{args.weight_decay:g} on {decayed}",
    }
    if args.recipe == "usfmae":
        misses = usfmae_grid_misses(args)
        blrs, decays = (", ".join(f"{value:g}" for value in USFMAE_GRID[name]) for name in USFMAE_GRID)
        grid = f"blr {{{blrs}}} x weight decay {{{decays}}}"
        table["USF-MAE grid point"] = (
            f"none: {'; '.join(misses)}"
            if misses
            else f"blr {args.base_learning_rate:g}, weight decay {args.weight_decay:g} (of {grid})"
        )
    table.update(
        {
            "AdamW betas": f"{args.adam_beta1:g} / {args.adam_beta2:g}",
            "schedule": f"linear warmup {plan.warmup_steps} of {plan.total_steps} steps, cosine to {plan.min_lr:g}",
            "gradient clipping": f"{args.max_grad_norm:g}" if args.max_grad_norm else "none",
            "last short batch": "dropped" if args.dataloader_drop_last else "kept",
            "precision": precision,
            "mask ratio": config.mask_ratio,
            "norm_pix_loss": config.norm_pix_loss,
        }
    )
    return table


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
