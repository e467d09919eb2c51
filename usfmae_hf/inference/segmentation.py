"""Masks from fine-tuned USF-MAE segmentation models, at each input's own size, and the pictures that show them.

:func:`predict_masks` preprocesses images exactly as USF-MAE did (the PIL-backend processor saved beside
the model), runs the model, resizes the logits bilinearly to each image's size and takes the arg-max:
what DPT's ``post_process_semantic_segmentation`` does, so the masks equal ``pipeline("image-segmentation")``
with the same processor. :func:`mask_png` writes a mask as a palette PNG whose pixel values are the
label ids; :func:`overlay_png` draws image, ground truth and prediction side by side.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, DPTForSemanticSegmentation

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.image.processor import build_segmentation_processor, load_image_processor
from usfmae_hf.inference.features import ImageLike, _as_image, _place
from usfmae_hf.model.loading import quiet_loading_report

#: colours of label ids 1..: background (0) stays transparent in overlays and black in mask PNGs
LABEL_COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)
OVERLAY_ALPHA = 0.45


@dataclass(frozen=True)
class SegmentationPrediction:
    """One image's prediction at the image's own size.

    Attributes:
        mask: ``(H, W)`` uint8 label ids (arg-max over classes).
        confidence: ``(H, W)`` float32 softmax probability of the predicted class.
    """

    mask: np.ndarray
    confidence: np.ndarray


def load_segmenter(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> DPTForSemanticSegmentation:
    """Load a segmentation model written by ``training/finetune_segmentation.py`` (a DPT directory), in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsfmaeError(f"{path}: not a model directory (no config.json)")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type != "dpt":
        raise UsfmaeError(
            f"{path}: holds a {model_type!r} model, not a segmentation model (fine-tune one with "
            "`usfmae finetune-segmentation`)"
        )
    with quiet_loading_report():
        model = DPTForSemanticSegmentation.from_pretrained(path)
    return _place(model, device, dtype)


def segmentation_processor_for(model: torch.nn.Module):
    """The exact (PIL-backend) processor saved beside ``model``, else USF-MAE's at the model's image size."""
    source = getattr(model.config, "_name_or_path", "")
    if source and (Path(source) / "preprocessor_config.json").is_file():
        return load_image_processor(source)
    return build_segmentation_processor(model.config.image_size)


def masks_from_logits(logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[SegmentationPrediction]:
    """Resize each image's logits bilinearly to its ``(height, width)`` and take the arg-max and its probability."""
    predictions = []
    for image_logits, size in zip(logits.float(), sizes, strict=True):
        resized = torch.nn.functional.interpolate(
            image_logits[None], size=tuple(size), mode="bilinear", align_corners=False
        )[0]
        confidence, mask = resized.softmax(dim=0).max(dim=0)
        predictions.append(SegmentationPrediction(mask.to(torch.uint8).numpy(), confidence.numpy()))
    return predictions


@torch.inference_mode()
def predict_masks(
    model: DPTForSemanticSegmentation,
    images: Sequence[ImageLike],
    *,
    batch_size: int = 8,
    processor=None,
) -> Iterator[SegmentationPrediction]:
    """Yield one :class:`SegmentationPrediction` per image, in input order, at the image's own size.

    Args:
        model: a model from :func:`load_segmenter` (any ``*ForSemanticSegmentation`` returning ``logits``).
        images: PIL images, uint8 arrays or file paths (first frame of each file).
        batch_size: images per forward pass.
        processor: image processor (default: :func:`segmentation_processor_for`).
    """
    processor = processor or segmentation_processor_for(model)
    parameter = next(model.parameters())
    for start in range(0, len(images), batch_size):
        batch = [_as_image(item) for item in images[start : start + batch_size]]
        sizes = [(image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2] for image in batch]
        pixel_values = processor(batch, return_tensors="pt")["pixel_values"]
        logits = model(pixel_values=pixel_values.to(device=parameter.device, dtype=parameter.dtype)).logits
        yield from masks_from_logits(logits.cpu(), sizes)


def _palette(num_labels: int) -> list[int]:
    colours = [(0, 0, 0)] + [LABEL_COLOURS[(index - 1) % len(LABEL_COLOURS)] for index in range(1, num_labels)]
    return [channel for colour in colours for channel in colour]


def mask_png(mask: np.ndarray, num_labels: int) -> bytes:
    """PNG bytes of a label-id mask: a palette image, so viewers show colours and ``np.array(Image.open(f))``
    gives back the ids."""
    if num_labels > 256:
        raise ValueError(f"a PNG mask holds at most 256 labels, got {num_labels}")
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(_palette(num_labels))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _overlay(image: Image.Image, mask: np.ndarray, num_labels: int) -> Image.Image:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = np.asarray(_palette(num_labels), dtype=np.float32).reshape(-1, 3)[np.asarray(mask, dtype=np.intp)]
    foreground = (np.asarray(mask) > 0)[..., None]
    blended = np.where(foreground, (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * colours, rgb)
    return Image.fromarray(blended.round().astype(np.uint8), "RGB")


def overlay_png(
    image: ImageLike, prediction: np.ndarray, num_labels: int, *, truth: np.ndarray | None = None, gap: int = 4
) -> bytes:
    """PNG bytes showing the image, the ground truth (when given) and the prediction side by side."""
    image = _as_image(image)
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    panels = [image.convert("RGB")]
    if truth is not None:
        panels.append(_overlay(image, truth, num_labels))
    panels.append(_overlay(image, prediction, num_labels))
    width = sum(panel.width for panel in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, image.height), (255, 255, 255))
    left = 0
    for panel in panels:
        canvas.paste(panel, (left, 0))
        left += panel.width + gap
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
