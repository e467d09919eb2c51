"""The image processor reproduces USF-MAE's torchvision evaluation transform; optional ultrasound steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from usfmae_hf.image.cleanup import crop_to_scan_area, remove_annotations
from usfmae_hf.image.processor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    UltrasoundImageProcessor,
    build_image_processor,
    load_image_processor,
)
from usfmae_hf.io import load_frames, load_image


def usfmae_eval_transform(size: int):
    """USF-MAE's evaluation transform, as in its US_data_loading.py."""
    return transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.NEAREST),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def test_matches_usfmae_transform_on_real_dicom_frames(ultrasound_dicoms):
    reference = usfmae_eval_transform(224)
    processor = build_image_processor()
    images = [load_image(path) for path in ultrasound_dicoms.values()]
    cine = ultrasound_dicoms["color3d_jpeg_baseline.dcm"]
    images += [load_image(path).resize((333, 257)) for path in ultrasound_dicoms.values()]  # odd scales too
    arrays = [frame.image for frame in load_frames(cine, frame_stride=60)]
    expected = torch.stack([reference(image) for image in images])
    assert torch.max(torch.abs(processor(images, return_tensors="pt")["pixel_values"] - expected)) <= 1e-6
    expected = torch.stack([reference(Image.fromarray(a)) for a in arrays])
    assert torch.max(torch.abs(processor(arrays, return_tensors="pt")["pixel_values"] - expected)) <= 1e-6


def test_saved_default_is_a_plain_vit_processor(tmp_path, ultrasound_dicoms):
    from transformers import AutoImageProcessor

    build_image_processor(32).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "ViTImageProcessor" and config["resample"] == 0
    assert config["size"] == {"height": 32, "width": 32} and "crop_to_scan_area" not in config
    image = load_image(ultrasound_dicoms["US1_UNCR.dcm"])
    expected = usfmae_eval_transform(32)(image)
    for processor in (load_image_processor(tmp_path), AutoImageProcessor.from_pretrained(tmp_path, backend="pil")):
        assert torch.max(torch.abs(processor(image, return_tensors="pt")["pixel_values"][0] - expected)) <= 1e-6


def test_fallback_without_processor_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 48}))
    assert load_image_processor(tmp_path).size["height"] == 48


def test_ultrasound_steps_are_recorded_and_applied(tmp_path, ultrasound_dicoms):
    from transformers import AutoImageProcessor

    processor = build_image_processor(32, crop_to_scan_area=True, remove_annotations=True)
    assert isinstance(processor, UltrasoundImageProcessor)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "UltrasoundImageProcessor"
    assert config["crop_to_scan_area"] is True and config["remove_annotations"] is True
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, UltrasoundImageProcessor) and loaded.crop_to_scan_area and loaded.remove_annotations

    image = np.asarray(load_image(ultrasound_dicoms["JPGLosslessP14SV1_1s_1f_8b.dcm"]))
    cleaned = crop_to_scan_area(remove_annotations(image))
    expected = build_image_processor(32)(cleaned, return_tensors="pt")["pixel_values"]
    np.testing.assert_array_equal(loaded(image, return_tensors="pt")["pixel_values"], expected)

    crop_only = build_image_processor(32, crop_to_scan_area=True)
    assert json.loads(crop_only.to_json_string())["remove_annotations"] is False
    with pytest.raises(ValueError, match="uint8"):
        crop_only(image.astype(np.float32))


def _transparent_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(7)
    palette = Image.fromarray(rng.integers(0, 256, (97, 131), dtype=np.uint8), "L").convert("P")
    palette.info["transparency"] = 3
    return {
        "RGBA": Image.fromarray(rng.integers(0, 256, (97, 131, 4), dtype=np.uint8), "RGBA"),
        "LA": Image.fromarray(rng.integers(0, 256, (97, 131, 2), dtype=np.uint8), "LA"),
        "P+transparency": palette,
    }


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency"])
def test_alpha_is_dropped_as_pil_convert_rgb_does(mode, tmp_path):
    """USF-MAE's ``convert("RGB")`` drops alpha; transformers 5 would composite it onto white."""
    image = _transparent_images()[mode]
    reference = usfmae_eval_transform(224)(image.convert("RGB"))
    processor = build_image_processor(224)
    processor.save_pretrained(tmp_path)
    for candidate in (processor, load_image_processor(tmp_path)):
        ours = candidate(images=image, return_tensors="pt").pixel_values[0]
        assert torch.equal(ours, reference)
    if image.mode == "RGBA":  # the same for a channels-last uint8 array with an alpha channel
        ours = processor(images=np.asarray(image), return_tensors="pt").pixel_values[0]
        assert torch.equal(ours, reference)
    # the saved config stays a stock one that any transformers version loads
    assert (
        json.loads((tmp_path / "preprocessor_config.json").read_text())["image_processor_type"] == "ViTImageProcessor"
    )
