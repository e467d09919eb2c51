"""Exporting a converted model directory back to the original MAE layout (``qkv`` merged)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel, ViTModel

from usfmae_hf.atomic import atomic_file, ensure_writable_output
from usfmae_hf.errors import CheckpointError
from usfmae_hf.model.directory import model_type
from usfmae_hf.model.keys import current_to_original
from usfmae_hf.model.loading import quiet_loading_report
from usfmae_hf.model.mae_layout import validate_mae_state_dict
from usfmae_hf.model.saving import recover_interrupted_output


def export_original(
    model_dir: str | os.PathLike,
    output_file: str | os.PathLike,
    *,
    overwrite: bool = False,
    encoder_only: bool = False,
) -> Path:
    """Write a converted directory back as an original MAE state dict (``qkv`` merged), atomically.

    Only weights the directory actually holds are exported: a directory without decoder weights
    gives an encoder-only file. Converting the result again reproduces the directory's tensors.

    Args:
        model_dir: a ``vit_mae`` or ``vit`` directory (as ``usfmae convert`` writes).
        output_file: the ``.pth`` file to write.
        overwrite: replace an existing ``output_file``.
        encoder_only: leave out the decoder and mask token. The file then holds exactly the keys of
            timm's ``VisionTransformer`` (``vit_base_patch16_224`` for USF-MAE's ViT-B), which loads it
            with ``strict=True`` when built with ``num_classes=0``: its output is the CLS token after
            the final LayerNorm, the features :func:`usfmae_hf.inference.extract_features` gives.
    """
    model_dir, output_file = Path(model_dir), Path(output_file)
    recover_interrupted_output(output_file)
    ensure_writable_output(output_file, overwrite)  # checked before the (slow) model load, too
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{model_dir}: no model.safetensors (is this a converted model directory?)")
    with safe_open(weights, framework="pt") as handle:
        has_decoder = not encoder_only and any(key.startswith("decoder.") for key in handle.keys())
    model_type(model_dir)  # a clear error for anything but a vit_mae or vit directory
    config = AutoConfig.from_pretrained(model_dir)
    if isinstance(config, ViTMAEConfig) and has_decoder:
        model_cls, prefix, kwargs = ViTMAEForPreTraining, "vit.", {}
    elif isinstance(config, ViTMAEConfig):
        model_cls, prefix, kwargs = ViTMAEModel, "", {}
    else:
        model_cls, prefix, kwargs = ViTModel, "", {"add_pooling_layer": False}
    # Decoder weights left unused by ViTMAEModel and the identity pooler of a vit directory are expected
    # leftovers (neither is part of the exported layout); a missing weight is an error, not a random init.
    with quiet_loading_report():
        model, info = model_cls.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        raise CheckpointError(f"{model_dir}: weights missing: {', '.join(sorted(info['missing_keys'])[:5])}")
    state_dict = current_to_original(model.state_dict(), prefix=prefix)
    validate_mae_state_dict(state_dict, encoder_only=not has_decoder, source=str(model_dir))
    # torch.save on a path names the zip archive's root folder after the (temporary, random) file
    # name; through a file object the root is always "archive", so the bytes are the same every run.
    with atomic_file(output_file, overwrite=overwrite) as tmp, open(tmp, "wb") as handle:
        torch.save(state_dict, handle)
    return output_file
