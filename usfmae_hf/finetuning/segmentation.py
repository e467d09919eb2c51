"""Fine-tune a USF-MAE segmentation model (DPT) with the Trainer, evaluate at each image's size, report, push.

``training/finetune_segmentation.py`` parses :class:`SegmentationModelArguments`,
:class:`SegmentationDataArguments` and ``TrainingArguments`` with ``HfArgumentParser`` and calls
:func:`run_segmentation`: the run every task shares (:func:`usfmae_hf.finetuning.flow.run_task`: recipe
presets, layer-wise lr decay, card writing, push) with the pieces of :class:`SegmentationTask`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import TrainingArguments

from usfmae_hf.evaluation.segmentation_data import SEGMENTATION_TASKS, load_segmentation_images
from usfmae_hf.evaluation.segmentation_reporting import SEGMENTATION_CARD_METRICS, flat_segmentation_results
from usfmae_hf.finetuning.arguments import CommonDataArguments, CommonModelArguments, option, task_help
from usfmae_hf.finetuning.data import EVAL_SPLITS, with_segmentation_transforms
from usfmae_hf.finetuning.flow import FineTuningTask, Reports, entry_point, run_task
from usfmae_hf.finetuning.parameter_efficient import PeftArguments
from usfmae_hf.finetuning.recipe import SEGMENTATION_MAE_PRESET, apply_training_preset, resolve_options
from usfmae_hf.finetuning.segmentation_loss import LOSSES, SegmentationLoss

logger = logging.getLogger(__name__)

PROG = "finetune_segmentation"
AUGMENTS = ("usfmae", "mae", "none")


@task_help(
    choices={"augment": AUGMENTS},
    model_name_or_path="Converted USF-MAE directory (vit_mae or vit format, see `usfmae convert`), or a segmentation "
    "model saved by an earlier run.",
    recipe="Preset filling every option left unset: 'mae' = the MAE paper's segmentation recipe (learning rate 1e-4 "
    "at batch 16, layer decay 0.65, weight decay 0.05, warmup over 0.01 of the steps, mae augmentation).",
    augment="Training augmentation, applied to image and mask together (masks always nearest-neighbour): usfmae "
    "(resize, rotation 0-90, flips, RandomResizedCrop 0.5-2.0), mae (RandomResizedCrop 0.2-1 + flip) or none. Use "
    "none for orientation-sensitive structures. Unset: the preset's, else usfmae.",
    layer_decay="Layer-wise lr decay of the encoder (1 = off); the DPT decoder trains at the full rate.",
    class_weighted_loss="Weight the cross-entropy by n / (n_classes * pixel count) of the training masks.",
)
@dataclass
class SegmentationModelArguments(CommonModelArguments):
    """Model, loss and recipe options (``None`` means: the ``--recipe`` preset's value, else the default)."""

    loss: str = option("ce: pixel cross-entropy; dice_ce: cross-entropy + soft Dice.", "dice_ce", choices=LOSSES)
    dice_weight: float = option("Weight of the Dice term of --loss dice_ce.", 1.0)
    decoder_dropout: float = option("Dropout before DPT's per-pixel classifier (DPT's default 0.1).", 0.1)
    decoder_width: int = option("Channels of DPT's fusion stages (DPT-Base: 256; capped at the encoder width).", 256)


@task_help(
    train_dir="Training folder holding images/ and masks/ with matching file names.",
    validation_dir="Validation folder (images/ + masks/).",
    test_dir="Test folder (images/ + masks/).",
    dataset_name="A `datasets` dataset (local path or cached Hub id) with image and mask columns.",
    task="A dataset read by its adapter from --data_root: busbra_seg, busi_seg, mmotu2d_seg (binary), mmotu2d_seg8 "
    "(8 classes), hc18_seg.",
    fold="Cross-validation fold of --task (BUS-BRA 1..5).",
    card_dataset_name="Dataset name in the model card (default: the task's, --dataset_name, or the folder name).",
    overwrite_output_dir="Start over in an --output_dir that holds a previous run: remove what a fine-tuning run "
    "writes there (other files stay). Without it such a folder is refused (or resume with --resume_from_checkpoint "
    "latest).",
)
@dataclass
class SegmentationDataArguments(CommonDataArguments):
    """Where the images and masks come from (exactly one of train_dir, dataset_name, task)."""

    mask_column: str = option("Mask column of --dataset_name (label ids).", "mask")
    mask_label_names: str | None = option(
        "Names of the mask label ids 0..K-1 for folders or datasets: comma-separated, or a text file (one per line) "
        "or JSON list. Default: background/lesion for 0/1 and 0/255 masks, else class_N."
    )
    instance_metrics: bool | None = option(
        "Also report COCO-style mask mAP over connected lesion instances (the USF-MAE paper's MMOTU-2D metric). "
        "Default: on for the mmotu2d tasks."
    )
    num_overlays: int = option("Overlay PNGs (image | ground truth | prediction) written per evaluated split.", 8)

    def source(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~usfmae_hf.evaluation.segmentation_data.load_segmentation_images`."""
        names = self.mask_label_names
        if names is not None and "," in names:
            names = [name.strip() for name in names.split(",")]
        return {**super().source(), "mask_column": self.mask_column, "label_names": names}


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


def eval_metrics(eval_prediction, *, num_labels: int) -> dict[str, float]:
    """``compute_metrics`` during training (bind ``num_labels``, the model's ``config.num_labels``): mean foreground
    Dice and IoU at the model's input size."""
    from usfmae_hf.evaluation.segmentation_metrics import score_images, summarise

    predictions = np.asarray(eval_prediction.predictions)
    references = np.asarray(eval_prediction.label_ids)
    summary = summarise(score_images(list(predictions), list(references), num_labels))
    return {"dice": summary["dice_mean"], "iou": summary["iou_mean"]}


class SegmentationTask(FineTuningTask):
    """Semantic segmentation: images with label masks; a stock DPT on the encoder; Dice + CE loss; evaluation at
    each image's own size, with overlays and optional instance mAP."""

    prog = PROG
    model_arguments = SegmentationModelArguments
    data_arguments = SegmentationDataArguments
    resolve_recipe = staticmethod(resolve_segmentation_recipe)

    def load_data(self) -> tuple[Any, list[str]]:
        dataset = load_segmentation_images(**self.data_args.source())
        return dataset, list(dataset["train"].features["classes"].feature.names)

    def build_model(self, label_names: Sequence[str], recipe: Mapping[str, Any]):
        from usfmae_hf.finetuning.segmenter import build_segmenter

        return build_segmenter(
            self.model_args.model_name_or_path,
            label_names,
            fusion_hidden_size=self.model_args.decoder_width,
            classifier_dropout=self.model_args.decoder_dropout,
        )

    with_transforms = staticmethod(with_segmentation_transforms)

    def image_processor(self, image_size: int):
        from usfmae_hf.image.processor import build_segmentation_processor

        return build_segmentation_processor(image_size)

    def class_counts(self, dataset, num_labels: int) -> np.ndarray:
        return mask_pixel_counts(dataset["train"]["mask"], num_labels)

    def trainer_options(self, model, label_names: Sequence[str], recipe: Mapping[str, Any], class_weights) -> dict:
        return {
            "compute_metrics": functools.partial(eval_metrics, num_labels=model.config.num_labels),
            "preprocess_logits_for_metrics": preprocess_logits,
            "compute_loss_func": SegmentationLoss(
                recipe["loss"], class_weights=class_weights, dice_weight=self.model_args.dice_weight
            ),
        }

    def evaluate(self, trainer, dataset, processed, label_names: Sequence[str]) -> Reports:
        """Predict every validation/test image at its own size (the main process only) and score the splits."""
        from usfmae_hf.evaluation.segmentation_reporting import evaluate_segmentation_split
        from usfmae_hf.inference.segmentation import predict_masks

        if not trainer.is_world_process_zero():
            return {}
        instances = self.data_args.instance_metrics
        if instances is None:
            instances = bool(self.data_args.task and self.data_args.task.startswith("mmotu"))
        model = trainer.model.eval()
        reports = {}
        for split in (split for split in EVAL_SPLITS if split in dataset):
            rows = dataset[split]
            images = rows["image"]
            batch_size = self.training_args.per_device_eval_batch_size
            predictions = list(predict_masks(model, images, batch_size=batch_size, processor=trainer.processing_class))
            spacings = rows["pixel_spacing"] if "pixel_spacing" in rows.column_names else None
            if spacings is not None:
                spacings = [None if value is None else (float(value), float(value)) for value in spacings]
            reports[split] = evaluate_segmentation_split(
                self.training_args.output_dir,
                split,
                predictions=predictions,
                references=[np.asarray(mask) for mask in rows["mask"]],
                ids=rows["id"],
                label_names=label_names,
                pixel_spacings=spacings,
                instances=instances,
                overlay_images=images[: self.data_args.num_overlays],
            )
        return reports

    flat_results = staticmethod(flat_segmentation_results)
    card_kind = "segmenter"
    card_metrics = SEGMENTATION_CARD_METRICS
    evaluation_notes = (
        "Metrics computed after training on each split at every image's own size (logits resized bilinearly, masks "
        "as stored), with the packaged `ultrasound_segmentation` metric: mean foreground Dice and IoU over images, "
        "HD95 from surface distances (scipy)."
    )

    def task_name(self) -> str | None:
        return SEGMENTATION_TASKS[self.data_args.task][2] if self.data_args.task else None

    def run_results(self, label_names: Sequence[str]) -> dict[str, Any]:
        return {"label_names": list(label_names)}


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
    return run_task(SegmentationTask(model_args, data_args, training_args), peft_args)


main = entry_point(
    SegmentationTask, "Fine-tune USF-MAE for semantic segmentation of ultrasound images with the Trainer."
)
