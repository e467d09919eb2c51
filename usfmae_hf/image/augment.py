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

``mae_finetune`` is the training transform of MAE's fine-tuning (``main_finetune.py`` through
``util/datasets.build_transform``), built by timm's own ``create_transform`` as MAE's code builds it:
``RandomResizedCrop(S, scale=(0.08, 1), bicubic)``, horizontal flip, RandAugment
``rand-m9-mstd0.5-inc1``, normalisation, ``RandomErasing(0.25, "pixel")``. It works on PIL images
(tensors are converted to 8-bit PIL first) and has no joint (segmentation) or split form.

:func:`build_segmentation_transform` applies the same recipes jointly to an image and its label
mask: one set of random parameters per call for both, the image resampled as above, the mask by
nearest neighbour on the same pixel-centre grid (so no new label values appear), rotated-in corners
filled with 0 in both (black image, background label).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from usfmae_hf.image.processor import IMAGENET_MEAN, IMAGENET_STD

Recipe = Literal["usfmae", "mae", "mae_finetune"]
RECIPES: tuple[str, ...] = ("usfmae", "mae", "mae_finetune")
#: the recipes made of torchvision geometric ops only: they have joint (image + mask) and split forms
GEOMETRIC_RECIPES: tuple[str, ...] = ("usfmae", "mae")


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


def _usfmae_resize(image_size: int) -> v2.Resize:
    """USF-MAE's ``Resize((S, S), NEAREST)``, aspect ratio not kept.

    NEAREST_EXACT is PIL's NEAREST on PIL images and its closest tensor equivalent.
    """
    return v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.NEAREST_EXACT)


def _recipe_stages(recipe: str, image_size: int) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """Split a recipe's geometric ops into those that reach a fixed size and those applied after it."""
    if recipe == "usfmae":
        to_fixed = [_usfmae_resize(image_size)]
        at_fixed = [
            v2.RandomRotation((0, 90)),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomVerticalFlip(0.5),
            v2.RandomResizedCrop(image_size, scale=(0.5, 2.0)),
        ]
    elif recipe == "mae":
        to_fixed = [v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC)]
        at_fixed = [v2.RandomHorizontalFlip(0.5)]
    elif recipe in RECIPES:
        raise ValueError(f"recipe {recipe!r} has no joint or split form; choose one of {', '.join(GEOMETRIC_RECIPES)}")
    else:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return to_fixed, at_fixed


def build_train_transform(recipe: Recipe = "usfmae", image_size: int = 224) -> v2.Compose:
    """Return the full training transform of ``recipe``: any image -> normalised float32 ``3 x S x S``.

    ``usfmae``: RGB, ``Resize((S, S), NEAREST)``, ``RandomRotation((0, 90))``, horizontal and vertical
    flips (p=0.5), ``RandomResizedCrop(S, scale=(0.5, 2.0))``, ImageNet normalisation.
    ``mae``: RGB, ``RandomResizedCrop(S, scale=(0.2, 1.0), bicubic)``, horizontal flip, normalisation
    (MAE's pretraining augmentation). ``mae_finetune``: see :func:`build_mae_finetune_transform`.
    """
    if recipe == "mae_finetune":
        return build_mae_finetune_transform(image_size)
    to_fixed, at_fixed = _recipe_stages(recipe, image_size)
    return v2.Compose([ToRGB(), *to_fixed, *at_fixed, v2.ToImage(), RescaleNormalize()])


class ToPIL(torch.nn.Module):
    """Pass PIL images through; make ``3 x H x W`` tensors (uint8, or float in [0, 1]) 8-bit RGB PIL images."""

    def forward(self, image: Image.Image | torch.Tensor) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        return F.to_pil_image(image.as_subclass(torch.Tensor), mode="RGB")


def build_mae_finetune_transform(image_size: int = 224) -> v2.Compose:
    """MAE's fine-tuning training transform: RGB, then timm's ``create_transform`` with MAE's arguments.

    The arguments are ``main_finetune.py``'s defaults as ``util/datasets.build_transform`` passes them
    (``color_jitter=None``, ``auto_augment="rand-m9-mstd0.5-inc1"``, bicubic, ``re_prob=0.25``,
    ``re_mode="pixel"``, ``re_count=1``, ImageNet mean and std): a bicubic ``RandomResizedCrop(S,
    scale=(0.08, 1.0))``, horizontal flip, RandAugment (2 ops, magnitude 9 +- 0.5), to tensor, normalise,
    and random erasing of one box with per-pixel normal noise in a quarter of the images. timm draws from
    Python's ``random`` and torch's generators. Any image input: RGB as :class:`ToRGB`, tensors converted to
    8-bit PIL images first (timm's ops work on PIL images).
    Pillow 13 refuses ``ImageOps.posterize(image, 0)``, which timm's RandAugment asks for when a magnitude
    draw reaches 10 (about 0.15% of images; the run would stop with ``bits must be between ... 1 and 8``): the
    posterize ops here keep 0 bits as the Pillow of MAE's time did, giving a black image (see
    :func:`_posterize`), and equal timm's otherwise.
    """
    from timm.data import auto_augment, create_transform

    timm_transform = create_transform(
        input_size=image_size,
        is_training=True,
        color_jitter=None,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    for transform in timm_transform.transforms:
        for op in getattr(transform, "ops", ()):
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize
    return v2.Compose([ToRGB(), ToPIL(), timm_transform])


def _posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's ``posterize``, with 0 bits kept giving the black image Pillow computed before it refused 0."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


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
    return v2.Compose([ToRGB(), _usfmae_resize(image_size), v2.ToImage(), RescaleNormalize()])


class LabelMask(tv_tensors.Mask):
    """A label mask that every resampling op samples on the image's pixel-centre grid.

    torchvision resizes plain :class:`~torchvision.tv_tensors.Mask`\\ s inside ``resized_crop`` with
    ``nearest`` (source pixel ``floor(i * scale)``), while the image's bilinear, bicubic and PIL
    kernels sample at pixel centres (``floor((i + 0.5) * scale)``): the mask would trail the image by
    up to one source pixel. Here both resize paths use ``nearest-exact``, which is still nearest
    neighbour (no new label values). Rotation already samples masks at pixel centres. Always
    ``1 x H x W`` (see :class:`JointTransform`).
    """


@F.register_kernel(F.resize, LabelMask)
def _resize_label_mask(
    mask: LabelMask, size: list[int] | None, max_size: int | None = None, **kwargs: Any
) -> LabelMask:
    output = F.resize_image(
        mask.as_subclass(torch.Tensor), size, interpolation=v2.InterpolationMode.NEAREST_EXACT, max_size=max_size
    )
    return tv_tensors.wrap(output, like=mask)


@F.register_kernel(F.resized_crop, LabelMask)
def _resized_crop_label_mask(
    mask: LabelMask, top: int, left: int, height: int, width: int, size: list[int], **kwargs: Any
) -> LabelMask:
    cropped = F.crop_mask(mask.as_subclass(torch.Tensor), top, left, height, width)
    output = F.resize_image(cropped, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return tv_tensors.wrap(output, like=mask)


def _as_label_mask(mask: Any) -> LabelMask:
    """A PIL label mask (mode ``L``, ``P``, ``I``...; values are label ids), array or tensor -> ``1 x H x W`` uint8."""
    if isinstance(mask, Image.Image):
        if mask.mode not in ("1", "L", "P", "I", "I;16"):
            raise ValueError(f"a label mask must be a single-channel image of label ids, got mode {mask.mode}")
        mask = np.array(mask)
    values = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"a label mask must be H x W, got shape {tuple(values.shape)}")
    if values.is_floating_point() or values.min() < 0 or values.max() > 255:
        raise ValueError("label ids must be integers in 0..255")
    return LabelMask(values.to(torch.uint8).unsqueeze(0))


class JointTransform(torch.nn.Module):
    """Apply geometric ops to an image and its label mask with one set of random parameters.

    Call with ``(image, mask)``: the image as for the image-only transforms (PIL, uint8 array or
    tensor), the mask a single-channel PIL image (mode ``L`` or ``P``: the stored values are the label
    ids; a ``P`` palette is ignored), an ``H x W`` integer array or tensor, of the same size. Returns
    ``(pixel_values, labels)``: normalised float32 ``3 x S x S`` and int64 ``S x S``.
    """

    def __init__(self, geometric: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.to_rgb = ToRGB()
        self.geometric = v2.Compose(list(geometric))
        self.finish = v2.Compose([v2.ToImage(), RescaleNormalize()])

    def forward(self, image: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.to_rgb(image), _as_label_mask(mask)
        image_size = tuple(image.size[::-1]) if isinstance(image, Image.Image) else tuple(image.shape[-2:])
        if image_size != tuple(labels.shape[-2:]):
            raise ValueError(f"image size {image_size} and mask size {tuple(labels.shape[-2:])} differ (H, W)")
        image, labels = self.geometric(image, labels)
        return self.finish(image), labels.as_subclass(torch.Tensor)[0].to(torch.int64)


def build_segmentation_transform(
    recipe: Recipe | None = None, image_size: int = 224, train: bool = False
) -> JointTransform:
    """Return the joint image + label-mask transform of ``recipe``.

    With ``train=False`` (or ``recipe=None``) it is the evaluation transform: the image exactly as
    :func:`build_eval_transform`, the mask resized to ``S x S`` by nearest neighbour on the same grid
    (what PIL's ``NEAREST`` gives). With ``train=True`` the recipe's random ops run on both, with the
    parameters :func:`build_train_transform` would draw from the same random state, so the image
    equals its output: ``usfmae`` resizes, rotates by 0-90 degrees, flips both ways and takes a
    ``RandomResizedCrop(S, scale=(0.5, 2.0))``; ``mae`` takes a bicubic ``RandomResizedCrop(S, scale=(0.2,
    1.0))`` and a horizontal flip. Masks are only ever resampled by nearest neighbour, so they keep
    their label values; corners rotated into view are 0 in both (black image, background label - the
    black outside an ultrasound sector is background too, and no ignore index has to reach the loss).
    """
    if not train or recipe is None:
        return JointTransform([_usfmae_resize(image_size)])
    to_fixed, at_fixed = _recipe_stages(recipe, image_size)
    return JointTransform([*to_fixed, *at_fixed])
