"""Fine-tune a USF-MAE classifier with the Trainer, evaluate every split, write reports, optionally push.

``training/finetune_classification.py`` parses :class:`ModelArguments`, :class:`DataArguments` and
``TrainingArguments`` with ``HfArgumentParser`` and calls :func:`run_finetuning`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import TrainingArguments

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.evaluation.reporting import CARD_METRICS, card_results, evaluate_split, flatten_results, write_results
from usfmae_hf.finetuning.checks import check_class_folders, check_training_arguments, prepare_output_dir
from usfmae_hf.finetuning.data import (
    EVAL_SPLITS,
    TASKS,
    check_labels,
    drop_unreadable,
    load_labelled_images,
    task_display_name,
    with_transforms,
)
from usfmae_hf.finetuning.heads import HEADS, build_classifier
from usfmae_hf.finetuning.outputs import dataset_label, push_output, write_card, write_training_arguments
from usfmae_hf.finetuning.parameter_efficient import PeftArguments, export_merged_model, prepare_model
from usfmae_hf.finetuning.recipe import (
    MAE_PRESET,
    ClassificationCollator,
    ClassificationLoss,
    MaeSchedule,
    UsfmaeTrainer,
    apply_training_preset,
    balanced_class_weights,
    resolve_lr_schedule,
    resolve_options,
)
from usfmae_hf.finetuning.summary import StartSummary, print_end_summary

logger = logging.getLogger(__name__)

PROG = "finetune_classification"
RECIPES = ("none", "mae")
AUGMENTS = ("usfmae", "mae", "mae_finetune", "none")


@dataclass
class ModelArguments:
    """Model and recipe options (``None`` means: the ``--recipe`` preset's value, else off)."""

    model_name_or_path: str = field(
        metadata={"help": "Converted USF-MAE directory (vit_mae or vit format, see `usfmae convert`)."}
    )
    head: str | None = field(
        default=None,
        metadata={
            "help": "cls: stock ViTForImageClassification on the CLS token; mean: MAE recipe (mean of patch "
            "tokens -> fc_norm -> linear, saved with its code). Default: cls, or the preset's.",
            "choices": list(HEADS),
        },
    )
    recipe: str = field(
        default="none",
        metadata={
            "help": "Preset filling every option left unset: 'mae' = original MAE fine-tuning, main_finetune.py "
            "(mean head, blr 5e-4, layer decay 0.65, drop-path 0.1, label smoothing 0.1, mixup 0.8, cutmix 1.0, "
            "weight decay 0.05, per-step warmup over 5 epochs then cosine to 1e-6, mae_finetune augmentation).",
            "choices": list(RECIPES),
        },
    )
    augment: str | None = field(
        default=None,
        metadata={
            "help": "Training augmentation: usfmae (resize, rotation 0-90, flips, RandomResizedCrop 0.5-2.0), "
            "mae (MAE pretraining's RandomResizedCrop 0.2-1 bicubic + flip), mae_finetune (MAE fine-tuning's, "
            "timm: RandomResizedCrop 0.08-1 bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) "
            "or none. Unset: the --recipe preset's (mae_finetune for 'mae'), else usfmae. Evaluation always uses "
            "USF-MAE's square resize, the saved processor's transform.",
            "choices": list(AUGMENTS),
        },
    )
    blr: float | None = field(
        default=None,
        metadata={
            "help": "Base learning rate: sets learning_rate = blr * effective batch / 256 (overrides --learning_rate)."
        },
    )
    warmup_epochs: float | None = field(
        default=None,
        metadata={
            "help": "MAE's schedule: linear warmup over this many epochs, set every step at the fractional epoch, "
            "then a half-cycle cosine to --min_lr (replaces --lr_scheduler_type / --warmup_steps). Preset "
            "'mae': 5."
        },
    )
    min_lr: float | None = field(
        default=None,
        metadata={
            "help": "End of MAE's cosine (scaled by layer decay like every group's lr); giving it alone selects "
            "MAE's schedule with 5 warmup epochs. Preset 'mae': 1e-6."
        },
    )
    layer_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise lr decay factor (1 = off); block i gets lr * decay**(depth_max - i)."},
    )
    drop_path: float | None = field(
        default=None, metadata={"help": "Maximum stochastic-depth rate (mean head only), linear over blocks."}
    )
    label_smoothing: float | None = field(
        default=None, metadata={"help": "Label smoothing of the cross-entropy (same as --label_smoothing_factor)."}
    )
    mixup: float | None = field(default=None, metadata={"help": "MixUp alpha for training batches (0 = off)."})
    cutmix: float | None = field(
        default=None,
        metadata={"help": "CutMix alpha for training batches (0 = off); with mixup, one is drawn per batch."},
    )
    class_weighted_loss: bool = field(
        default=False,
        metadata={"help": "Weight the cross-entropy by n / (n_classes * class count) of the training split."},
    )


@dataclass
class DataArguments:
    """Where the labelled images come from (exactly one of train_dir, dataset_name, task)."""

    train_dir: str | None = field(
        default=None, metadata={"help": "Class-per-folder training images (<dir>/<class>/<image>)."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Class-per-folder validation images."})
    test_dir: str | None = field(default=None, metadata={"help": "Class-per-folder test images."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A `datasets` dataset (local path or cached Hub id) with train and optional validation/test splits."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Image column of --dataset_name."})
    label_column: str = field(default="label", metadata={"help": "ClassLabel column of --dataset_name."})
    task: str | None = field(
        default=None,
        metadata={
            "help": "Held-out USF-MAE evaluation set read by its adapter.",
            "choices": list(TASKS),
        },
    )
    data_root: str | None = field(default=None, metadata={"help": "Folder where the --task dataset was unpacked."})
    fold: int | None = field(
        default=None, metadata={"help": "Cross-validation fold of --task (BUS-BRA 1..5, GIST514-DB 0..4)."}
    )
    skip_unreadable: bool = field(
        default=False, metadata={"help": "Drop undecodable images with a warning instead of stopping with an error."}
    )
    card_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset name in the model card's results (default: the task's name, --dataset_name, or "
            "the folder holding --train_dir)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an --output_dir holding a previous run: its outputs (model, card, results, "
            "per-split files, checkpoint-N, merged/) are removed first; other files stay. Without it such a folder "
            "is refused unless --resume_from_checkpoint is given."
        },
    )

    def source(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~usfmae_hf.finetuning.data.load_labelled_images`."""
        run_options = ("skip_unreadable", "card_dataset_name", "overwrite_output_dir")
        return {key: value for key, value in asdict(self).items() if key not in run_options}


def resolve_recipe(model_args: ModelArguments, training_args: TrainingArguments) -> dict[str, Any]:
    """Fill unset options from the preset; return the effective recipe (also applied to ``training_args``).

    ``recipe["lr_schedule"]`` is "mae" (then ``warmup_epochs`` and ``min_lr`` are set, see
    :func:`lr_schedule_of`) or the Trainer's ``lr_scheduler_type``.
    """
    preset = MAE_PRESET if model_args.recipe == "mae" else {}
    schedule = resolve_lr_schedule(
        {"warmup_epochs": model_args.warmup_epochs, "min_lr": model_args.min_lr}, preset, training_args
    )
    options = resolve_options(
        model_args,
        {
            "head": "cls",
            "augment": "usfmae",
            "blr": None,
            "layer_decay": 1.0,
            "drop_path": 0.0,
            "label_smoothing": 0.0,
            "mixup": 0.0,
            "cutmix": 0.0,
        },
        preset,
    )
    if training_args.label_smoothing_factor:
        if (
            model_args.label_smoothing is not None
            and model_args.label_smoothing != training_args.label_smoothing_factor
        ):
            raise UsfmaeError("--label_smoothing and --label_smoothing_factor disagree; give one")
        options["label_smoothing"] = training_args.label_smoothing_factor
    apply_training_preset(preset, training_args, options["blr"])
    options.update(
        learning_rate=training_args.learning_rate,
        weight_decay=training_args.weight_decay,
        lr_schedule="mae" if schedule else str(training_args.lr_scheduler_type.value),
        warmup_epochs=schedule.warmup_epochs if schedule else None,
        min_lr=schedule.min_lr if schedule else None,
        class_weighted_loss=model_args.class_weighted_loss,
    )
    return options


def lr_schedule_of(recipe: dict[str, Any]) -> MaeSchedule | None:
    """The :class:`MaeSchedule` of a resolved recipe, None for the Trainer's own scheduler."""
    if recipe["lr_schedule"] != "mae":
        return None
    return MaeSchedule(warmup_epochs=recipe["warmup_epochs"], min_lr=recipe["min_lr"])


def run_finetuning(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    peft_args: PeftArguments | None = None,
) -> dict[str, Any]:
    """Train, then evaluate on validation and test (whatever ``eval_strategy`` says) and write the outputs.

    Writes into ``training_args.output_dir``: the model (+ processor and, for the mean head, its code),
    ``all_results.json``, ``{split}_predictions.csv``, ``{split}_confusion_matrix.png``,
    ``{split}_roc.png`` and a model card whose ``model-index`` holds these results. With
    ``--push_to_hub`` the directory is uploaded once at the end (not at every checkpoint). With
    ``--peft lora`` the model saved is a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
    head included), plus the merged plain model in ``merged/`` with ``--export_merged``.
    Returns the flat results dict.
    """
    from transformers import set_seed

    from usfmae_hf.evaluation.metrics import compute_metrics, softmax
    from usfmae_hf.image.processor import build_image_processor

    set_seed(training_args.seed)
    check_training_arguments(training_args)
    peft_args = peft_args or PeftArguments()
    recipe = resolve_recipe(model_args, training_args)
    recipe.update(peft_args.options())
    check_class_folders(
        {"train": data_args.train_dir, "validation": data_args.validation_dir, "test": data_args.test_dir}
    )
    removed = prepare_output_dir(training_args, overwrite=data_args.overwrite_output_dir)
    if removed:
        print(f"{PROG}: removed the previous run's {', '.join(removed)} from {training_args.output_dir}")
    dataset = drop_unreadable(load_labelled_images(**data_args.source()), skip=data_args.skip_unreadable)
    label_names = check_labels(dataset)
    if training_args.eval_strategy != "no" and "validation" not in dataset:
        raise UsfmaeError(
            f"--eval_strategy {training_args.eval_strategy} needs a validation split (e.g. --validation_dir)"
        )
    model = build_classifier(
        model_args.model_name_or_path, label_names, head=recipe["head"], drop_path_rate=recipe["drop_path"]
    )
    model = prepare_model(model, peft_args, base_model_name_or_path=model_args.model_name_or_path)
    image_size = model.config.image_size
    processed = with_transforms(
        dataset, image_size=image_size, augment=None if recipe["augment"] == "none" else recipe["augment"]
    )

    push, training_args.push_to_hub = training_args.push_to_hub, False
    training_args.remove_unused_columns = False  # the transforms read the raw "image" column
    class_weights = (
        balanced_class_weights(dataset["train"]["label"], len(label_names)) if recipe["class_weighted_loss"] else None
    )
    trainer = UsfmaeTrainer(
        model=model,
        args=training_args,
        train_dataset=processed["train"],
        eval_dataset=processed.get("validation"),
        data_collator=ClassificationCollator(len(label_names), mixup=recipe["mixup"], cutmix=recipe["cutmix"]),
        processing_class=build_image_processor(image_size),
        compute_metrics=compute_metrics,
        compute_loss_func=ClassificationLoss(label_smoothing=recipe["label_smoothing"], class_weights=class_weights),
        layer_decay=recipe["layer_decay"],
        lr_schedule=lr_schedule_of(recipe),
        callbacks=[StartSummary(PROG, recipe, {split: len(rows) for split, rows in dataset.items()})],
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()

    results = dict(train_result.metrics)
    reports = {}
    for split in EVAL_SPLITS:
        if split in processed:
            # predict() is collective under torchrun: every rank runs it, rank 0 writes.
            output = trainer.predict(processed[split], metric_key_prefix=split)
            if trainer.is_world_process_zero():
                reports[split] = evaluate_split(
                    training_args.output_dir,
                    split,
                    probabilities=softmax(output.predictions),
                    labels=output.label_ids,
                    ids=dataset[split]["id"],
                    label_names=label_names,
                )
                results.update(flatten_results(split, reports[split]))
    if trainer.is_world_process_zero():
        results.update(recipe=recipe, world_size=training_args.world_size)
        write_results(training_args.output_dir, results)
        write_training_arguments(training_args)
        export_merged_model(trainer, peft_args)
        write_card(
            "classifier",
            trainer.model,
            model_name_or_path=model_args.model_name_or_path,
            recipe=recipe,
            results=card_results(reports, _dataset_label(data_args)),
            training_args=training_args,
            state=trainer.state,
            evaluation_notes="Metrics computed after training on each split with the packaged "
            "`ultrasound_classification` metric (scikit-learn).",
        )
        if push:
            push_output(training_args)
        print_end_summary(
            PROG,
            results,
            metrics=CARD_METRICS,
            splits=list(reports),
            steps=trainer.state.global_step,
            output_dir=training_args.output_dir,
            pushed_to=training_args.hub_model_id if push else None,
        )
    return results


def _dataset_label(data_args: DataArguments) -> str:
    return dataset_label(
        card_dataset_name=data_args.card_dataset_name,
        task_name=task_display_name(data_args.task) if data_args.task else None,
        dataset_name=data_args.dataset_name,
        train_dir=data_args.train_dir,
    )


def main(
    argv: Sequence[str] | None = None,
    description: str = "Fine-tune USF-MAE on labelled ultrasound images with the Trainer.",
) -> int:
    """Parse command-line flags (every ``TrainingArguments`` flag included) and fine-tune; expected
    failures print one line and return 2."""
    from usfmae_hf.launch import run_from_command_line

    return run_from_command_line(
        (ModelArguments, DataArguments, TrainingArguments, PeftArguments),
        run_finetuning,
        prog=PROG,
        description=description,
        argv=argv,
    )
