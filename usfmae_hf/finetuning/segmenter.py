"""Build a semantic-segmentation model on a converted USF-MAE encoder: a stock ``DPTForSemanticSegmentation``.

Why DPT: its backbone is a plain ViT with the CLS token, so the pretrained USF-MAE encoder computes
exactly what it computed in pretraining (the test checks its hidden states against ``ViTModel``
within 1e-5). The other stock candidate, UperNet over ``VitDetBackbone``, has MAE's block layout but
no CLS token, so every block of the encoder would compute a different function than the one that
was pretrained; and transformers' ``VitDetBackbone`` has no feature pyramid, so UperNet sees four
maps at 1/16 of the input. DPT reassembles four encoder depths into 1/4..1/32 maps and fuses them
into a 1/2-resolution output.

The result is a stock transformers model: ``AutoModelForSemanticSegmentation.from_pretrained(dir)`` and
``pipeline("image-segmentation", model=dir)`` load it without this package or remote code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from transformers import AutoConfig, DPTConfig, DPTForSemanticSegmentation

from usfmae_hf.errors import CheckpointError
from usfmae_hf.finetuning.heads import label_maps
from usfmae_hf.inference.features import load_encoder
from usfmae_hf.model.directory import ENCODER_MODEL_TYPES, encoder_fields
from usfmae_hf.model.keys import current_to_legacy
from usfmae_hf.model.loading import quiet_loading_report

logger = logging.getLogger(__name__)

#: DPT-Base's reassembly: four encoder depths resized by these factors (1/4 .. 1/32 of the input at patch 16)
REASSEMBLE_FACTORS = (4, 2, 1, 0.5)
#: modules of the DPT model outside the pretrained encoder (they train at the full learning rate)
DECODER_MODULES = ("neck", "head")


def reassembled_layers(num_hidden_layers: int) -> list[int]:
    """Encoder blocks whose outputs DPT reassembles: evenly spaced, ending at the last (``[2, 5, 8, 11]`` for 12).

    Encoders with fewer than four blocks use every block (and as many reassembly stages).
    """
    stages = min(len(REASSEMBLE_FACTORS), num_hidden_layers)
    return [round((stage + 1) * num_hidden_layers / stages) - 1 for stage in range(stages)]


def dpt_config(
    encoder_config, label_names: Sequence[str], *, fusion_hidden_size: int = 256, classifier_dropout: float = 0.1
) -> DPTConfig:
    """A ``DPTConfig`` whose ViT backbone has the encoder's shape, with DPT-Base's neck scaled to its width."""
    fields = encoder_fields(encoder_config)
    for name in ("encoder_stride", "pooler_output_size", "pooler_act"):
        fields.pop(name, None)
    hidden = fields["hidden_size"]
    layers = reassembled_layers(fields["num_hidden_layers"])
    # DPT-Base for a 768-wide encoder: 96, 192, 384, 768 channels at the four scales.
    neck_sizes = [max(8, hidden // 8), max(8, hidden // 4), max(8, hidden // 2), hidden][-len(layers) :]
    return DPTConfig(
        **fields,
        is_hybrid=False,
        backbone_out_indices=layers,
        reassemble_factors=list(REASSEMBLE_FACTORS[: len(layers)]),
        neck_hidden_sizes=neck_sizes,
        fusion_hidden_size=min(fusion_hidden_size, max(16, hidden)),
        readout_type="project",
        use_auxiliary_head=False,  # the loss is computed from the main logits only (see finetuning.segmentation)
        semantic_loss_ignore_index=255,
        semantic_classifier_dropout=classifier_dropout,
        num_labels=len(label_names),
        **label_maps(label_names),
    )


def build_segmenter(
    model_name_or_path: str | os.PathLike,
    label_names: Sequence[str],
    *,
    fusion_hidden_size: int = 256,
    classifier_dropout: float = 0.1,
) -> DPTForSemanticSegmentation:
    """A ``DPTForSemanticSegmentation`` with a fresh ``len(label_names)``-class decoder on a USF-MAE encoder.

    ``model_name_or_path`` is a converted ``vit_mae`` or ``vit`` directory (the encoder is loaded, the MAE
    decoder ignored) or a DPT directory saved by an earlier segmentation run (its backbone and neck are
    kept; the classifier is re-made when the labels differ).

    Raises:
        CheckpointError: the directory holds another kind of model, or encoder weights do not fit.
    """
    source = AutoConfig.from_pretrained(model_name_or_path)
    if source.model_type == "dpt":
        config = DPTConfig.from_pretrained(model_name_or_path, num_labels=len(label_names), **label_maps(label_names))
        with quiet_loading_report():  # a new classifier is expected when the labels change
            return DPTForSemanticSegmentation.from_pretrained(
                model_name_or_path, config=config, ignore_mismatched_sizes=True
            )
    if source.model_type not in ENCODER_MODEL_TYPES:
        raise CheckpointError(
            f"{model_name_or_path} holds a {source.model_type!r} model; "
            f"expected one of {', '.join((*ENCODER_MODEL_TYPES, 'dpt'))}"
        )
    encoder = load_encoder(model_name_or_path)
    config = dpt_config(
        encoder.config, label_names, fusion_hidden_size=fusion_hidden_size, classifier_dropout=classifier_dropout
    )
    model = DPTForSemanticSegmentation(config)
    # DPT's ViT keeps the legacy module names (encoder.layer.N.attention.attention.query, ...).
    weights = {f"dpt.{name}": tensor for name, tensor in current_to_legacy(encoder.state_dict(), prefix="").items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing_encoder = [name for name in missing if name.startswith("dpt.")]
    if unexpected or missing_encoder:
        raise CheckpointError(
            f"{model_name_or_path}: encoder weights do not fit DPT: missing {missing_encoder[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.config._name_or_path = str(model_name_or_path)
    logger.info(
        "segmentation model: USF-MAE encoder from %s, new DPT neck and %d-class head (blocks %s reassembled)",
        model_name_or_path,
        len(label_names),
        model.config.backbone_out_indices,
    )
    return model
