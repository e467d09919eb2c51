"""Command-line arguments of MAE pretraining (``HfArgumentParser`` dataclasses) and the two recipes.

Every recipe-governed field defaults to ``None`` and is filled from the chosen ``--recipe`` by
:func:`apply_recipe`, so any single value can be overridden on the command line.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.publishing.cards import LICENSE_EXAMPLES, check_license_id

# The two published recipes. USF-MAE (its USF-MAE_pretraining.ipynb): AdamW with torch's default betas and
# weight decay on every parameter, lr = blr x 128 / 256, 10% warmup (whole iterations, rounded down), cosine to
# 1e-5, grad-clip 1.0, bf16, 100 epochs, every image each epoch (last batch short), pixel loss without
# per-patch normalisation, USF-MAE's augmentations. MAE: betas (0.9, 0.95), no decay on biases, norms and
# tokens, lr = blr x effective batch / 256, 40 of 800 epochs warmup, cosine to 0, no clipping, fp16 AMP,
# norm_pix_loss, crop+flip, full batches only.
# A recipe's precision is used where the hardware is fast at it, else the ``auto`` choice (environment.py).
RECIPES: dict[str, dict[str, Any]] = {
    "usfmae": dict(
        augmentation="usfmae",
        base_learning_rate=3e-4,
        lr_scaling_batch_size=128,
        adam_beta1=0.9,
        adam_beta2=0.999,
        weight_decay=0.05,
        decay_all_parameters=True,
        warmup_ratio=0.1,
        min_lr=1e-5,
        max_grad_norm=1.0,
        mixed_precision="bf16",
        num_train_epochs=100.0,
        dataloader_drop_last=False,
        mask_ratio=0.75,
        norm_pix_loss=False,
    ),
    "mae": dict(  # no lr_scaling_batch_size: MAE scales with the effective batch
        augmentation="mae",
        base_learning_rate=1.5e-4,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.05,
        decay_all_parameters=False,
        warmup_ratio=0.05,
        min_lr=0.0,
        max_grad_norm=0.0,
        mixed_precision="fp16",
        num_train_epochs=800.0,
        dataloader_drop_last=True,
        mask_ratio=0.75,
        norm_pix_loss=True,
    ),
}

#: USF-MAE's hyper-parameter grid (its notebook trains every pair, batch 64, 100 epochs); the published text
#: does not say which pair the released checkpoints used. The ``usfmae`` preset takes the first blr and MAE's
#: weight decay; values off the grid are allowed, with a warning (:func:`usfmae_grid_misses`).
USFMAE_GRID: dict[str, tuple[float, ...]] = {"base_learning_rate": (3e-4, 1e-3), "weight_decay": (0.01, 0.05)}

#: How a recipe turns ``warmup_ratio x total steps`` into whole steps: USF-MAE's notebook truncates
#: (``int(total * 0.1)``); MAE's warmup is whole epochs, which rounding to the nearest step recovers exactly.
WARMUP_ROUNDING: dict[str, Callable[[float], int]] = {"usfmae": math.floor, "mae": round}


@dataclass
class ModelArguments:
    """Which model to pretrain."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Converted ViTMAE model directory to continue pretraining from."}
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "ViTMAE config.json (or a folder holding one) to pretrain from scratch, MAE-initialised."},
    )
    mask_ratio: float | None = field(default=None, metadata={"help": "Fraction of patches masked (recipe: 0.75)."})
    norm_pix_loss: bool | None = field(
        default=None,
        metadata={"help": "Loss on per-patch normalised pixels (recipe: usfmae false, mae true); saved in the config."},
    )
    license: str | None = field(
        default=None,
        metadata={
            "help": f"Hub license id of the trained weights for the model card, e.g. {LICENSE_EXAMPLES} (default: "
            "the license recorded for the initial weights, else 'unknown')."
        },
    )


@dataclass
class DataArguments:
    """Where the training images come from (exactly one of the three sources)."""

    dataset_dir: str | None = field(
        default=None, metadata={"help": "`usfmae ingest` output (or any local datasets folder) with an image column."}
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "Folder of images (PNG/JPEG/DICOM/...; first frame of each file)."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hugging Face dataset id with an image column."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    image_column: str = field(default="image", metadata={"help": "Name of the image column."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset (sharded across processes); needs --max_steps."}
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a streamed dataset."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N samples (debugging)."})
    validation_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of images for the reconstruction grid (default: the first training images)."},
    )
    num_reconstruction_images: int = field(default=8, metadata={"help": "Images in the reconstruction grid."})
    max_bad_fraction: float = field(
        default=0.01, metadata={"help": "Fail when more than this fraction of samples cannot be decoded."}
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "DataLoader worker processes per process (default: training on a GPU, available CPUs minus one, "
            "at most 4; on CPUs, none below 8 CPUs, else one per 8 CPUs, at most 4)."
        },
    )
    augment_on_device: bool = field(
        default=False,
        metadata={"help": "Workers only decode and resize; the random augmentations run batched on the accelerator."},
    )


@dataclass
class PretrainingArguments:
    """Optimisation, schedule, checkpointing and logging."""

    output_dir: str = field(metadata={"help": "Run directory: log.jsonl, checkpoints, final/ model, plots."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an --output_dir that holds a run: remove its checkpoints, log and outputs."},
    )
    recipe: Literal["usfmae", "mae"] = field(
        default="usfmae",
        metadata={
            "help": "Preset for every field marked 'recipe': usfmae (USF-MAE's notebook: AdamW with torch's default "
            "betas and weight decay on every parameter, lr = blr x 128 / 256, 10%% warmup, cosine to 1e-5, "
            "grad-clip 1.0, bf16, 100 epochs, last short batch kept) or mae (betas 0.9/0.95, no decay on biases "
            "and norms, lr = blr x effective batch / 256, 5%% warmup, cosine to 0, no clipping, fp16, 800 epochs, "
            "norm_pix_loss, full batches only)."
        },
    )
    augmentation: Literal["usfmae", "mae"] | None = field(
        default=None, metadata={"help": "Augmentation pipeline (recipe: same name as the recipe)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of weights init, data order, augmentations and masks."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per process per micro-batch."})
    dataloader_drop_last: bool | None = field(
        default=None,
        metadata={
            "help": "Drop each epoch's last short batch (recipe: usfmae false, as USF-MAE's DataLoader; mae true). "
            "Kept on several processes, it is filled up with images from the start of the epoch."
        },
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps to train (overrides epochs)."})
    num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs to train (recipe: 100 / 800)."})
    base_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "blr; lr = blr x --lr_scaling_batch_size / 256. Recipe: usfmae 3e-4, from USF-MAE's grid "
            "{3e-4, 1e-3} (another value trains, with a warning); mae 1.5e-4."
        },
    )
    lr_scaling_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "The batch B of lr = blr x B / 256. Recipe: usfmae 128, the constant of USF-MAE's notebook "
            "(which trains at batch 64: its lr is blr / 2 whatever the batch); mae: the effective batch."
        },
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "Absolute peak learning rate; overrides --base_learning_rate scaling."}
    )
    min_lr: float | None = field(default=None, metadata={"help": "Final lr of the cosine decay (recipe: 1e-5 / 0)."})
    warmup_steps: int | None = field(default=None, metadata={"help": "Linear warmup steps (overrides --warmup_ratio)."})
    warmup_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Warmup as a fraction of all steps (recipe: 0.1 / 0.05); --recipe usfmae rounds down, as its "
            "notebook's int(), mae to the nearest step."
        },
    )
    weight_decay: float | None = field(
        default=None,
        metadata={
            "help": "AdamW weight decay. Recipe: usfmae 0.05, from USF-MAE's grid {0.01, 0.05} (another value "
            "trains, with a warning); mae 0.05."
        },
    )
    decay_all_parameters: bool | None = field(
        default=None,
        metadata={
            "help": "Weight decay on every trained parameter, biases, norms and CLS / mask tokens included, as "
            "USF-MAE's AdamW(model.parameters()); false: on weight matrices only, as MAE (recipe: usfmae true, "
            "mae false). The fixed position embeddings are never trained."
        },
    )
    adam_beta1: float | None = field(default=None, metadata={"help": "AdamW beta1 (recipe: 0.9)."})
    adam_beta2: float | None = field(default=None, metadata={"help": "AdamW beta2 (recipe: 0.999 / 0.95)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "Gradient clipping norm; 0 disables (recipe: 1.0 / 0)."}
    )
    mixed_precision: Literal["auto", "no", "fp32", "bf16", "fp16"] | None = field(
        default=None,
        metadata={
            "help": "Autocast precision: auto (bf16 where the hardware is fast at it: a CUDA GPU of compute "
            "capability 8.0+ or a CPU with AMX / AVX-512 BF16; else fp32), bf16, fp16 (CUDA only), fp32 (or no). "
            "Recipe: bf16 / fp16 where fast, else auto."
        },
    )
    torch_compile: bool = field(default=False, metadata={"help": "Compile the model with torch.compile (inductor)."})
    logging_steps: int = field(
        default=10, metadata={"help": "Print, report to trackers and check bad images every N steps."}
    )
    report_to: list[str] = field(
        default_factory=list, metadata={"help": "Accelerate trackers, e.g. tensorboard trackio wandb (default: none)."}
    )
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save the full training state (and an HF model) every N optimizer steps."}
    )
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the last N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint directory to resume from (mid-epoch)."}
    )
    reconstruction_steps: int | None = field(
        default=None,
        metadata={
            "help": "Write a reconstruction grid PNG every N steps (default: at each checkpoint) and at the end."
        },
    )


def apply_recipe(model_args: ModelArguments, training_args: PretrainingArguments) -> set[str]:
    """Fill every ``None`` recipe field in place; return the names of the fields filled."""
    preset = RECIPES[training_args.recipe]
    filled = set()
    for args in (model_args, training_args):
        for item in dataclasses.fields(args):
            if item.name in preset and getattr(args, item.name) is None:
                setattr(args, item.name, preset[item.name])
                filled.add(item.name)
    return filled


def validate_arguments(
    model_args: ModelArguments, data_args: DataArguments, training_args: PretrainingArguments
) -> None:
    """Reject contradictory or out-of-range arguments with one clear message."""
    sources = [name for name in ("dataset_dir", "train_dir", "dataset_name") if getattr(data_args, name)]
    if len(sources) != 1:
        raise UsfmaeError("give exactly one of --dataset_dir, --train_dir or --dataset_name")
    if (model_args.model_name_or_path is None) == (model_args.config_name is None):
        raise UsfmaeError("give exactly one of --model_name_or_path (continue) or --config_name (from scratch)")
    if model_args.license is not None:
        check_license_id(model_args.license)
    if data_args.streaming and training_args.max_steps is None:
        raise UsfmaeError("--streaming needs --max_steps (a stream has no length)")
    if data_args.streaming and data_args.train_dir:
        raise UsfmaeError("--streaming applies to --dataset_dir / --dataset_name, not --train_dir")
    if data_args.dataloader_num_workers is not None and data_args.dataloader_num_workers < 0:
        raise UsfmaeError("--dataloader_num_workers must be >= 0")
    if not 0.0 <= data_args.max_bad_fraction <= 1.0:
        raise UsfmaeError(f"--max_bad_fraction must be in [0, 1], got {data_args.max_bad_fraction}")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(training_args, name) < 1:
            raise UsfmaeError(f"--{name} must be >= 1")
    for name in (
        "max_steps",
        "checkpointing_steps",
        "save_total_limit",
        "reconstruction_steps",
        "lr_scaling_batch_size",
    ):
        value = getattr(training_args, name)
        if value is not None and value < 1:
            raise UsfmaeError(f"--{name} must be >= 1")


def usfmae_grid_misses(args: PretrainingArguments) -> list[str]:
    """How a ``--recipe usfmae`` run's lr and weight decay leave USF-MAE's grid (:data:`USFMAE_GRID`).

    Empty when they are one of the notebook's grid points, and for other recipes.
    """
    if args.recipe != "usfmae":
        return []
    misses = []
    if args.learning_rate is not None:
        misses.append(f"--learning_rate {args.learning_rate:g} replaces lr = blr x 128 / 256")
    elif args.lr_scaling_batch_size != RECIPES["usfmae"]["lr_scaling_batch_size"]:
        misses.append(f"--lr_scaling_batch_size {args.lr_scaling_batch_size} replaces lr = blr x 128 / 256")
    for name, grid in USFMAE_GRID.items():
        value = getattr(args, name)
        if not (name == "base_learning_rate" and args.learning_rate is not None) and not any(
            math.isclose(value, point, rel_tol=1e-9) for point in grid
        ):
            misses.append(f"--{name} {value:g} is not in {{{', '.join(f'{point:g}' for point in grid)}}}")
    return misses
