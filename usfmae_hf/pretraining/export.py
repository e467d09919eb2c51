"""Export of the weights being trained as a Hugging Face model directory (``final/``, ``checkpoint-N/model``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def export_hf_model(
    accelerator: Any,
    model: torch.nn.Module,
    config: Any,
    directory: Path,
    processor: Any,
    card: Mapping[str, Any],
) -> None:
    """Write ``directory`` atomically: legacy-named fp32 safetensors, image processor, model card.

    Collective: every process takes part in gathering the weights; the main process writes.
    ``card`` holds :func:`~usfmae_hf.publishing.cards.render_model_card`'s keywords for what the run knows:
    ``initialised_from``, ``training_run``, ``datasets`` and ``extra`` (the table of training settings).
    The config records the initial weights and the ``training_run`` (``usfmae_pretraining``) in place of
    the conversion provenance it may have inherited: that describes weights this run has changed.
    """
    from transformers import ViTMAEForPreTraining

    from usfmae_hf.atomic import atomic_directory
    from usfmae_hf.model.saving import save_vitmae_pretrained
    from usfmae_hf.publishing.cards import PRETRAINING_KEY, PROVENANCE_KEY, UNKNOWN_LICENSE, render_model_card

    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    config = copy.deepcopy(config)
    if hasattr(config, PROVENANCE_KEY):
        delattr(config, PROVENANCE_KEY)
    rendered = render_model_card("pretrained", config=config, **card)
    record = {"initialised_from": card.get("initialised_from"), **card.get("training_run", {})}
    if rendered.data.license != UNKNOWN_LICENSE:
        record["license"] = rendered.data.license  # for the cards of models trained from these weights
    setattr(config, PRETRAINING_KEY, record)
    export = ViTMAEForPreTraining(config)
    # a torch.compile'd model names its weights "_orig_mod.<name>"
    export.load_state_dict({key.removeprefix("_orig_mod."): value.float().cpu() for key, value in state_dict.items()})
    with atomic_directory(directory, overwrite=True) as staging:
        save_vitmae_pretrained(export, staging, image_processor=processor)
        rendered.save(staging / "README.md")
