"""transformers ``pipeline()`` with USF-MAE's exact preprocessing.

``transformers.pipeline(task, model=directory)`` loads the directory's image processor with the
default (torchvision) backend, whose NEAREST resize samples other source pixels than PIL's wherever
the scale is not an integer (640x480 -> 224: up to 4.5 in normalised units off). :func:`pipeline`
passes the exact PIL-backend processor (:func:`usfmae_hf.image.processor.load_image_processor`)
instead, and for ``image-feature-extraction`` the encoder as a plain ``ViTModel``
(:func:`usfmae_hf.inference.features.load_encoder`: no masking, tokens in order), so its outputs
equal :func:`usfmae_hf.inference.extract_features`, a classifier's logits on the exact
``pixel_values``, and :func:`usfmae_hf.inference.predict_masks`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.image.processor import load_image_processor
from usfmae_hf.inference.features import load_encoder
from usfmae_hf.inference.segmentation import load_segmenter

TASKS: tuple[str, ...] = ("image-feature-extraction", "image-classification", "image-segmentation")
#: largest difference of two processors' pixel_values counted as float rounding (one grey level is ~0.017)
ROUNDING = 1e-4

__all__ = ["ROUNDING", "TASKS", "default_backend_difference", "pipeline"]


def _classifier_directory(path: Path) -> str:
    """``path`` as a string, once its config names an image-classification architecture."""
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    if not any(name.endswith("ForImageClassification") for name in architectures):
        raise UsfmaeError(
            f"{path}: not an image classifier (config.json architectures: {architectures or 'none'}); fine-tune one "
            "with `usfmae finetune`, or use 'image-feature-extraction' on an encoder"
        )
    return str(path)


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """transformers' ``dtype`` argument as a torch dtype; ``None`` for ``"auto"`` (as stored)."""
    if dtype is None or dtype == "auto":
        return None
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def pipeline(task: str, model: str | os.PathLike, **kwargs: Any):
    """A transformers pipeline for a local USF-MAE directory, preprocessing exactly as USF-MAE did.

    Args:
        task: ``"image-feature-extraction"`` (a converted ``vit_mae`` or ``vit`` directory: outputs the
            final LayerNorm's tokens, CLS first; ``pool=True`` is unavailable, the encoder has no pooler),
            ``"image-classification"`` (a fine-tuned classifier directory; a ``mean``-head one needs
            ``trust_remote_code=True``) or ``"image-segmentation"`` (a fine-tuned DPT directory).
        model: the model directory; its ``preprocessor_config.json`` is loaded with the PIL backend.
        **kwargs: passed to ``transformers.pipeline`` (``device``, ``dtype``, ``batch_size``,
            ``trust_remote_code``, ...); an ``image_processor`` given here replaces the exact one.

    Raises:
        UsfmaeError: an unsupported task, or a directory that does not hold a model for it.
    """
    import transformers

    if task not in TASKS:
        raise UsfmaeError(f"unsupported pipeline task {task!r}; choose one of {', '.join(TASKS)}")
    path = Path(model)
    if not (path / "config.json").is_file():
        raise UsfmaeError(f"{path}: not a model directory (no config.json)")
    kwargs.setdefault("image_processor", load_image_processor(path))
    if task == "image-classification":
        loaded = _classifier_directory(path)
    else:
        # transformers ignores ``dtype`` for a model passed as an object: apply it while loading.
        dtype = _torch_dtype(kwargs.pop("dtype", None))
        loaded = (load_encoder if task == "image-feature-extraction" else load_segmenter)(path, dtype=dtype)
    return transformers.pipeline(task, model=loaded, **kwargs)


def default_backend_difference(processor: Any, images: Sequence[Image.Image | np.ndarray]) -> dict[str, float]:
    """How far the default-backend processor is from the exact ``processor`` on ``images``.

    The default-backend one is what ``AutoImageProcessor.from_pretrained`` gives for a directory
    holding ``processor`` (saved to a temporary directory and loaded back). Returns ``max`` and
    ``mean`` absolute difference of the ``pixel_values`` (normalised units, as the model sees them)
    and ``images_differing``: images off by more than float rounding (:data:`ROUNDING`).
    """
    import tempfile

    from transformers import AutoImageProcessor

    with tempfile.TemporaryDirectory() as directory:
        processor.save_pretrained(directory)
        default = AutoImageProcessor.from_pretrained(directory)
    largest, total, count, differing = 0.0, 0.0, 0, 0
    for image in images:
        difference = (
            default(image, return_tensors="pt")["pixel_values"] - processor(image, return_tensors="pt")["pixel_values"]
        ).abs()
        largest = max(largest, float(difference.max()))
        total += float(difference.sum())
        count += difference.numel()
        differing += bool(difference.max() > ROUNDING)
    if not count:
        raise ValueError("no images given")
    return {"max": largest, "mean": total / count, "images_differing": differing}
