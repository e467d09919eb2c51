"""Command-line arguments of MAE pretraining (``HfArgumentParser`` dataclasses) and the two recipes.

Every recipe-governed field defaults to ``None`` and is filled from the chosen ``--recipe`` by
:func:`apply_recipe`, so any single value can be overridden on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from usfmae_hf.errors import UsfmaeError

# The two published recipes. USF-MAE: AdamW with torch's default betas, 10% warmup, cosine to 1e-5,
# grad-clip 1.0, bf16, 100 epochs, pixel loss without per-patch normalisation, USF-MAE's augmentations.
# MAE: betas (0.9, 0.95), 40 of 800 epochs warmup, cosine to 0, no clipping, fp16 AMP, norm_pix_loss, crop+flip.
# A recipe's precision is used where the hardware is fast at it, else the ``auto`` choice (environment.py).
RECIPES: dict[str, dict[str, Any]] = {
    "usfmae": dict(
        augmentation="usfmae",
        base_learning_rate=1.5e-4,
        adam_beta1=0.9,
        adam_beta2=0.999,
        weight_decay=0.05,
        warmup_ratio=0.1,
        min_lr=1e-5,
        max_grad_norm=1.0,
        mixed_precision="bf16",
        num_train_epochs=100.0,
        mask_ratio=0.75,
        norm_pix_loss=False,
    ),
    "mae": dict(
        augmentation="mae",
        base_learning_rate=1.5e-4,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.05,
        warmup_ratio=0.05,
        min_lr=0.0,
        max_grad_norm=0.0,
        mixed_precision="fp16",
        num_train_epochs=800.0,
        mask_ratio=0.75,
        norm_pix_loss=True,
    ),
}


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
            "help": "Preset for every field marked 'recipe': usfmae (AdamW with torch's default betas, 10%% warmup, "
            "cosine to 1e-5, grad-clip 1.0, bf16, 100 epochs) or mae (betas 0.9/0.95, 5%% warmup, cosine to 0, "
            "no clipping, fp16, 800 epochs, norm_pix_loss)."
        },
    )
    augmentation: Literal["usfmae", "mae"] | None = field(
        default=None, metadata={"help": "Augmentation pipeline (recipe: same name as the recipe)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of weights init, data order, augmentations and masks."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per process per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps to train (overrides epochs)."})
    num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs to train (recipe: 100 / 800)."})
    base_learning_rate: float | None = field(
        default=None, metadata={"help": "blr; lr = blr x effective batch / 256 (recipe: 1.5e-4)."}
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "Absolute peak learning rate; overrides --base_learning_rate scaling."}
    )
    min_lr: float | None = field(default=None, metadata={"help": "Final lr of the cosine decay (recipe: 1e-5 / 0)."})
    warmup_steps: int | None = field(default=None, metadata={"help": "Linear warmup steps (overrides --warmup_ratio)."})
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Warmup as a fraction of all steps (recipe: 0.1 / 0.05)."}
    )
    weight_decay: float | None = field(
        default=None, metadata={"help": "AdamW weight decay; never on biases, norms, positions, tokens (recipe: 0.05)."}
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
    for name in ("max_steps", "checkpointing_steps", "save_total_limit", "reconstruction_steps"):
        value = getattr(training_args, name)
        if value is not None and value < 1:
            raise UsfmaeError(f"--{name} must be >= 1")
