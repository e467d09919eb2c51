"""What a fine-tuning run prints when training starts and when the run ends (main process only).

Both entry points (classification and segmentation) use it: :class:`StartSummary` is a Trainer callback that
prints the plan once the Trainer knows it (processes and devices, effective batch, learning-rate plan, length,
split sizes, output folder; a warning when a multi-process launch gave one process), and
:func:`print_end_summary` prints the key metrics of every evaluated split and where each output is.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainingArguments

from usfmae_hf.finetuning.checks import CHECKPOINT_NAME, OUTPUT_GROUPS, SPLIT_OUTPUT_NAME
from usfmae_hf.finetuning.recipe import MaeSchedule


def launch_warning(world_size: int, environ: Mapping[str, str]) -> str | None:
    """A warning when a launcher meant several processes (``WORLD_SIZE`` > 1, or ``MASTER_ADDR`` from
    ``accelerate launch --num_processes N``) but this run trains in one; else None."""
    if world_size > 1:
        return None
    launched = environ.get("WORLD_SIZE", "")
    if launched.isdigit() and int(launched) > 1:
        reason = f"WORLD_SIZE={launched}"
    elif "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ:
        reason = "a launcher set MASTER_ADDR"
    else:
        return None
    return (
        f"warning: {reason} but this run trains in 1 process; `accelerate launch --cpu --num_processes N` starts "
        "one: on CPUs use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or `torchrun "
        "--nproc_per_node N`"
    )


def plan_lines(
    args: TrainingArguments,
    *,
    recipe: Mapping[str, Any],
    split_sizes: Mapping[str, int],
    batches_per_epoch: int,
    max_steps: int,
    num_layers: int,
) -> list[str]:
    """The start summary's lines after the first: processes, batch, learning rate, schedule, length, data, output."""
    precision = "bf16 mixed" if args.bf16 else "fp16 mixed" if args.fp16 else "fp32"
    distributed_type = args.distributed_state.distributed_type.value
    distributed = "not distributed" if distributed_type == "NO" else distributed_type
    processes = "process" if args.world_size == 1 else "processes"
    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    lines = [
        f"{args.world_size} {processes} ({distributed}) on {args.device}, {precision}",
        f"effective batch {effective_batch} = {args.per_device_train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {args.world_size} {processes}",
    ]
    peak = args.learning_rate
    rate = f"learning rate: peak {peak:.3g}"
    if recipe.get("blr") is not None:
        rate += f" = blr {recipe['blr']:.3g} x {effective_batch} / 256"
    layer_decay = recipe.get("layer_decay", 1.0)
    if layer_decay != 1.0:
        rate += (
            f"; layer decay {layer_decay:g} (embeddings at {peak * layer_decay ** (num_layers + 1):.3g}; the logged "
            "learning_rate is the head's)"
        )
    lines.append(rate)
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if recipe.get("lr_schedule") == "mae":
        schedule = MaeSchedule(warmup_epochs=recipe["warmup_epochs"], min_lr=recipe["min_lr"])
        warmup = schedule.factor(
            peak_lr=peak,
            batches_per_epoch=batches_per_epoch,
            accumulation=args.gradient_accumulation_steps,
            total_steps=max_steps,
        ).warmup_steps()
        line = (
            f"schedule: MAE's, per step: linear warmup over {schedule.warmup_epochs:g} epochs ({warmup} steps), "
            f"half-cycle cosine to {schedule.min_lr:g} at step {max_steps}"
        )
        if warmup >= max_steps:
            line += " (warning: the run ends before the warmup does; lower --warmup_epochs)"
        lines.append(line)
    else:
        lines.append(
            f"schedule: the Trainer's {args.lr_scheduler_type.value}, warmup {args.get_warmup_steps(max_steps)} steps"
        )
    lines += [
        f"length: {max_steps} optimizer steps = {max_steps / updates_per_epoch:.3g} epochs of {updates_per_epoch} "
        f"steps ({batches_per_epoch} batches of {args.per_device_train_batch_size} per epoch and process)",
        "data: " + ", ".join(f"{split} {size}" for split, size in split_sizes.items()) + " images",
        f"output: {Path(args.output_dir).resolve()}",
    ]
    return lines


class StartSummary(TrainerCallback):
    """Prints ``prog: training`` and :func:`plan_lines` (and :func:`launch_warning`) when training begins."""

    def __init__(self, prog: str, recipe: Mapping[str, Any], split_sizes: Mapping[str, int]) -> None:
        self.prog, self.recipe, self.split_sizes = prog, recipe, dict(split_sizes)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        warning = launch_warning(args.world_size, os.environ)
        if warning:
            print(f"{self.prog}: {warning}", file=sys.stderr, flush=True)
        head = f"{self.prog}: training"
        if state.global_step:
            head += f", resumed at step {state.global_step}"
        lines = plan_lines(
            args,
            recipe=self.recipe,
            split_sizes=self.split_sizes,
            batches_per_epoch=len(train_dataloader),
            max_steps=state.max_steps,
            num_layers=model.config.num_hidden_layers,
        )
        print("\n  ".join([head, *lines]), flush=True)


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def output_lines(output_dir: str | os.PathLike) -> list[str]:
    """Every top-level entry of ``output_dir``, one line per kind: model, card, results, each split's files,
    Trainer state, checkpoints, merged model, other (folders end in ``/``)."""
    folder = Path(output_dir)
    entries = sorted(folder.iterdir(), key=lambda path: path.name) if folder.is_dir() else []
    groups: dict[str, list[str]] = {}
    for path in entries:
        name = path.name + ("/" if path.is_dir() else "")
        if (split := SPLIT_OUTPUT_NAME.match(path.name)) is not None:
            kind = split.group(1)
        elif CHECKPOINT_NAME.match(path.name):
            kind = "checkpoints"
        else:
            kind = next((kind for kind, names in OUTPUT_GROUPS if path.name in names), "other")
        groups.setdefault(kind, []).append(name)
    checkpoints = groups.get("checkpoints")
    if checkpoints:
        checkpoints.sort(key=lambda name: int(CHECKPOINT_NAME.match(name.rstrip("/")).group(1)))
    order = [kind for kind, _ in OUTPUT_GROUPS] + ["validation", "test", "checkpoints", "other"]
    return [f"{kind}: {', '.join(groups[kind])}" for kind in sorted(groups, key=order.index)]


def end_lines(
    prog: str,
    results: Mapping[str, Any],
    *,
    metrics: Sequence[tuple[str, str, str]],
    splits: Sequence[str],
    steps: int,
    output_dir: str | os.PathLike,
    pushed_to: str | None,
) -> list[str]:
    """The end summary: steps, time and final train loss; the ``metrics`` (``(key, _, display name)``, as the
    model card's) of each evaluated split that it has; every output; where it was pushed."""
    head = f"{prog}: done: {steps} optimizer steps in {results.get('train_runtime', float('nan')):.1f} s"
    if results.get("train_loss") is not None:
        head += f", mean train loss {results['train_loss']:.4g}"
    lines = [head]
    for split in splits:
        shown = [
            f"{display} {_format(results[f'{split}_{key}'])}"
            for key, _, display in metrics
            if f"{split}_{key}" in results
        ]
        lines.append(f"  {split}: {', '.join(shown)}")
    lines.append(f"  outputs in {Path(output_dir).resolve()}:")
    lines += [f"    {line}" for line in output_lines(output_dir)]
    if pushed_to:
        lines.append(f"  pushed to the Hub as {pushed_to} (without Trainer pickles and checkpoints)")
    return lines


def print_end_summary(prog: str, results: Mapping[str, Any], **kwargs: Any) -> None:
    """Print :func:`end_lines` (call on the main process)."""
    print("\n".join(end_lines(prog, results, **kwargs)), flush=True)
