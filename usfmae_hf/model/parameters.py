"""Which parameters get no weight decay: the single rule shared by pretraining and fine-tuning."""

from __future__ import annotations

import torch

# MAE's no-weight-decay names (timm's ``no_weight_decay``): position embeddings and the CLS / mask
# tokens, matched as name suffixes. ``decoder_pos_embed`` is ViTMAE's decoder table.
NO_DECAY_SUFFIXES: tuple[str, ...] = ("cls_token", "mask_token", "position_embeddings", "decoder_pos_embed")


def is_no_decay(name: str, parameter: torch.Tensor, *, one_dimensional: bool = True) -> bool:
    """Whether parameter ``name`` is exempt from weight decay.

    Position embeddings and CLS / mask tokens always are. With ``one_dimensional`` (pretraining),
    every tensor of at most one dimension (biases, norm weights) is exempt too; the fine-tuning
    Trainer passes ``False`` because it already leaves biases and norms out with its own
    ``get_decay_parameter_names``.
    """
    return (one_dimensional and parameter.ndim <= 1) or name.endswith(NO_DECAY_SUFFIXES)
