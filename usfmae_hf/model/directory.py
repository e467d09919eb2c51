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
from usfmae_hf.model.fields import ENCODER_FIELDS, VIT_ONLY_FIELDS

#: model types of converted directories (and of encoders a classifier can be built on)
ENCODER_MODEL_TYPES = ("vit", "vit_mae")


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
    return {name: getattr(config, name) for name in ENCODER_FIELDS + VIT_ONLY_FIELDS if hasattr(config, name)}


def encoder_config(vitmae_config: PretrainedConfig, **overrides: Any) -> ViTConfig:
    """A ``ViTConfig`` holding the encoder of ``vitmae_config`` (no decoder fields), plus ``overrides``."""
    return ViTConfig(**{**encoder_fields(vitmae_config), **overrides})
