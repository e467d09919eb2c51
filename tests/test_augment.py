"""Tests for usfmae_hf.image.augment: recipes equal torchvision's own (v1) reference pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms import v2

from usfmae_hf.image.augment import (
    PerSample,
    ToRGB,
    build_eval_transform,
    build_split_train_transform,
    build_train_transform,
)
from usfmae_hf.image.processor import IMAGENET_MEAN, IMAGENET_STD, build_image_processor


def _random_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


def _ramp(height: int = 90, width: int = 120) -> Image.Image:
    """A smooth test image: interpolation kernels differ least on it."""
    ramp = np.stack(np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height)), -1)[..., [0, 1, 0]]
    return Image.fromarray(ramp.astype(np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_to_rgb_matches_pil_convert(mode):
    image = _random_image(7, 9, mode)
    expected = np.array(image.convert("RGB"))
    assert np.array_equal(np.array(ToRGB()(image)), expected)
    assert np.array_equal(np.array(ToRGB()(np.array(image))), expected)
    tensor = torch.from_numpy(np.array(image)).reshape(7, 9, -1).permute(2, 0, 1)
    assert torch.equal(ToRGB()(tensor).as_subclass(torch.Tensor), torch.from_numpy(expected).permute(2, 0, 1))


@pytest.mark.parametrize("size,mode", [((50, 37), "RGB"), ((20, 64), "L"), ((480, 640), "RGB")])
def test_eval_transform_equals_image_processor_exactly(size, mode):
    # (Images with alpha differ on purpose: transformers composites onto white, USF-MAE's convert("RGB") drops it.)
    image = _random_image(*size, mode=mode, seed=1)
    expected = build_image_processor(32)(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(build_eval_transform(32)(image), expected)
    assert torch.equal(build_eval_transform(32)(np.array(image)), expected)


def _reference_train_transform(recipe: str, size: int) -> v1.Compose:
    """The recipes as USF-MAE's and MAE's code spell them: torchvision v1 on PIL images."""
    tail = [v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if recipe == "usfmae":
        return v1.Compose(
            [
                v1.Resize((size, size), interpolation=v1.InterpolationMode.NEAREST),
                v1.RandomRotation((0, 90)),
                v1.RandomHorizontalFlip(0.5),
                v1.RandomVerticalFlip(0.5),
                v1.RandomResizedCrop(size, scale=(0.5, 2.0)),
                *tail,
            ]
        )
    return v1.Compose([v1.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=3), v1.RandomHorizontalFlip(), *tail])


@pytest.mark.parametrize("recipe", ["usfmae", "mae"])
def test_train_transform_equals_torchvision_pil_reference(recipe):
    image = _random_image(90, 120, seed=2)
    ours, reference = build_train_transform(recipe, 64), _reference_train_transform(recipe, 64)
    for seed in range(6):
        torch.manual_seed(seed)
        got = ours(image)
        torch.manual_seed(seed)
        assert torch.equal(got, reference(image))


@pytest.mark.parametrize("recipe", ["usfmae", "mae"])
def test_tensor_kernels_agree_with_pil_kernels(recipe):
    """Same parameters from the same seed; tensor and PIL interpolation agree to ~1 grey level."""
    image = _ramp()
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    transform = build_train_transform(recipe, 64)
    for seed in range(6):
        torch.manual_seed(seed)
        from_pil = transform(image)
        torch.manual_seed(seed)
        from_tensor = transform(tensor)
        assert from_tensor.shape == (3, 64, 64) and from_tensor.dtype == torch.float32
        grey_levels = (from_tensor - from_pil).abs() * torch.tensor(IMAGENET_STD)[:, None, None] * 255
        assert grey_levels.mean() < 0.05 and (grey_levels > 2.5).float().mean() < 1e-3 and grey_levels.max() < 8


def test_float_tensors_are_taken_as_unit_range():
    tensor = torch.from_numpy(np.array(_random_image(32, 32, seed=4))).permute(2, 0, 1)
    transform = build_eval_transform(32)
    torch.testing.assert_close(transform(tensor.float() / 255), transform(tensor), rtol=0, atol=1e-5)


def test_train_transform_draws_parameters_per_sample():
    image = _random_image(32, 32, seed=3)
    transform = build_train_transform("usfmae", 32)
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(4)]
    assert all(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_usfmae_crop_scale_semantics_follow_torchvision():
    """scale=(0.5, 2.0) is not clamped: oversized draws are rejected, leaving 50-100% of the image."""
    (crop,) = [t for t in build_train_transform("usfmae", 32).transforms if isinstance(t, v2.RandomResizedCrop)]
    assert crop.scale == (0.5, 2.0)
    torch.manual_seed(0)
    probe = torch.zeros(3, 224, 224)
    fractions = np.array([(p["height"] * p["width"]) / 224**2 for p in (crop.make_params([probe]) for _ in range(400))])
    assert fractions.min() >= 0.5 * 0.99 and fractions.max() <= 1.0
    assert (fractions == 1.0).any()  # the whole-image fallback after 10 oversized draws


def test_split_transform_composes_to_full_transform_on_tensors():
    images = [_random_image(40, 30, seed=s) for s in range(3)]
    worker, device = build_split_train_transform("usfmae", 32)
    batch = torch.stack([worker(image) for image in images])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 32, 32)
    full = build_train_transform("usfmae", 32)
    torch.manual_seed(5)
    split = device(batch)
    torch.manual_seed(5)
    assert torch.equal(split, torch.stack([full(sample) for sample in batch]))

    seeds = [11, 12, 13]
    seeded = device(batch, seeds)
    assert torch.equal(seeded[1:], device(batch[1:], seeds[1:]))  # a sample's result ignores its batch
    worker, device = build_split_train_transform("mae", 32)
    assert device(torch.stack([worker(image) for image in images])).shape == (3, 3, 32, 32)


def test_per_sample_runs_on_a_batch():
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert PerSample(v2.RandomHorizontalFlip(1.0))(batch).equal(batch.flip(-1))


def test_unknown_recipe_is_rejected():
    with pytest.raises(ValueError, match="unknown recipe"):
        build_train_transform("simclr")
