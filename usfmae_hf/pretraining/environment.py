"""Where a pretraining run executes: its compute precision and whether the processes asked for were started.

The precision follows :mod:`usfmae_hf.precision`: ``auto`` (and a recipe's preset) becomes bf16 autocast
where the hardware is fast at it (a CUDA GPU of compute capability 8.0+, an x86 CPU with AMX or AVX-512
BF16) and fp32 elsewhere. A recipe's preset never forces a slow or unsupported precision on a machine;
a precision given on the command line is honoured where it runs at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.precision import DTYPES, Precision, bf16_support, choose_precision

if TYPE_CHECKING:
    from usfmae_hf.pretraining.arguments import PretrainingArguments

#: ``--mixed_precision`` values; ``no`` is accelerate's name for fp32.
PRECISION_CHOICES = ("auto", "no", "fp32", "bf16", "fp16")


def resolve_precision(requested: str, device: torch.device, *, recipe: str | None = None) -> tuple[Precision, str]:
    """The autocast precision of a run on ``device`` and a note on it (empty if there is nothing to say).

    Args:
        requested: a :data:`PRECISION_CHOICES` value.
        device: the device the model trains on.
        recipe: the recipe name when ``requested`` is that recipe's preset (not given on the command line);
            a preset the hardware is not fast at is replaced by the ``auto`` choice, with a note.

    Raises:
        UsfmaeError: fp16 asked for on the command line for a CPU (emulated there, about 50x slower).
    """
    name = "fp32" if requested == "no" else requested
    if name not in DTYPES and name != "auto":
        raise UsfmaeError(f"--mixed_precision must be one of {', '.join(PRECISION_CHOICES)}, got {requested!r}")
    if recipe is not None and name != "auto":
        if _fast(name, device):
            support = bf16_support(device) if name == "bf16" else None
            return Precision(name, DTYPES[name], f"recipe {recipe}" + (f"; {support}" if support else "")), ""
        chosen = choose_precision("auto", device)
        return chosen, f"recipe {recipe} asks for {name}, which is not fast on {_describe(device)}; using {chosen}"
    if name == "fp16" and device.type == "cpu":
        raise UsfmaeError(
            "--mixed_precision fp16 needs a CUDA GPU (CPU float16 is emulated, about 50x slower than fp32); "
            "use --mixed_precision auto, bf16 or fp32"
        )
    chosen = choose_precision(name, device)
    if chosen.name == "bf16" and bf16_support(device) is None:
        return chosen, f"bf16 is emulated on {_describe(device)} and may be slower than fp32"
    return chosen, ""


def describe(precision: Precision) -> str:
    """``"bf16 autocast (CPU has AMX)"``, ``"fp32 (requested)"``: the line printed and recorded on the model card."""
    kind = "" if precision.name == "fp32" else " autocast"
    return f"{precision.name}{kind} ({precision.reason})"


def accelerate_mixed_precision(precision: Precision) -> str:
    """The ``Accelerator(mixed_precision=...)`` value of a resolved precision."""
    return "no" if precision.name == "fp32" else precision.name


def _fast(name: str, device: torch.device) -> bool:
    """Whether ``name`` (fp32, bf16, fp16) runs at full speed on ``device``: fp16 only on CUDA."""
    if name == "fp32":
        return True
    if name == "fp16":
        return device.type == "cuda"
    return bf16_support(device) is not None


def _describe(device: torch.device) -> str:
    if device.type == "cpu":
        return "this CPU (no AMX or AVX-512 BF16)" if bf16_support(device) is None else "this CPU"
    return str(device)


def intended_processes(environ: Mapping[str, str] | None = None) -> tuple[int | None, str]:
    """How many processes the launch asked for, from the environment, and where that was read.

    ``WORLD_SIZE`` (torchrun, ``accelerate launch --multi_gpu``), else ``ACCELERATE_NUM_PROCESSES``; else
    a ``MASTER_PORT`` without ``WORLD_SIZE``, which ``accelerate launch --num_processes N`` (N > 1) sets
    even where it then starts a single process (``--cpu``): more than one intended, count unknown (0).
    ``(None, "")`` when nothing says.
    """
    environ = os.environ if environ is None else environ
    for name in ("WORLD_SIZE", "ACCELERATE_NUM_PROCESSES"):
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value), f"{name}={value}"
    if environ.get("MASTER_PORT"):
        return 0, "MASTER_PORT is set without WORLD_SIZE (accelerate launch --num_processes N without --multi_gpu)"
    return None, ""


def check_process_count(num_processes: int, environ: Mapping[str, str] | None = None) -> str:
    """A warning when fewer processes run than were asked for ("" if none).

    Raises:
        UsfmaeError: ``WORLD_SIZE`` > 1 but this process trains alone: every process would train its own
            copy and they would all write the same output folder (torchrun on a CPU-only machine without
            ``ACCELERATE_USE_CPU=1``).
    """
    intended, source = intended_processes(environ)
    if intended is None or intended == num_processes or (intended == 0 and num_processes > 1):
        return ""
    how = (
        "on a CPU-only machine use ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N, or "
        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N"
    )
    if source.startswith("WORLD_SIZE") and num_processes == 1:
        raise UsfmaeError(
            f"{source} but this process trains alone (accelerate found no distributed setup): every process "
            f"would train its own model and write the same --output_dir; {how}"
        )
    asked = f"{intended} processes" if intended else "several processes"
    return f"{asked} asked for ({source}) but {num_processes} running; {how}"


def build_accelerator(args: PretrainingArguments, precision_from_recipe: bool) -> tuple[Any, Precision]:
    """The run's ``Accelerator`` (precision, accumulation, trackers, seedable sampler, torch.compile) and precision.

    ``precision_from_recipe``: ``args.mixed_precision`` is the recipe's preset, not a command-line choice.
    """
    from accelerate import Accelerator, DataLoaderConfiguration, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin, parse_flag_from_env

    # accelerate keeps one precision per interpreter; a second run in the same process (tests, quickstart)
    # may choose another. The process group lives in PartialState, which is kept.
    AcceleratorState._reset_state()
    # the device as the Accelerator will see it (it reads ACCELERATE_USE_CPU itself; PartialState does not)
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    precision, note = resolve_precision(
        args.mixed_precision, device, recipe=args.recipe if precision_from_recipe else None
    )
    trackers = [name for name in args.report_to if name != "none"]
    accelerator = Accelerator(
        mixed_precision=accelerate_mixed_precision(precision),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=str(args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if args.torch_compile else None,
    )
    if len(accelerator.log_with) < len(trackers):
        raise UsfmaeError(f"--report_to {' '.join(trackers)}: tracker not installed or unknown to accelerate")
    if note:
        accelerator.print(f"note: {note}")
    return accelerator, precision
