"""MAE fine-tuning recipe options, plugged into the Trainer through its extension points.

* layer-wise lr decay: :class:`UsfmaeTrainer` overrides ``create_optimizer``, and logs the largest
  group's lr (the head's) as ``learning_rate``, as MAE does;
* MAE's per-step schedule (linear warmup over epochs, half-cycle cosine to ``min_lr``):
  :class:`MaeSchedule`, built by :class:`UsfmaeTrainer`'s ``create_scheduler``;
* label smoothing, class weights, soft (mixup/cutmix) targets: :class:`ClassificationLoss`, a
  ``compute_loss_func``;
* mixup / cutmix: :class:`ClassificationCollator` with torchvision's ``v2.MixUp`` / ``v2.CutMix``;
* blr scaling: :func:`scaled_learning_rate`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import is_sagemaker_mp_enabled

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.finetuning.checks import check_training_arguments, resolve_resume_checkpoint
from usfmae_hf.model.parameters import is_no_decay

# Weight files of a whole model (not a peft adapter) that ``from_pretrained`` reads, sharded or not.
_WHOLE_MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Encoder block N: ``vit.layers.N.`` (ViT classifiers, current names) or ``dpt.encoder.layer.N.`` (DPT keeps
# the legacy names). Anchored on the encoder's prefix so that DPT's ``neck.*.layers.N`` is not taken for a block.
_LAYER_INDEX = re.compile(r"\.(?:vit|dpt)\.(?:layers|encoder\.layer)\.(\d+)\.")

# The original MAE fine-tuning recipe for ViT-B (Table 9 of He et al. 2022; ``main_finetune.py`` with the
# flags of its ViT-B command): AdamW at blr 5e-4 with layer decay 0.65, 5 warmup epochs then a cosine to 1e-6,
# updated every step; RandAugment + random erasing (timm), mixup 0.8 / cutmix 1.0 (switch 0.5), smoothing 0.1.
MAE_PRESET: Mapping[str, Any] = {
    "head": "mean",
    "blr": 5e-4,
    "layer_decay": 0.65,
    "drop_path": 0.1,
    "label_smoothing": 0.1,
    "mixup": 0.8,
    "cutmix": 1.0,
    "weight_decay": 0.05,
    "warmup_epochs": 5.0,
    "min_lr": 1e-6,
    "augment": "mae_finetune",
}

# ``main_finetune.py``'s own defaults, for the option not given when only one of the two is.
MAE_SCHEDULE_DEFAULTS: Mapping[str, float] = {"warmup_epochs": 5.0, "min_lr": 1e-6}


# The MAE paper's semantic-segmentation recipe for ViT-B (BEiT's ADE20K setup: AdamW lr 1e-4 at batch 16,
# layer decay 0.65, weight decay 0.05, 1500 warmup iterations of 160k), with MAE augmentation.
SEGMENTATION_MAE_PRESET: Mapping[str, Any] = {
    "learning_rate": 1e-4,
    "layer_decay": 0.65,
    "weight_decay": 0.05,
    "warmup_ratio": 0.01,
    "augment": "mae",
}


def resolve_options(arguments: Any, defaults: Mapping[str, Any], preset: Mapping[str, Any]) -> dict[str, Any]:
    """Each option of ``defaults``: its value in ``arguments`` if given (not None), else the preset's, else default."""
    options = {}
    for name, default in defaults.items():
        value = getattr(arguments, name)
        options[name] = value if value is not None else preset.get(name, default)
    return options


def apply_training_preset(preset: Mapping[str, Any], training_args: TrainingArguments, blr: float | None) -> None:
    """Set the preset's weight decay, warmup and learning rate where ``training_args`` keep their defaults
    (TrainingArguments have no "unset" state), and ``learning_rate = blr * effective batch / 256`` when ``blr``
    is given."""
    defaults = {item.name: item.default for item in dataclasses.fields(TrainingArguments)}
    if "weight_decay" in preset and training_args.weight_decay == defaults["weight_decay"]:
        training_args.weight_decay = preset["weight_decay"]
    if "warmup_ratio" in preset and training_args.warmup_steps == defaults["warmup_steps"]:
        training_args.warmup_steps = preset["warmup_ratio"]  # a float below 1 is a fraction of the steps
    if blr is not None:
        training_args.learning_rate = scaled_learning_rate(blr, training_args)
    elif "learning_rate" in preset and training_args.learning_rate == defaults["learning_rate"]:
        training_args.learning_rate = preset["learning_rate"]


@dataclass(frozen=True)
class MaeSchedule:
    """MAE's learning-rate schedule (``util/lr_sched.adjust_learning_rate``): linear warmup from 0 over
    ``warmup_epochs``, then a half-cycle cosine from the peak down to ``min_lr``, set before every optimizer
    step at the fractional epoch reached (``batch index / batches per epoch + epoch``). Each parameter group
    gets its layer-decay share of it, ``min_lr`` included, as MAE's ``lr_scale`` does."""

    warmup_epochs: float = 5.0
    min_lr: float = 1e-6

    def factor(
        self, *, peak_lr: float, batches_per_epoch: int, accumulation: int, total_steps: int
    ) -> MaeScheduleFactor:
        """The ``LambdaLR`` factor of a run with these dataloader sizes (per process) and ``total_steps`` updates."""
        if batches_per_epoch < 1:
            raise UsfmaeError("MAE's schedule needs a training set of at least one batch per process")
        return MaeScheduleFactor(
            warmup_epochs=self.warmup_epochs,
            min_lr_ratio=self.min_lr / peak_lr if peak_lr > 0 else 0.0,
            batches_per_epoch=batches_per_epoch,
            accumulation=accumulation,
            total_steps=total_steps,
        )


@dataclass
class MaeScheduleFactor:
    """Multiplier of the peak lr at optimizer step ``s`` (a picklable ``LambdaLR`` lambda; resuming restores it).

    The Trainer makes ``ceil(batches / accumulation)`` updates per epoch (the last one with the remainder);
    update ``j`` of epoch ``e`` starts at batch ``j * accumulation``, i.e. at epoch ``e + j * accumulation /
    batches``, where MAE sets its lr. The cosine ends at the epoch reached after ``total_steps`` updates.
    """

    warmup_epochs: float
    min_lr_ratio: float
    batches_per_epoch: int
    accumulation: int
    total_steps: int

    def epoch_at(self, step: int) -> float:
        """The fractional epoch at which optimizer step ``step`` (0-based) starts."""
        updates_per_epoch = math.ceil(self.batches_per_epoch / self.accumulation)
        epoch, update = divmod(step, updates_per_epoch)
        return epoch + update * self.accumulation / self.batches_per_epoch

    def warmup_steps(self) -> int:
        """The first step at or past ``warmup_epochs`` (where the cosine starts)."""
        updates_per_epoch = math.ceil(self.batches_per_epoch / self.accumulation)
        epoch = math.floor(self.warmup_epochs)
        # rounded first: 0.3 * 10 is 3.0000000000000004, whose ceiling would skip an update
        update = math.ceil(round((self.warmup_epochs - epoch) * self.batches_per_epoch / self.accumulation, 9))
        return epoch * updates_per_epoch + min(update, updates_per_epoch)

    def __call__(self, step: int) -> float:
        epoch = self.epoch_at(step)
        if epoch < self.warmup_epochs:
            return epoch / self.warmup_epochs
        cosine_epochs = self.epoch_at(self.total_steps) - self.warmup_epochs
        progress = min((epoch - self.warmup_epochs) / cosine_epochs, 1.0) if cosine_epochs > 0 else 1.0
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_lr_schedule(
    given: Mapping[str, float | None], preset: Mapping[str, Any], training_args: TrainingArguments
) -> MaeSchedule | None:
    """MAE's schedule if ``--warmup_epochs`` / ``--min_lr`` are ``given`` (not None) or the preset has one and
    the Trainer's schedule (``--lr_scheduler_type``, ``--warmup_steps``) was left at its defaults; else None
    (the Trainer's own scheduler). Giving both kinds is refused."""
    defaults = {item.name: item.default for item in dataclasses.fields(TrainingArguments)}
    trainer_flags = [
        f"--{name}" for name in ("lr_scheduler_type", "warmup_steps") if getattr(training_args, name) != defaults[name]
    ]
    mae_flags = [f"--{name}" for name, value in given.items() if value is not None]
    if mae_flags and trainer_flags:
        raise UsfmaeError(
            f"{' and '.join(mae_flags)} (MAE's per-step cosine) and {' and '.join(trainer_flags)} (the Trainer's "
            "schedule) exclude each other; give one kind"
        )
    if not mae_flags and (trainer_flags or "warmup_epochs" not in preset):
        return None
    values = {
        name: given.get(name) if given.get(name) is not None else preset.get(name, default)
        for name, default in MAE_SCHEDULE_DEFAULTS.items()
    }
    for name, value in values.items():
        if value < 0:
            raise UsfmaeError(f"--{name} must be >= 0, got {value}")
    return MaeSchedule(**values)


def scaled_learning_rate(blr: float, args: TrainingArguments) -> float:
    """MAE's rule ``lr = blr * effective_batch / 256``, effective batch over accumulation and processes."""
    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return blr * effective_batch / 256


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay: embeddings 0, block ``i`` -> ``i + 1``, the rest (heads,
    norms after the last block, a segmentation decoder) last."""
    if ".embeddings." in f".{name}":
        return 0
    match = _LAYER_INDEX.search(f".{name}")
    return int(match.group(1)) + 1 if match else num_layers + 1


def layer_decay_param_groups(
    model: nn.Module, *, learning_rate: float, weight_decay: float, layer_decay: float, decay_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with lr ``learning_rate * layer_decay ** (depth_max - depth)``.

    Parameters outside ``decay_names`` (biases, norms) and the tokens / position embeddings get no
    weight decay, as in the MAE code. Frozen parameters are left out.
    """
    num_layers = model.config.num_hidden_layers
    decay_names = set(decay_names)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decays = name in decay_names and not is_no_decay(name, parameter, one_dimensional=False)
        depth = layer_id(name, num_layers)
        group = groups.setdefault(
            (depth, decays),
            {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr": learning_rate * layer_decay ** (num_layers + 1 - depth),
            },
        )
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


class UsfmaeTrainer(Trainer):
    """``Trainer`` whose optimizer uses layer-wise lr decay (``layer_decay=1`` gives uniform lrs) and, with
    ``lr_schedule``, MAE's per-step schedule instead of ``--lr_scheduler_type``. It logs the largest
    group's lr as ``learning_rate`` (the Trainer logs the first group's: the embeddings', under layer decay)."""

    def __init__(self, *args, layer_decay: float = 1.0, lr_schedule: MaeSchedule | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_training_arguments(self.args)
        self.layer_decay = layer_decay
        self.lr_schedule = lr_schedule
        self._batches_per_epoch: int | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``, after checking that ``resume_from_checkpoint`` is a complete checkpoint of this model
        (one line naming the difference instead of a traceback; ``latest`` = the newest ``checkpoint-N``)."""
        if resume_from_checkpoint not in (None, False):
            resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.model, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if not self._load_whole_model(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_whole_model(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()

    def _load_whole_model(self, folder: str, model: nn.Module) -> bool:
        """Load a whole-model checkpoint through ``from_pretrained``, which renames the legacy ViT names that
        ``save_pretrained`` writes; the Trainer loads the tensors by name (huggingface/transformers#43701) and
        would resume with the encoder of ``--model_name_or_path``, reporting only "missing keys". False where the
        Trainer's own path applies (peft adapters, FSDP, DeepSpeed, SageMaker)."""
        from transformers import PreTrainedModel

        if self.is_fsdp_enabled or self.is_deepspeed_enabled or is_sagemaker_mp_enabled():
            return False
        if hasattr(model, "peft_config") or not isinstance(model, PreTrainedModel):
            return False
        if not any((Path(folder) / name).is_file() for name in _WHOLE_MODEL_WEIGHTS):
            return False
        model.load_state_dict(type(model).from_pretrained(folder).state_dict())
        return True

    def set_initial_training_values(self, args: TrainingArguments, dataloader) -> tuple:
        values = super().set_initial_training_values(args, dataloader)
        self._batches_per_epoch = values[5]  # steps_in_epoch: batches per epoch and process
        return values

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self._batches_per_epoch is None:
            raise UsfmaeError("MAE's schedule is set up by train(): it needs the training dataloader's length")
        factor = self.lr_schedule.factor(
            peak_lr=self.args.learning_rate,
            batches_per_epoch=self._batches_per_epoch,
            accumulation=self.args.gradient_accumulation_steps,
            total_steps=num_training_steps,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_learning_rate(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = layer_decay_param_groups(
                opt_model,
                learning_rate=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                layer_decay=self.layer_decay,
                decay_names=self.get_decay_parameter_names(opt_model),
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def balanced_class_weights(labels: Sequence[int] | None, num_labels: int, *, counts=None) -> torch.Tensor:
    """``n_samples / (n_classes * count)`` per class (scikit-learn's "balanced"); refuses an empty class.

    Give the ``labels`` (one per sample) or their per-class ``counts`` (e.g. pixel counts of masks).
    """
    counts = np.bincount(np.asarray(labels), minlength=num_labels) if counts is None else np.asarray(counts)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"class-weighted loss needs every class in the training split; classes {missing} are absent")
    return torch.tensor(counts.sum() / (num_labels * counts), dtype=torch.float32)


@dataclass
class ClassificationLoss:
    """``compute_loss_func`` for hard or soft (mixup/cutmix) targets, with label smoothing and class weights.

    The per-sample (weighted) cross-entropies are summed and divided by the number of samples in the
    whole accumulated batch, which the Trainer passes as ``num_items_in_batch``.
    """

    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None

    def __call__(
        self, outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        logits = outputs["logits"].float()
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        losses = F.cross_entropy(logits, labels, weight=weight, label_smoothing=self.label_smoothing, reduction="none")
        if num_items_in_batch is None:
            return losses.mean()
        if labels.ndim == 2:
            # The Trainer counts label entries, i.e. samples x classes for soft targets.
            num_items_in_batch = num_items_in_batch / labels.shape[1]
        return losses.sum() / num_items_in_batch


class ClassificationCollator:
    """Stack ``pixel_values`` / ``labels``; mix training batches with MixUp or CutMix (chosen at random per batch).

    The Trainer uses one collator for every split, so only batches whose examples carry
    ``"train": True`` (set by the training transform) are mixed; evaluation batches never are.

    With ``mixup=0.8, cutmix=1.0`` this is MAE's ``timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0,
    prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1)``: one of the two per batch with equal
    chance, lam ~ Beta(alpha, alpha) (cutmix's corrected to the box area kept), and the smoothing that timm
    folds into the mixed targets is applied by :class:`ClassificationLoss` to the same effect,
    ``(1 - s) * mixed + s / classes``. The mixing partner is the batch rolled by one (timm: reversed), the
    same pairing for two samples and the same distribution otherwise. Unlike MAE the Trainer keeps the last,
    smaller batch of an epoch (``--dataloader_drop_last`` drops it as MAE does).
    """

    def __init__(self, num_labels: int, *, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        from torchvision.transforms import v2

        mixers = [v2.MixUp(alpha=mixup, num_classes=num_labels)] if mixup > 0 else []
        mixers += [v2.CutMix(alpha=cutmix, num_classes=num_labels)] if cutmix > 0 else []
        self.mix = v2.RandomChoice(mixers) if mixers else None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
        labels = torch.tensor([example["labels"] for example in examples], dtype=torch.long)
        if self.mix is not None and all(example.get("train", False) for example in examples):
            pixel_values, labels = self.mix(pixel_values, labels)
        return {"pixel_values": pixel_values, "labels": labels}
