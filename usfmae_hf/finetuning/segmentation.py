"""Fine-tune a USF-MAE segmentation model (DPT) with the Trainer, evaluate at each image's size, report, push.

``training/finetune_segmentation.py`` parses :class:`SegmentationModelArguments`,
:class:`SegmentationDataArguments` and ``TrainingArguments`` with ``HfArgumentParser`` and calls
:func:`run_segmentation`. The recipe presets, layer-wise lr decay (:class:`UsfmaeTrainer`), card
writing and push are the classification ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from transformers import TrainingArguments

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.finetuning.checks import prepare_output_dir
from usfmae_hf.finetuning.outputs import dataset_label, push_output, write_card, write_training_arguments
from usfmae_hf.finetuning.parameter_efficient import PeftArguments, export_merged_model, prepare_model
from usfmae_hf.finetuning.recipe import (
    SEGMENTATION_MAE_PRESET,
    UsfmaeTrainer,
    apply_training_preset,
    balanced_class_weights,
    resolve_options,
)
from usfmae_hf.finetuning.segmentation_loss import LOSSES, SegmentationLoss
from usfmae_hf.finetuning.summary import StartSummary, print_end_summary

logger = logging.getLogger(__name__)

PROG = "finetune_segmentation"
RECIPES = ("none", "mae")
AUGMENTS = ("usfmae", "mae", "none")
EVAL_SPLITS = ("validation", "test")


@dataclass
class SegmentationModelArguments:
    """Model, loss and recipe options (``None`` means: the ``--recipe`` preset's value, else the default)."""

    model_name_or_path: str = field(
        metadata={
            "help": "Converted USF-MAE directory (vit_mae or vit format, see `usfmae convert`), or a segmentation "
            "model saved by an earlier run."
        }
    )
    recipe: str = field(
        default="none",
        metadata={
            "help": "Preset filling every option left unset: 'mae' = the MAE paper's segmentation recipe (learning "
            "rate 1e-4 at batch 16, layer decay 0.65, weight decay 0.05, warmup over 0.01 of the steps, mae "
            "augmentation).",
            "choices": list(RECIPES),
        },
    )
    augment: str | None = field(
        default=None,
        metadata={
            "help": "Training augmentation, applied to image and mask together (masks always nearest-neighbour): "
            "usfmae (resize, rotation 0-90, flips, RandomResizedCrop 0.5-2.0), mae (RandomResizedCrop 0.2-1 + "
            "flip) or none. Use none for orientation-sensitive structures. Unset: the preset's, else usfmae.",
            "choices": list(AUGMENTS),
        },
    )
    blr: float | None = field(
        default=None,
        metadata={"help": "Base learning rate: learning_rate = blr * effective batch / 256 (overrides it)."},
    )
    layer_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise lr decay of the encoder (1 = off); the DPT decoder trains at the full rate."},
    )
    loss: str = field(
        default="dice_ce",
        metadata={"help": "ce: pixel cross-entropy; dice_ce: cross-entropy + soft Dice.", "choices": list(LOSSES)},
    )
    dice_weight: float = field(default=1.0, metadata={"help": "Weight of the Dice term of --loss dice_ce."})
    class_weighted_loss: bool = field(
        default=False,
        metadata={"help": "Weight the cross-entropy by n / (n_classes * pixel count) of the training masks."},
    )
    decoder_dropout: float = field(
        default=0.1, metadata={"help": "Dropout before DPT's per-pixel classifier (DPT's default 0.1)."}
    )
    decoder_width: int = field(
        default=256, metadata={"help": "Channels of DPT's fusion stages (DPT-Base: 256; capped at the encoder width)."}
    )


@dataclass
class SegmentationDataArguments:
    """Where the images and masks come from (exactly one of train_dir, dataset_name, task)."""

    train_dir: str | None = field(
        default=None, metadata={"help": "Training folder holding images/ and masks/ with matching file names."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Validation folder (images/ + masks/)."})
    test_dir: str | None = field(default=None, metadata={"help": "Test folder (images/ + masks/)."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A `datasets` dataset (local path or cached Hub id) with image and mask columns."},
    )
    image_column: str = field(default="image", metadata={"help": "Image column of --dataset_name."})
    mask_column: str = field(default="mask", metadata={"help": "Mask column of --dataset_name (label ids)."})
    task: str | None = field(
        default=None,
        metadata={
            "help": "A dataset read by its adapter from --data_root: busbra_seg, busi_seg, mmotu2d_seg (binary), "
            "mmotu2d_seg8 (8 classes), hc18_seg."
        },
    )
    data_root: str | None = field(default=None, metadata={"help": "Folder where the --task dataset was unpacked."})
    fold: int | None = field(default=None, metadata={"help": "Cross-validation fold of --task (BUS-BRA 1..5)."})
    mask_label_names: str | None = field(
        default=None,
        metadata={
            "help": "Names of the mask label ids 0..K-1 for folders or datasets: comma-separated, or a text file "
            "(one per line) or JSON list. Default: background/lesion for 0/1 and 0/255 masks, else class_N."
        },
    )
    instance_metrics: bool | None = field(
        default=None,
        metadata={
            "help": "Also report COCO-style mask mAP over connected lesion instances (the USF-MAE paper's MMOTU-2D "
            "metric). Default: on for the mmotu2d tasks."
        },
    )
    num_overlays: int = field(
        default=8, metadata={"help": "Overlay PNGs (image | ground truth | prediction) written per evaluated split."}
    )
    card_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Dataset name in the model card (default: the task's, --dataset_name, or the folder name)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an --output_dir that holds a previous run: remove what a fine-tuning run writes "
            "there (other files stay). Without it such a folder is refused (or resume with "
            "--resume_from_checkpoint latest)."
        },
    )

    def source(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~usfmae_hf.evaluation.segmentation_data.load_segmentation_images`."""
        keys = ("train_dir", "validation_dir", "test_dir", "dataset_name", "image_column", "mask_column")
        source = {key: value for key, value in asdict(self).items() if key in keys + ("task", "data_root", "fold")}
        if self.mask_label_names is not None and "," in self.mask_label_names:
            source["label_names"] = [name.strip() for name in self.mask_label_names.split(",")]
        else:
            source["label_names"] = self.mask_label_names
        return source


def resolve_segmentation_recipe(
    model_args: SegmentationModelArguments, training_args: TrainingArguments
) -> dict[str, Any]:
    """Fill unset options from the preset; return the effective recipe (also applied to ``training_args``)."""
    preset = SEGMENTATION_MAE_PRESET if model_args.recipe == "mae" else {}
    options = resolve_options(model_args, {"augment": "usfmae", "blr": None, "layer_decay": 1.0}, preset)
    apply_training_preset(preset, training_args, options["blr"])
    options.update(
        loss=model_args.loss,
        dice_weight=model_args.dice_weight if model_args.loss == "dice_ce" else None,
        class_weighted_loss=model_args.class_weighted_loss,
        learning_rate=training_args.learning_rate,
        weight_decay=training_args.weight_decay,
        decoder="dpt",
        decoder_width=model_args.decoder_width,
        decoder_dropout=model_args.decoder_dropout,
    )
    return options


def mask_pixel_counts(masks, num_labels: int) -> np.ndarray:
    """Pixels per label id over ``masks`` (PIL images or arrays of label ids)."""
    counts = np.zeros(num_labels, dtype=np.int64)
    for mask in masks:
        counts += np.bincount(np.asarray(mask).ravel(), minlength=num_labels)[:num_labels]
    return counts


def preprocess_logits(logits, labels):
    """``preprocess_logits_for_metrics``: keep only the arg-max at the label size (not the whole logit maps)."""
    import torch.nn.functional as F

    if isinstance(logits, tuple):
        logits = logits[0]
    resized = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return resized.argmax(dim=1).to(labels.dtype)


def eval_metrics(eval_prediction) -> dict[str, float]:
    """``compute_metrics`` during training: mean foreground Dice and IoU at the model's input size."""
    from usfmae_hf.evaluation.segmentation_metrics import score_images, summarise

    predictions = np.asarray(eval_prediction.predictions)
    references = np.asarray(eval_prediction.label_ids)
    num_labels = int(max(predictions.max(), references.max())) + 1
    num_labels = max(num_labels, 2)
    summary = summarise(score_images(list(predictions), list(references), num_labels))
    return {"dice": summary["dice_mean"], "iou": summary["iou_mean"]}


def run_segmentation(
    model_args: SegmentationModelArguments,
    data_args: SegmentationDataArguments,
    training_args: TrainingArguments,
    peft_args: PeftArguments | None = None,
) -> dict[str, Any]:
    """Train, then evaluate on validation and test at each image's own size and write the outputs.

    Writes into ``training_args.output_dir``: the model (a stock ``DPTForSemanticSegmentation``) and its
    processor, ``all_results.json``, ``{split}_per_image_metrics.csv``, ``{split}_overlays/*.png`` and a
    model card whose ``model-index`` holds these results. With ``--push_to_hub`` the directory is
    uploaded once at the end. ``peft_args`` (``--peft lora``, ``--freeze_backbone``, ``--freeze_layers``) work as
    in classification; with LoRA the DPT neck and head train fully. Returns the flat results dict.
    """
    from transformers import set_seed

    from usfmae_hf.evaluation.segmentation_data import SEGMENTATION_TASKS, load_segmentation_images
    from usfmae_hf.finetuning.data import with_segmentation_transforms
    from usfmae_hf.finetuning.segmenter import build_segmenter
    from usfmae_hf.image.processor import build_segmentation_processor

    set_seed(training_args.seed)
    peft_args = peft_args or PeftArguments()
    recipe = resolve_segmentation_recipe(model_args, training_args)
    recipe.update(peft_args.options())
    prepare_output_dir(training_args, overwrite=data_args.overwrite_output_dir)
    dataset = load_segmentation_images(**data_args.source())
    label_names = list(dataset["train"].features["classes"].feature.names)
    if training_args.eval_strategy != "no" and "validation" not in dataset:
        raise UsfmaeError(
            f"--eval_strategy {training_args.eval_strategy} needs a validation split (e.g. --validation_dir)"
        )
    model = build_segmenter(
        model_args.model_name_or_path,
        label_names,
        fusion_hidden_size=model_args.decoder_width,
        classifier_dropout=model_args.decoder_dropout,
    )
    model = prepare_model(model, peft_args, base_model_name_or_path=model_args.model_name_or_path)
    image_size = model.config.image_size
    processor = build_segmentation_processor(image_size)
    augment = None if recipe["augment"] == "none" else recipe["augment"]
    processed = with_segmentation_transforms(dataset, image_size=image_size, augment=augment)

    push, training_args.push_to_hub = training_args.push_to_hub, False
    training_args.remove_unused_columns = False  # the transforms read the raw image and mask columns
    class_weights = None
    if recipe["class_weighted_loss"]:
        counts = mask_pixel_counts(dataset["train"]["mask"], len(label_names))
        class_weights = balanced_class_weights(None, len(label_names), counts=counts)
    trainer = UsfmaeTrainer(
        model=model,
        args=training_args,
        train_dataset=processed["train"],
        eval_dataset=processed.get("validation"),
        processing_class=processor,
        compute_metrics=eval_metrics,
        preprocess_logits_for_metrics=preprocess_logits,
        compute_loss_func=SegmentationLoss(
            recipe["loss"], class_weights=class_weights, dice_weight=model_args.dice_weight
        ),
        layer_decay=recipe["layer_decay"],
        callbacks=[StartSummary(PROG, recipe, {split: len(rows) for split, rows in dataset.items()})],
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()

    results = dict(train_result.metrics)
    if trainer.is_world_process_zero():
        instances = data_args.instance_metrics
        if instances is None:
            instances = bool(data_args.task and data_args.task.startswith("mmotu"))
        reports = _evaluate_splits(trainer.model, processor, dataset, label_names, data_args, training_args, instances)
        from usfmae_hf.evaluation.reporting import write_results
        from usfmae_hf.evaluation.segmentation_reporting import (
            SEGMENTATION_CARD_METRICS,
            flat_segmentation_results,
            segmentation_card_results,
        )

        for split, report in reports.items():
            results.update(flat_segmentation_results(split, report))
        results.update(recipe=recipe, world_size=training_args.world_size, label_names=label_names)
        write_results(training_args.output_dir, results)
        write_training_arguments(training_args)
        export_merged_model(trainer, peft_args)
        task_name = SEGMENTATION_TASKS[data_args.task][2] if data_args.task else None
        write_card(
            "segmenter",
            trainer.model,
            model_name_or_path=model_args.model_name_or_path,
            recipe=recipe,
            results=segmentation_card_results(
                reports,
                dataset_label(
                    card_dataset_name=data_args.card_dataset_name,
                    task_name=task_name,
                    dataset_name=data_args.dataset_name,
                    train_dir=data_args.train_dir,
                ),
            ),
            training_args=training_args,
            state=trainer.state,
            evaluation_notes="Metrics computed after training on each split at every image's own size (logits "
            "resized bilinearly, masks as stored), with the packaged `ultrasound_segmentation` metric: mean "
            "foreground Dice and IoU over images, HD95 from surface distances (scipy).",
        )
        if push:
            push_output(training_args)
        print_end_summary(
            PROG,
            results,
            metrics=SEGMENTATION_CARD_METRICS,
            splits=list(reports),
            steps=trainer.state.global_step,
            output_dir=training_args.output_dir,
            pushed_to=training_args.hub_model_id if push else None,
        )
    trainer.accelerator.wait_for_everyone()
    return results


def _evaluate_splits(
    model,
    processor,
    dataset,
    label_names: Sequence[str],
    data_args: SegmentationDataArguments,
    training_args: TrainingArguments,
    instances: bool,
) -> dict[str, dict[str, Any]]:
    """Predict every validation/test image at its own size (this process only) and score the splits."""
    from usfmae_hf.evaluation.segmentation_reporting import evaluate_segmentation_split
    from usfmae_hf.inference.segmentation import predict_masks

    model.eval()
    reports = {}
    for split in EVAL_SPLITS:
        if split not in dataset:
            continue
        rows = dataset[split]
        images = rows["image"]
        predictions = list(
            predict_masks(model, images, batch_size=training_args.per_device_eval_batch_size, processor=processor)
        )
        spacings = rows["pixel_spacing"] if "pixel_spacing" in rows.column_names else None
        if spacings is not None:
            spacings = [None if value is None else (float(value), float(value)) for value in spacings]
        reports[split] = evaluate_segmentation_split(
            training_args.output_dir,
            split,
            predictions=predictions,
            references=[np.asarray(mask) for mask in rows["mask"]],
            ids=rows["id"],
            label_names=label_names,
            pixel_spacings=spacings,
            instances=instances,
            overlay_images=images[: data_args.num_overlays],
        )
    return reports


def main(
    argv: Sequence[str] | None = None,
    description: str = "Fine-tune USF-MAE for semantic segmentation of ultrasound images with the Trainer.",
) -> int:
    """Parse command-line flags (every ``TrainingArguments`` flag included) and fine-tune; expected
    failures print one line and return 2."""
    from usfmae_hf.launch import run_from_command_line

    return run_from_command_line(
        (SegmentationModelArguments, SegmentationDataArguments, TrainingArguments, PeftArguments),
        run_segmentation,
        prog=PROG,
        description=description,
        argv=argv,
    )
