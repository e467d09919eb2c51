"""Training and evaluation image transforms for USF-MAE and the original MAE recipe.

The transforms take PIL images, uint8 ``H x W [x C]`` arrays or ``C x H x W`` tensors (uint8, or
float in [0, 1]) and return normalised float32 ``3 x S x S`` tensors. PIL and array inputs are
processed with PIL's kernels, which makes them equal USF-MAE's torchvision-on-PIL pipeline exactly
(same seed, same numbers); tensor inputs use torchvision's tensor kernels (on any device), which
agree to about one grey level. Random parameters are drawn per call, i.e. per sample, so the
transforms run in DataLoader workers; :class:`PerSample` applies them sample by sample to a batch
already on the accelerator.

The training transforms are torchvision's own (``transforms.v2``): USF-MAE used torchvision, so its
semantics are the reference. In particular ``RandomResizedCrop(scale=(0.5, 2.0))`` does not clamp
the scale: torchvision draws up to 10 (area, aspect) candidates, rejects any that do not fit inside
the image, and falls back to the whole image (for aspect ratios within 3/4..4/3). On USF-MAE's square
inputs a crop therefore covers 50-100% of the image, and the whole image is used whenever all
10 draws land above 100%.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from usfmae_hf.image.processor import IMAGENET_MEAN, IMAGENET_STD

Recipe = Literal["usfmae", "mae"]
RECIPES: tuple[str, ...] = ("usfmae", "mae")


class ToRGB(torch.nn.Module):
    """Make any input a 3-channel image: PIL images and uint8 arrays become RGB PIL images, tensors
    ``3 x H x W`` tensors (dtype kept).

    Grey images are copied to three channels and an alpha channel is dropped, as PIL's
    ``convert("RGB")`` does. PIL inputs stay PIL so that the following ops use PIL's kernels,
    exactly as USF-MAE's torchvision-on-PIL pipeline did; tensors use torchvision's tensor kernels.
    """

    def forward(self, image: Any) -> Image.Image | torch.Tensor:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            array = image if image.ndim == 3 else image[:, :, None]
            return Image.fromarray(np.ascontiguousarray(_rgb_channels(array, axis=2)), "RGB")
        tensor = torch.as_tensor(image)
        return tv_tensors.Image(_rgb_channels(tensor if tensor.ndim == 3 else tensor.unsqueeze(0), axis=0))


def _rgb_channels(image: Any, axis: int) -> Any:
    """Select/repeat channels along ``axis``: grey (+ alpha) -> 3 copies of grey, RGBA -> RGB."""
    channels = image.shape[axis]
    index = {1: [0, 0, 0], 2: [0, 0, 0], 3: [0, 1, 2], 4: [0, 1, 2]}.get(channels)
    if index is None:
        raise ValueError(f"expected an image with 1-4 channels, got shape {tuple(image.shape)}")
    if channels == 3:
        return image
    return image[:, :, index] if axis == 2 else image[index]


class RescaleNormalize(torch.nn.Module):
    """Map uint8 (0-255) or float (0-1) image tensors to float32 normalised by ImageNet mean and std.

    Computed as ``(x / 255 - mean) / std`` in float32, the order of ``ToTensor`` + ``Normalize`` and of
    :func:`usfmae_hf.image.processor.build_image_processor`, so the numbers agree bit for bit.
    """

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.mean, self.std = list(mean), list(std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        image = image.as_subclass(torch.Tensor)
        image = image.to(torch.float32) / 255 if image.dtype == torch.uint8 else image.to(torch.float32)
        return F.normalize(image, self.mean, self.std)


class PerSample(torch.nn.Module):
    """Apply ``transform`` to every sample of a ``B, C, H, W`` batch with its own random parameters.

    With ``seeds`` (one int per sample) each sample's parameters come from the CPU generator seeded
    with its seed, so results do not depend on the batch composition or on the device.
    """

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, batch: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        if seeds is None:
            return torch.stack([self._apply(sample) for sample in batch])
        outputs = []
        for sample, seed in zip(batch, seeds, strict=True):
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(int(seed))
                outputs.append(self._apply(sample))
        return torch.stack(outputs)

    def _apply(self, sample: torch.Tensor) -> torch.Tensor:
        return self.transform(tv_tensors.Image(sample)).as_subclass(torch.Tensor)


def _recipe_stages(recipe: str, image_size: int) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """Split a recipe's geometric ops into those that reach a fixed size and those applied after it."""
    size = (image_size, image_size)
    if recipe == "usfmae":
        # NEAREST_EXACT is PIL's NEAREST on PIL images and its closest tensor equivalent.
        to_fixed = [v2.Resize(size, interpolation=v2.InterpolationMode.NEAREST_EXACT)]
        at_fixed = [
            v2.RandomRotation((0, 90)),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomVerticalFlip(0.5),
            v2.RandomResizedCrop(image_size, scale=(0.5, 2.0)),
        ]
    elif recipe == "mae":
        to_fixed = [v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC)]
        at_fixed = [v2.RandomHorizontalFlip(0.5)]
    else:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return to_fixed, at_fixed


def build_train_transform(recipe: Recipe = "usfmae", image_size: int = 224) -> v2.Compose:
    """Return the full training transform of ``recipe``: any image -> normalised float32 ``3 x S x S``.

    ``usfmae``: RGB, ``Resize((S, S), NEAREST)``, ``RandomRotation((0, 90))``, horizontal and vertical
    flips (p=0.5), ``RandomResizedCrop(S, scale=(0.5, 2.0))``, ImageNet normalisation.
    ``mae``: RGB, ``RandomResizedCrop(S, scale=(0.2, 1.0), bicubic)``, horizontal flip, normalisation.
    """
    to_fixed, at_fixed = _recipe_stages(recipe, image_size)
    return v2.Compose([ToRGB(), *to_fixed, *at_fixed, v2.ToImage(), RescaleNormalize()])


def build_split_train_transform(recipe: Recipe = "usfmae", image_size: int = 224) -> tuple[v2.Compose, PerSample]:
    """Split the training transform between DataLoader workers and the accelerator.

    The worker part decodes to RGB and brings the image to ``S x S`` uint8 (cheap to collate and
    transfer); the device part takes the collated ``B x 3 x S x S`` batch and applies the remaining
    random ops per sample (tensor kernels, on the batch's device), then normalises. On the worker's
    output this equals :func:`build_train_transform` with the same random parameters.
    """
    to_fixed, at_fixed = _recipe_stages(recipe, image_size)
    return v2.Compose([ToRGB(), *to_fixed, v2.ToImage()]), PerSample(v2.Compose([*at_fixed, RescaleNormalize()]))


def build_eval_transform(image_size: int = 224) -> v2.Compose:
    """Return USF-MAE's evaluation transform: RGB, ``Resize((S, S), NEAREST)``, ImageNet normalisation.

    Gives the same numbers as ``build_image_processor(image_size)`` on PIL images and uint8 arrays
    (tensors are resized with torchvision's nearest-exact kernel, which can pick a neighbouring pixel).
    """
    return v2.Compose(
        [
            ToRGB(),
            v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.NEAREST_EXACT),
            v2.ToImage(),
            RescaleNormalize(),
        ]
    )
