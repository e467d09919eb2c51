"""Masked reconstructions with converted USF-MAE ``vit_mae`` models, and the PNG grid that shows them.

:func:`reconstruct` masks a reproducible random subset of each image's patches, runs the full MAE
(encoder and decoder), and returns the inputs, the masked inputs and the reconstructions as uint8
images (:class:`Reconstruction`); :func:`save_reconstruction_grid` writes them as one PNG.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import ViTMAEForPreTraining

from usfmae_hf.atomic import atomic_write_bytes
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.image.processor import IMAGENET_MEAN, IMAGENET_STD
from usfmae_hf.inference.features import ImageLike, _batches, _place, processor_for
from usfmae_hf.model.directory import model_type


@dataclass(frozen=True)
class Reconstruction:
    """MAE reconstructions in pixel space: uint8 ``(B, H, W, 3)`` images and the ``(B, H, W)`` mask.

    Attributes:
        original: the preprocessed inputs, un-normalised (what the model saw).
        masked: the inputs with masked patches greyed out.
        reconstruction: the decoder's prediction for every patch.
        pasted: ``reconstruction`` on masked patches, ``original`` on visible ones.
        mask: True where a patch was masked.
    """

    original: np.ndarray
    masked: np.ndarray
    reconstruction: np.ndarray
    pasted: np.ndarray
    mask: np.ndarray


def _to_uint8_images(pixel_values: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _unnormalise_patches(model: ViTMAEForPreTraining, pixel_values: torch.Tensor, logits: torch.Tensor, mask):
    """Undo ``norm_pix_loss`` with the visible patches' statistics (per image), as the MAE demo does.

    Each target patch was normalised by its own mean and variance, which are unknown for masked
    patches; the mean over visible patches of those per-patch statistics stands in for them.
    """
    target = model.patchify(pixel_values)
    visible = (1 - mask).unsqueeze(-1)
    count = visible.sum(dim=1, keepdim=True)
    patch_mean = target.mean(dim=-1, keepdim=True)
    patch_std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    mean = (patch_mean * visible).sum(dim=1, keepdim=True) / count
    std = (patch_std * visible).sum(dim=1, keepdim=True) / count
    return logits * std + mean


@torch.inference_mode()
def reconstruct(
    model: ViTMAEForPreTraining | str | os.PathLike,
    images: ImageLike | Sequence[ImageLike] | torch.Tensor,
    mask_ratio: float = 0.75,
    seed: int = 0,
    output: str | os.PathLike | None = None,
    processor: Any = None,
    dtype: torch.dtype | str | None = None,
) -> Reconstruction:
    """Mask ``mask_ratio`` of each image's patches (random, reproducible by ``seed``) and reconstruct them.

    Args:
        model: a ``ViTMAEForPreTraining`` or the path of a converted ``vit_mae`` directory.
        images: as for :func:`extract_features`.
        mask_ratio: fraction of patches hidden from the encoder, in ``[0, 1)``.
        seed: seed of the masking noise; the same seed masks the same patches.
        output: if given, write a PNG grid (one row per image: original, masked, reconstruction,
            reconstruction with the visible patches pasted back) there.
        processor: image processor (default: the model's, see :func:`processor_for`).
        dtype: move the model to this dtype first: a torch dtype or a precision name such as ``"auto"``
            (see :mod:`usfmae_hf.precision`); default: leave it as it is.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not isinstance(model, ViTMAEForPreTraining):
        model = _load_pretraining_model(Path(model))
    _place(model, None, dtype)
    processor = processor or processor_for(model)
    pixel_values = torch.cat(list(_batches(images, 64, processor)))
    parameter = next(model.parameters())
    num_patches = model.vit.embeddings.patch_embeddings.num_patches
    noise = torch.rand(pixel_values.shape[0], num_patches, generator=torch.Generator().manual_seed(seed))
    inputs = pixel_values.to(device=parameter.device, dtype=parameter.dtype)  # pixel_values stay fp32, on CPU
    saved_ratio = model.config.mask_ratio
    model.config.mask_ratio = float(mask_ratio)
    try:
        outputs = model(pixel_values=inputs, noise=noise.to(parameter.device))
    finally:
        model.config.mask_ratio = saved_ratio
    logits, mask = outputs.logits.float().cpu(), outputs.mask.float().cpu()
    if model.config.norm_pix_loss:
        logits = _unnormalise_patches(model, pixel_values, logits, mask)
    patch_mask = mask.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    image_mask = model.unpatchify(patch_mask)
    reconstructed = model.unpatchify(logits)
    grey = torch.zeros_like(pixel_values)  # 0 after normalisation = ImageNet mean grey
    result = Reconstruction(
        original=_to_uint8_images(pixel_values),
        masked=_to_uint8_images(torch.where(image_mask.bool(), grey, pixel_values)),
        reconstruction=_to_uint8_images(reconstructed),
        pasted=_to_uint8_images(torch.where(image_mask.bool(), reconstructed, pixel_values)),
        mask=image_mask[:, 0].bool().cpu().numpy(),
    )
    if output is not None:
        save_reconstruction_grid(result, output)
    return result


def _load_pretraining_model(path: Path) -> ViTMAEForPreTraining:
    if model_type(path) != "vit_mae":
        raise UsfmaeError(f"{path}: reconstruction needs the MAE decoder; convert with --format vitmae")
    return ViTMAEForPreTraining.from_pretrained(path)


def save_reconstruction_grid(
    result: Reconstruction, output: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``result`` as a PNG grid (rows: images; columns: original, masked, reconstruction, pasted).

    ``metadata`` is stored as PNG text chunks (``PIL.Image.open(output).text``).
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the user's matplotlib backend alone

    columns = ("original", "masked", "reconstruction", "reconstruction + visible")
    rows = len(result.original)
    figure = Figure(figsize=(12, 3 * rows))
    axes = figure.subplots(rows, 4, squeeze=False)
    for row in range(rows):
        panels = (result.original, result.masked, result.reconstruction, result.pasted)
        for column, (title, images) in enumerate(zip(columns, panels)):
            axes[row, column].imshow(images[row])
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata=dict(metadata or {}))
    output = Path(output)
    atomic_write_bytes(output, buffer.getvalue())
    return output
