"""The segmentation loss: cross-entropy, optionally with soft Dice, on logits resized to the label masks.

It is a Trainer ``compute_loss_func``. The cross-entropy is summed over pixels and divided by the
number of labelled pixels in the whole accumulated (and, across processes, gathered) batch, which the
Trainer passes as ``num_items_in_batch``; the Dice term is weighted by the micro-batch's share of
those pixels. Both make a step with gradient accumulation equal a step over the same images in one
batch, and ``N`` processes equal one process accumulating ``N`` micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LOSSES: tuple[str, ...] = ("ce", "dice_ce")
IGNORE_INDEX = 255


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``1 - mean soft Dice`` over the foreground classes (1..K-1), pooled over the batch's pixels.

    A class absent from both the labels and the (soft) prediction has a Dice of 1, so it adds no loss.
    """
    probabilities = logits.softmax(dim=1)
    valid = (labels != ignore_index).unsqueeze(1)
    one_hot = F.one_hot(labels.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2)
    probabilities, one_hot = probabilities * valid, one_hot * valid
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + 1e-6) / (total + 1e-6)
    return 1 - dice[1:].mean()


@dataclass
class SegmentationLoss:
    """``compute_loss_func``: ``"ce"`` (cross-entropy) or ``"dice_ce"`` (cross-entropy + soft Dice), with
    optional class weights; pixels labelled :data:`IGNORE_INDEX` count for neither."""

    loss: Literal["ce", "dice_ce"] = "ce"
    class_weights: torch.Tensor | None = None
    dice_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    def __call__(
        self, outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        logits = F.interpolate(outputs["logits"].float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        pixels = F.cross_entropy(logits, labels, weight=weight, ignore_index=IGNORE_INDEX, reduction="none")
        labelled = (labels != IGNORE_INDEX).sum()
        if num_items_in_batch is None:
            loss = pixels.sum() / labelled.clamp(min=1)
            share = 1.0
        else:
            loss = pixels.sum() / num_items_in_batch
            share = labelled / num_items_in_batch
        if self.loss == "dice_ce":
            loss = loss + self.dice_weight * share * soft_dice_loss(logits, labels)
        return loss
