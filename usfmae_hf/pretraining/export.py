"""Export of the weights being trained as a Hugging Face model directory (``final/``, ``checkpoint-N/model``)."""

from __future__ import annotations

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
    training: Mapping[str, Any],
) -> None:
    """Write ``directory`` atomically: legacy-named fp32 safetensors, image processor, model card.

    Collective: every process takes part in gathering the weights; the main process writes.
    ``training`` is the card's table of training settings (recipe, batch, lr, precision, steps).
    """
    from transformers import ViTMAEForPreTraining

    from usfmae_hf.atomic import atomic_directory
    from usfmae_hf.model.conversion import save_vitmae_pretrained
    from usfmae_hf.publishing.cards import render_model_card

    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    export = ViTMAEForPreTraining(config)
    # a torch.compile'd model names its weights "_orig_mod.<name>"
    export.load_state_dict({key.removeprefix("_orig_mod."): value.float().cpu() for key, value in state_dict.items()})
    with atomic_directory(directory, overwrite=True) as staging:
        save_vitmae_pretrained(export, staging, image_processor=processor)
        render_model_card("pretrained", config=config, extra={"training": dict(training)}).save(staging / "README.md")
