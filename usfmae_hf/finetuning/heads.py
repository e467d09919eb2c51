"""Build a classifier (``cls`` or ``mean`` head) on a converted USF-MAE encoder directory.

Both heads load from a ``vit_mae`` (full MAE) or ``vit`` (encoder-only) directory written by
``usfmae convert``, or from a classifier directory saved by a previous fine-tuning run, and both
record ``id2label`` / ``label2id`` in their config.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Literal

from transformers import AutoConfig, PreTrainedModel

from usfmae_hf.errors import CheckpointError
from usfmae_hf.finetuning.modeling_usfmae import UsfmaeClassifierConfig, UsfmaeForImageClassification
from usfmae_hf.model.directory import ENCODER_MODEL_TYPES, encoder_fields
from usfmae_hf.model.loading import quiet_loading_report

logger = logging.getLogger(__name__)

Head = Literal["cls", "mean"]
HEADS: tuple[str, ...] = ("cls", "mean")


def label_maps(label_names: Sequence[str]) -> dict[str, dict]:
    """``id2label`` / ``label2id`` keyword arguments for a config, from class names in index order."""
    return {
        "id2label": {index: name for index, name in enumerate(label_names)},
        "label2id": {name: index for index, name in enumerate(label_names)},
    }


def build_classifier(
    model_name_or_path: str | os.PathLike,
    label_names: Sequence[str],
    *,
    head: Head = "cls",
    drop_path_rate: float = 0.0,
) -> PreTrainedModel:
    """Return a classifier with a fresh ``len(label_names)``-way head on the encoder at ``model_name_or_path``.

    ``cls``: stock ``ViTForImageClassification`` (CLS token after the encoder's final LayerNorm); it
    loads anywhere with plain transformers. ``mean``: :class:`UsfmaeForImageClassification` (MAE
    recipe: mean of patch tokens, ``fc_norm``, final norm dropped, drop-path ``drop_path_rate``).
    A head already present in the directory is replaced (its shape or labels would not match).
    """
    import torch  # fp32 training weights even from a directory stored in fp16 / bf16 (usfmae convert --dtype)
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    source = AutoConfig.from_pretrained(model_name_or_path)
    if source.model_type not in ENCODER_MODEL_TYPES:
        raise CheckpointError(
            f"{model_name_or_path} holds a {source.model_type!r} model; "
            f"expected one of {', '.join(ENCODER_MODEL_TYPES)}"
        )
    # A clean config (model_type "vit" or "usfmae_classifier") rather than the source's vit_mae one, which
    # AutoModelForImageClassification cannot map and which carries decoder fields.
    fields = encoder_fields(source)
    fields.update(num_labels=len(label_names), **label_maps(label_names))
    vit_config = ViTConfig(**fields)
    if head == "cls":
        if drop_path_rate:
            raise ValueError("drop-path is only implemented for the 'mean' head (stock ViT layers have none)")
        with quiet_loading_report():  # the decoder is unused and the new head is expected to be missing
            return ViTForImageClassification.from_pretrained(
                model_name_or_path, config=vit_config, ignore_mismatched_sizes=True, dtype=torch.float32
            )

    with quiet_loading_report():
        encoder = ViTModel.from_pretrained(
            model_name_or_path, config=vit_config, add_pooling_layer=False, dtype=torch.float32
        )
    config = UsfmaeClassifierConfig(**fields, drop_path_rate=drop_path_rate)
    model = UsfmaeForImageClassification(config)
    encoder_state = {key: value for key, value in encoder.state_dict().items() if not key.startswith("layernorm.")}
    missing, unexpected = model.vit.load_state_dict(encoder_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"encoder weights do not fit the mean-head model: missing {missing}, unexpected {unexpected}"
        )
    logger.info(
        "mean head: encoder loaded from %s, final LayerNorm dropped, new fc_norm + classifier", model_name_or_path
    )
    return model
