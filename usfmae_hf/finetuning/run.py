"""Fine-tune a USF-MAE classifier with the Trainer, evaluate every split, write reports, optionally push.

``training/finetune_classification.py`` parses :class:`ModelArguments`, :class:`DataArguments` and
``TrainingArguments`` with ``HfArgumentParser`` and calls :func:`run_finetuning`; the run itself is the
one every task shares (:func:`usfmae_hf.finetuning.flow.run_task`), with the pieces of
:class:`ClassificationTask`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import TrainingArguments

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.evaluation import labelled
from usfmae_hf.evaluation.reporting import CARD_METRICS, evaluate_split, flatten_results
from usfmae_hf.finetuning.arguments import CommonDataArguments, CommonModelArguments, option, task_help
from usfmae_hf.finetuning.checks import check_class_folders
from usfmae_hf.finetuning.data import with_transforms
from usfmae_hf.finetuning.flow import FineTuningTask, Reports, entry_point, run_task
from usfmae_hf.finetuning.heads import HEADS, build_classifier
from usfmae_hf.finetuning.parameter_efficient import PeftArguments
from usfmae_hf.finetuning.recipe import (
    MAE_PRESET,
    ClassificationCollator,
    ClassificationLoss,
    MaeSchedule,
    apply_training_preset,
    resolve_lr_schedule,
    resolve_options,
)

logger = logging.getLogger(__name__)

PROG = "finetune_classification"
AUGMENTS = ("usfmae", "mae", "mae_finetune", "none")


@task_help(
    choices={"augment": AUGMENTS},
    recipe="Preset filling every option left unset: 'mae' = original MAE fine-tuning, main_finetune.py (mean head, "
    "blr 5e-4, layer decay 0.65, drop-path 0.1, label smoothing 0.1, mixup 0.8, cutmix 1.0, weight decay 0.05, "
    "per-step warmup over 5 epochs then cosine to 1e-6, mae_finetune augmentation).",
    augment="Training augmentation: usfmae (resize, rotation 0-90, flips, RandomResizedCrop 0.5-2.0), mae (MAE "
    "pretraining's RandomResizedCrop 0.2-1 bicubic + flip), mae_finetune (MAE fine-tuning's, timm: "
    "RandomResizedCrop 0.08-1 bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) or none. Unset: "
    "the --recipe preset's (mae_finetune for 'mae'), else usfmae. Evaluation always uses USF-MAE's square resize, "
    "the saved processor's transform.",
    blr="Base learning rate: sets learning_rate = blr * effective batch / 256 (overrides --learning_rate).",
    layer_decay="Layer-wise lr decay factor (1 = off); block i gets lr * decay**(depth_max - i).",
    class_weighted_loss="Weight the cross-entropy by n / (n_classes * class count) of the training split.",
)
@dataclass
class ModelArguments(CommonModelArguments):
    """Model and recipe options (``None`` means: the ``--recipe`` preset's value, else off)."""

    head: str | None = option(
        "cls: stock ViTForImageClassification on the CLS token; mean: MAE recipe (mean of patch tokens -> fc_norm -> "
        "linear, saved with its code). Default: cls, or the preset's.",
        choices=HEADS,
    )
    warmup_epochs: float | None = option(
        "MAE's schedule: linear warmup over this many epochs, set every step at the fractional epoch, then a "
        "half-cycle cosine to --min_lr (replaces --lr_scheduler_type / --warmup_steps). Preset 'mae': 5."
    )
    min_lr: float | None = option(
        "End of MAE's cosine (scaled by layer decay like every group's lr); giving it alone selects MAE's schedule "
        "with 5 warmup epochs. Preset 'mae': 1e-6."
    )
    drop_path: float | None = option("Maximum stochastic-depth rate (mean head only), linear over blocks.")
    label_smoothing: float | None = option("Label smoothing of the cross-entropy (same as --label_smoothing_factor).")
    mixup: float | None = option("MixUp alpha for training batches (0 = off).")
    cutmix: float | None = option("CutMix alpha for training batches (0 = off); with mixup, one is drawn per batch.")


@task_help(
    choices={"task": labelled.TASKS},
    train_dir="Class-per-folder training images (<dir>/<class>/<image>).",
    validation_dir="Class-per-folder validation images.",
    test_dir="Class-per-folder test images.",
    dataset_name="A `datasets` dataset (local path or cached Hub id) with train and optional validation/test splits.",
    task="Held-out USF-MAE evaluation set read by its adapter.",
    fold="Cross-validation fold of --task (BUS-BRA 1..5, GIST514-DB 0..4).",
    card_dataset_name="Dataset name in the model card's results (default: the task's name, --dataset_name, or the "
    "folder holding --train_dir).",
    overwrite_output_dir="Start over in an --output_dir holding a previous run: its outputs (model, card, results, "
    "per-split files, checkpoint-N, merged/) are removed first; other files stay. Without it such a folder is "
    "refused unless --resume_from_checkpoint is given.",
)
@dataclass
class DataArguments(CommonDataArguments):
    """Where the labelled images come from (exactly one of train_dir, dataset_name, task)."""

    label_column: str = option("ClassLabel column of --dataset_name.", "label")
    skip_unreadable: bool = option("Drop undecodable images with a warning instead of stopping with an error.", False)

    def source(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~usfmae_hf.evaluation.labelled.load_labelled_images`."""
        return {**super().source(), "label_column": self.label_column}

    def check_sources(self) -> None:
        """Every class folder of the given ``--*_dir`` holds images (see :func:`check_class_folders`)."""
        check_class_folders({"train": self.train_dir, "validation": self.validation_dir, "test": self.test_dir})


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


class ClassificationTask(FineTuningTask):
    """Image classification: class-per-folder images, a ``datasets`` dataset or a ``--task``; ``cls`` or ``mean``
    head; MAE's collator (mixup / cutmix), loss (smoothing, class weights) and schedule."""

    prog = PROG
    model_arguments = ModelArguments
    data_arguments = DataArguments
    resolve_recipe = staticmethod(resolve_recipe)

    def load_data(self) -> tuple[Any, list[str]]:
        dataset = labelled.load_labelled_images(**self.data_args.source())
        dataset = labelled.drop_unreadable(
            dataset, skip=self.data_args.skip_unreadable, progress=not self.training_args.disable_tqdm
        )
        return dataset, labelled.check_labels(dataset)

    def build_model(self, label_names: Sequence[str], recipe: Mapping[str, Any]):
        return build_classifier(
            self.model_args.model_name_or_path, label_names, head=recipe["head"], drop_path_rate=recipe["drop_path"]
        )

    with_transforms = staticmethod(with_transforms)

    def image_processor(self, image_size: int):
        from usfmae_hf.image.processor import build_image_processor

        return build_image_processor(image_size)

    def class_counts(self, dataset, num_labels: int) -> np.ndarray:
        return np.bincount(np.asarray(dataset["train"]["label"]), minlength=num_labels)

    def trainer_options(self, model, label_names: Sequence[str], recipe: Mapping[str, Any], class_weights) -> dict:
        from usfmae_hf.evaluation.metrics import compute_metrics

        return {
            "data_collator": ClassificationCollator(len(label_names), mixup=recipe["mixup"], cutmix=recipe["cutmix"]),
            "compute_metrics": compute_metrics,
            "compute_loss_func": ClassificationLoss(
                label_smoothing=recipe["label_smoothing"], class_weights=class_weights
            ),
            "lr_schedule": lr_schedule_of(recipe),
        }

    def evaluate(self, trainer, dataset, processed, label_names: Sequence[str]) -> Reports:
        from usfmae_hf.evaluation.metrics import softmax

        reports = {}
        for split in labelled.EVAL_SPLITS:
            if split in processed:
                # predict() is collective under torchrun: every rank runs it, rank 0 writes.
                output = trainer.predict(processed[split], metric_key_prefix=split)
                if trainer.is_world_process_zero():
                    reports[split] = evaluate_split(
                        self.training_args.output_dir,
                        split,
                        probabilities=softmax(output.predictions),
                        labels=output.label_ids,
                        ids=dataset[split]["id"],
                        label_names=label_names,
                    )
        return reports

    flat_results = staticmethod(flatten_results)
    card_kind = "classifier"
    card_metrics = CARD_METRICS
    evaluation_notes = (
        "Metrics computed after training on each split with the packaged `ultrasound_classification` metric "
        "(scikit-learn)."
    )

    def task_name(self) -> str | None:
        return labelled.task_display_name(self.data_args.task) if self.data_args.task else None


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
    return run_task(ClassificationTask(model_args, data_args, training_args), peft_args)


main = entry_point(ClassificationTask, "Fine-tune USF-MAE on labelled ultrasound images with the Trainer.")
