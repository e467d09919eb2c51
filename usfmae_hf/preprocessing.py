"""USF-MAE's evaluation preprocessing as a Hugging Face image processor.

USF-MAE evaluated with ``convert("RGB") -> Resize((224, 224), NEAREST) -> ToTensor -> Normalize(ImageNet)``
(aspect ratio not kept). ``ViTImageProcessor`` with ``resample=NEAREST`` and ImageNet mean/std
reproduces it; we always use the torchvision-backed ("fast") processor so that training and
evaluation share one backend (the PIL one differs by up to ~0.02, see NOTES).
"""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NEAREST = 0  # PIL.Image.Resampling.NEAREST / transformers' PILImageResampling.NEAREST


def build_image_processor(image_size: int = 224):
    """Return the ``ViTImageProcessor`` that reproduces USF-MAE's evaluation transform."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
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
