"""MAE fine-tuning recipe options, plugged into the Trainer through its extension points.

* layer-wise lr decay: :class:`UsfmaeTrainer` overrides ``create_optimizer`` only;
* label smoothing, class weights, soft (mixup/cutmix) targets: :class:`ClassificationLoss`, a
  ``compute_loss_func``;
* mixup / cutmix: :class:`ClassificationCollator` with torchvision's ``v2.MixUp`` / ``v2.CutMix``;
* blr scaling: :func:`scaled_learning_rate`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

from usfmae_hf.model.parameters import is_no_decay

# Encoder block N: ``vit.layers.N.`` (ViT classifiers, current names) or ``dpt.encoder.layer.N.`` (DPT keeps
# the legacy names). Anchored on the encoder's prefix so that DPT's ``neck.*.layers.N`` is not taken for a block.
_LAYER_INDEX = re.compile(r"\.(?:vit|dpt)\.(?:layers|encoder\.layer)\.(\d+)\.")

# The original MAE fine-tuning recipe for ViT-B (Table 9 of He et al. 2022, ``main_finetune.py``).
MAE_PRESET: Mapping[str, Any] = {
    "head": "mean",
    "blr": 5e-4,
    "layer_decay": 0.65,
    "drop_path": 0.1,
    "label_smoothing": 0.1,
    "mixup": 0.8,
    "cutmix": 1.0,
    "weight_decay": 0.05,
    "warmup_ratio": 0.05,
    "augment": "mae",
}


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
    """``Trainer`` whose optimizer uses layer-wise lr decay (``layer_decay=1`` gives uniform lrs)."""

    def __init__(self, *args, layer_decay: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.layer_decay = layer_decay

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
