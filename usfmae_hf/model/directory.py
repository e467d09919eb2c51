"""Converted model directories: which flavour a directory holds, and the encoder-only ``ViTConfig``.

A converted USF-MAE directory is either ``vit_mae`` (``ViTMAEConfig``, usually with the decoder) or
``vit`` (an encoder-only ``ViTConfig``, ``usfmae convert --format vit``). :func:`encoder_config`
is the one place that turns the first into the second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, ViTConfig

from usfmae_hf.errors import CheckpointError

#: model types of converted directories (and of encoders a classifier can be built on)
ENCODER_MODEL_TYPES = ("vit", "vit_mae")

#: ViTMAEConfig fields that describe the encoder, i.e. what a ViTConfig needs to hold the same weights
ENCODER_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
)

#: ViTConfig fields a ViTMAEConfig does not have (kept when the source is already a ViTConfig)
_VIT_ONLY_FIELDS = ("encoder_stride", "pooler_output_size", "pooler_act")


def model_type(path: str | os.PathLike) -> str:
    """The ``model_type`` in ``path/config.json``: ``"vit_mae"`` or ``"vit"``.

    Raises:
        CheckpointError: ``config.json`` is missing or not JSON, or holds another model type.
    """
    path = Path(path)
    try:
        found = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: unreadable config.json ({error})") from None
    if found not in ENCODER_MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {found!r} is neither 'vit_mae' nor 'vit'")
    return found


def encoder_fields(config: PretrainedConfig) -> dict[str, Any]:
    """The encoder's ``ViTConfig`` keyword arguments from a ``ViTMAEConfig`` (or a ``ViTConfig``)."""
    return {name: getattr(config, name) for name in ENCODER_FIELDS + _VIT_ONLY_FIELDS if hasattr(config, name)}


def encoder_config(vitmae_config: PretrainedConfig, **overrides: Any) -> ViTConfig:
    """A ``ViTConfig`` holding the encoder of ``vitmae_config`` (no decoder fields), plus ``overrides``."""
    return ViTConfig(**{**encoder_fields(vitmae_config), **overrides})
