"""Deterministic encoder features from converted USF-MAE models.

``ViTMAEModel`` is a poor feature extractor: it masks at inference and, even with ``mask_ratio=0``,
returns the patch tokens shuffled, because its embeddings always run random masking, which reorders
the kept tokens by random noise. :func:`load_encoder` therefore loads the encoder weights of either
converted flavour (a ``vit_mae`` directory or a ``--format vit`` one) into a plain ``ViTModel``: no
masking, no shuffling, patch tokens in row-major spatial order, and the same numbers on every call.

The private helpers here (:func:`_place`, :func:`_batches`) are shared with
:mod:`usfmae_hf.inference.reconstruction` and :mod:`usfmae_hf.inference.feature_files`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, ViTMAEConfig, ViTModel

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.image.processor import build_image_processor, load_image_processor
from usfmae_hf.io import load_image
from usfmae_hf.model.directory import encoder_config, model_type
from usfmae_hf.model.loading import quiet_loading_report
from usfmae_hf.precision import resolve_dtype

Pooling = Literal["cls", "mean", "patches"]
ImageLike = Image.Image | np.ndarray | str | os.PathLike
POOLINGS: tuple[str, ...] = ("cls", "mean", "patches")


def _place(
    model: torch.nn.Module, device: str | torch.device | None, dtype: torch.dtype | str | None
) -> torch.nn.Module:
    """Move ``model`` to ``device`` and ``dtype`` (a name such as ``"auto"`` is resolved for that device)."""
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device or next(model.parameters()).device)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def load_encoder(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> ViTModel:
    """Load the encoder of a converted USF-MAE directory as a ``ViTModel`` in eval mode.

    Args:
        path: a ``vit_mae`` directory (``ViTMAEForPreTraining`` weights; the decoder is not loaded) or
            an encoder-only ``vit`` directory written by ``usfmae convert --format vit``.
        device: where to put the model (default: CPU).
        dtype: parameter dtype (default: as stored, float32): a torch dtype or a precision name
            (``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``; see :mod:`usfmae_hf.precision`).

    Raises:
        UsfmaeError: ``path`` is not a converted ViT/ViTMAE directory or lacks encoder weights.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsfmaeError(f"{path}: not a model directory (no config.json)")
    model_type(path)  # a clear error for anything but a vit_mae or vit directory
    config = AutoConfig.from_pretrained(path)
    if isinstance(config, ViTMAEConfig):
        config = encoder_config(config)
    config._name_or_path = str(path)
    # The decoder weights of a vit_mae directory are expected leftovers: keep the load report quiet
    # and check the one thing that matters, that no encoder weight is missing.
    with quiet_loading_report():
        model, info = ViTModel.from_pretrained(path, config=config, add_pooling_layer=False, output_loading_info=True)
    if info["missing_keys"]:
        raise UsfmaeError(f"{path}: encoder weights missing: {', '.join(sorted(info['missing_keys'])[:5])}")
    return _place(model, device, dtype)


def processor_for(model: torch.nn.Module):
    """The exact USF-MAE image processor of ``model``: the one saved beside it, else the default one."""
    source = getattr(model.config, "_name_or_path", "")
    if source and (Path(source) / "preprocessor_config.json").is_file():
        return load_image_processor(source)
    return build_image_processor(model.config.image_size)


def _as_image(item: ImageLike) -> Image.Image | np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    if isinstance(item, (Image.Image, np.ndarray)):
        return item
    raise TypeError(f"expected a PIL image, a numpy array or a file path, got {type(item).__name__}")


def _batches(
    images: ImageLike | Sequence[ImageLike] | torch.Tensor, batch_size: int, processor: Any
) -> Iterator[torch.Tensor]:
    """Yield ``pixel_values`` batches; a 4-D float tensor is taken as already preprocessed."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError("a tensor input must be preprocessed pixel_values of shape (batch, 3, height, width)")
        yield from images.split(batch_size)
        return
    if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim < 4):
        images = [images]
    batch: list[Image.Image | np.ndarray] = []
    for item in images:
        batch.append(_as_image(item))
        if len(batch) == batch_size:
            yield processor(batch, return_tensors="pt")["pixel_values"]
            batch = []
    if batch:
        yield processor(batch, return_tensors="pt")["pixel_values"]


def pool_tokens(hidden_states: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool the encoder's final (layer-normed) tokens: CLS token, mean of patch tokens, or all patch tokens."""
    if pooling == "cls":
        return hidden_states[:, 0]
    if pooling == "mean":
        return hidden_states[:, 1:].mean(dim=1)
    if pooling == "patches":
        return hidden_states[:, 1:]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


@torch.inference_mode()
def extract_features(
    encoder: ViTModel,
    images: ImageLike | Sequence[ImageLike] | Iterable[ImageLike] | torch.Tensor,
    pooling: Pooling = "cls",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    processor: Any = None,
) -> torch.Tensor:
    """Encode images with a USF-MAE encoder; the same inputs give the same features on every call.

    Args:
        encoder: a model from :func:`load_encoder` (any ``ViTModel`` works).
        images: one or several PIL images, uint8 ``(H, W[, C])`` arrays (or one ``(N, H, W, C)``
            array) or file paths (first frame of each file), or a float tensor of preprocessed
            ``pixel_values`` ``(B, 3, H, W)``, used as is.
        pooling: ``"cls"`` -> ``(N, D)`` CLS tokens; ``"mean"`` -> ``(N, D)`` mean of the patch tokens;
            ``"patches"`` -> ``(N, L, D)`` patch tokens in row-major spatial order. All after the
            encoder's final LayerNorm.
        batch_size: images per forward pass.
        device, dtype: move the encoder there first (default: leave it where it is); ``dtype`` may be a
            precision name such as ``"auto"`` (see :mod:`usfmae_hf.precision`).
        processor: image processor (default: the one saved beside the encoder, see :func:`processor_for`).

    Returns:
        float32 CPU tensor, one row per image, in input order.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    _place(encoder, device, dtype)
    processor = processor or processor_for(encoder)
    parameter = next(encoder.parameters())
    outputs = []
    for pixel_values in _batches(images, batch_size, processor):
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        hidden_states = encoder(pixel_values=pixel_values).last_hidden_state
        outputs.append(pool_tokens(hidden_states, pooling).float().cpu())
    if not outputs:
        raise ValueError("no images given")
    return torch.cat(outputs)
