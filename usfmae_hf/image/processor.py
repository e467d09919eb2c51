"""USF-MAE's evaluation preprocessing as a Hugging Face image processor.

USF-MAE evaluated with ``convert("RGB") -> Resize((224, 224), NEAREST) -> ToTensor -> Normalize(ImageNet)``
on PIL images (aspect ratio not kept). transformers 5 has two ViT processors: the default
torchvision one resizes tensors, and its NEAREST picks a neighbouring source pixel wherever the
scale is not an integer (640 -> 224: 20 of 224 columns), up to 4.5 in normalised units off;
``ViTImageProcessorPil`` resizes with PIL, as USF-MAE did, and matches it exactly. So:

* :func:`build_image_processor` returns a :class:`UsfmaeImageProcessor` (``ViTImageProcessorPil`` with
  USF-MAE's alpha handling). Its saved
  ``preprocessor_config.json`` is a plain ``ViTImageProcessor`` config that any transformers
  version loads; under transformers 5, ``AutoImageProcessor.from_pretrained(path, backend="pil")``
  (or :func:`load_image_processor`) gives the exact transform, the default backend the approximate one.
* With an optional ultrasound step on (``crop_to_scan_area``, ``remove_annotations``) it returns an
  :class:`UltrasoundImageProcessor` instead: the same PIL-backend processor that first cleans each
  image with :mod:`usfmae_hf.image.cleanup`. Its config records the steps and names its own class, so
  a library that does not know the steps fails to load it instead of silently skipping them;
  importing this module registers it with ``AutoImageProcessor``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import AutoImageProcessor, DPTImageProcessorPil, PreTrainedConfig, ViTImageProcessorPil

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NEAREST = 0  # PIL.Image.Resampling.NEAREST / transformers' PILImageResampling.NEAREST
PROCESSOR_CONFIG_NAME = "preprocessor_config.json"


class _AlphaDroppingRGB:
    """PIL-backend processor mixin whose RGB step is PIL's ``convert("RGB")``, as in USF-MAE.

    transformers 5 composites RGBA, LA and transparent-palette images onto white before converting;
    ``convert("RGB")`` (what USF-MAE trained with) drops the alpha channel instead. A stock
    transformers install loading the saved config composites alpha onto white: the one difference
    left on that path.
    """

    def convert_to_rgb(self, image: Any, input_data_format: Any = None) -> np.ndarray:
        if isinstance(image, Image.Image):
            return np.asarray(image.convert("RGB"))
        if isinstance(image, np.ndarray) and image.ndim == 3:
            from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

            if input_data_format is None:
                input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
            channel_axis = -1 if input_data_format == ChannelDimension.LAST else 0
            if image.shape[channel_axis] == 4:
                return np.moveaxis(np.moveaxis(image, channel_axis, -1)[..., :3], -1, channel_axis)
        return super().convert_to_rgb(image, input_data_format=input_data_format)


class UsfmaeImageProcessor(_AlphaDroppingRGB, ViTImageProcessorPil):
    """``ViTImageProcessorPil`` with USF-MAE's alpha handling; saves a plain ``ViTImageProcessor`` config,
    so a stock transformers install still loads the directory."""

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["image_processor_type"] = "ViTImageProcessor"
        return output


class UsfmaeSegmentationProcessor(_AlphaDroppingRGB, DPTImageProcessorPil):
    """``DPTImageProcessorPil`` set to USF-MAE's transform, for segmentation models.

    The same resize (square, NEAREST, aspect ratio not kept) and normalisation as
    :class:`UsfmaeImageProcessor`, plus DPT's ``post_process_semantic_segmentation``, which
    ``pipeline("image-segmentation")`` needs to turn logits into masks at the input's size. Saves a
    plain ``DPTImageProcessor`` config.
    """

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["image_processor_type"] = "DPTImageProcessor"
        return output


class UltrasoundImageProcessor(UsfmaeImageProcessor):
    """``ViTImageProcessorPil`` preceded by optional ultrasound clean-up of each image.

    Args:
        crop_to_scan_area: crop each image to its scan area (:func:`usfmae_hf.image.cleanup.crop_to_scan_area`).
        remove_annotations: inpaint burned-in text, calipers and coloured markers
            (:func:`usfmae_hf.image.cleanup.remove_annotations`); done before cropping.
        **kwargs: ``ViTImageProcessorPil`` arguments.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, crop_to_scan_area: bool = False, remove_annotations: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crop_to_scan_area = crop_to_scan_area
        self.remove_annotations = remove_annotations

    def clean(self, image: Any) -> np.ndarray:
        """Apply the enabled ultrasound steps to one PIL image or uint8 ``(H, W[, C])`` array; return RGB uint8."""
        from usfmae_hf.image.cleanup import crop_to_scan_area, remove_annotations
        from usfmae_hf.io.pixels import to_rgb_uint8

        if isinstance(image, Image.Image):
            array = np.asarray(image.convert("RGB"))
        elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
            array = to_rgb_uint8(image)
        else:
            raise ValueError(
                "ultrasound preprocessing steps take PIL images or uint8 (H, W[, C]) arrays, "
                f"got {type(image).__name__}"
            )
        if self.remove_annotations:
            array = remove_annotations(array)
        if self.crop_to_scan_area:
            array = crop_to_scan_area(array)
        return array

    def preprocess(self, images: Any, *args: Any, **kwargs: Any):
        """Clean each image (:meth:`clean`), then resize, rescale and normalise as ``ViTImageProcessorPil``."""
        if self.crop_to_scan_area or self.remove_annotations:
            images = [self.clean(image) for image in (images if isinstance(images, (list, tuple)) else [images])]
        return super().preprocess(images, *args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["image_processor_type"] = type(self).__name__
        return output


class _UltrasoundProcessorKey(PreTrainedConfig):
    """Registration key only: ``AutoImageProcessor.register`` indexes classes by a config class."""

    model_type = "usfmae_ultrasound_image_processor"


AutoImageProcessor.register(
    _UltrasoundProcessorKey,
    image_processor_classes={"pil": UltrasoundImageProcessor, "torchvision": UltrasoundImageProcessor},
    exist_ok=True,
)


def _usfmae_settings(image_size: int) -> dict[str, Any]:
    """USF-MAE's evaluation transform as image-processor keyword arguments."""
    return dict(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=NEAREST,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def build_image_processor(
    image_size: int = 224, *, crop_to_scan_area: bool = False, remove_annotations: bool = False
) -> ViTImageProcessorPil:
    """Return the image processor that reproduces USF-MAE's evaluation transform exactly.

    Args:
        image_size: output height and width (the model's ``image_size``).
        crop_to_scan_area: first crop each image to its scan area (off in USF-MAE).
        remove_annotations: first inpaint burned-in annotations (USF-MAE did this offline, before training).
    """
    kwargs = _usfmae_settings(image_size)
    if crop_to_scan_area or remove_annotations:
        return UltrasoundImageProcessor(
            crop_to_scan_area=crop_to_scan_area, remove_annotations=remove_annotations, **kwargs
        )
    return UsfmaeImageProcessor(**kwargs)


def build_segmentation_processor(image_size: int = 224) -> UsfmaeSegmentationProcessor:
    """The segmentation counterpart of :func:`build_image_processor`: the same numbers, DPT's post-processing."""
    return UsfmaeSegmentationProcessor(
        **_usfmae_settings(image_size),
        keep_aspect_ratio=False,
        ensure_multiple_of=1,
        do_pad=False,
        do_reduce_labels=False,
    )


def load_image_processor(
    path: str | os.PathLike, *, image_size: int | None = None
) -> UsfmaeImageProcessor | UsfmaeSegmentationProcessor:
    """Load the exact (PIL-backend) processor saved in a model directory.

    Falls back to :func:`build_image_processor` with ``image_size`` (or the directory's
    ``config.json`` ``image_size``) when the directory has no ``preprocessor_config.json``.
    """
    path = Path(path)
    config_file = path / PROCESSOR_CONFIG_NAME
    if config_file.is_file():
        processor_type = json.loads(config_file.read_text()).get("image_processor_type")
        if processor_type == UltrasoundImageProcessor.__name__:
            return AutoImageProcessor.from_pretrained(path, backend="pil")
        if processor_type == "DPTImageProcessor":
            return UsfmaeSegmentationProcessor.from_pretrained(path)
        # A plain ViT config: the same settings, with USF-MAE's alpha handling.
        return UsfmaeImageProcessor.from_pretrained(path)
    if image_size is None:
        image_size = int(json.loads((path / "config.json").read_text())["image_size"])
    return build_image_processor(image_size)
