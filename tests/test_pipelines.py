"""``usfmae_hf.inference.pipelines.pipeline``: transformers pipelines with USF-MAE's exact preprocessing.

On a real 640x480 pydicom-data frame and a 48-px model (640 -> 48 is a non-integer scale, where the
default torchvision backend's NEAREST picks other source pixels than PIL's), each pipeline must equal
the package's own path and an independent numpy preprocessing, and differ from the pipeline that
transformers builds with the default backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.inference.pipelines import ROUNDING, default_backend_difference, pipeline

IMAGE_SIZE = 48
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def mae_dir(tmp_path_factory) -> Path:
    """A random tiny MAE at 48 px in the original layout, converted to a vit_mae directory."""
    from conftest import TINY_MAE_KWARGS

    from usfmae_hf.model.conversion import convert_checkpoint
    from usfmae_hf.model.reference_mae import ReferenceMAE

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("pipeline_mae")
    torch.save(
        ReferenceMAE.from_hf_config_kwargs({**TINY_MAE_KWARGS, "image_size": IMAGE_SIZE}).state_dict(), root / "m.pth"
    )
    convert_checkpoint(root / "m.pth", root / "hf", num_attention_heads=2, decoder_num_attention_heads=2)
    return root / "hf"


@pytest.fixture(scope="module")
def frame(ultrasound_dicoms) -> Image.Image:
    """The GE 640x480 RGB frame of US1_UNCR.dcm."""
    from usfmae_hf.io import load_frames

    return Image.fromarray(next(load_frames(ultrasound_dicoms["US1_UNCR.dcm"])).image)


def usfmae_pixels(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """USF-MAE's evaluation transform written out: RGB, PIL NEAREST resize, /255, ImageNet normalisation."""
    resized = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.NEAREST), dtype=np.float64)
    normalised = (resized / 255.0 - MEAN) / STD
    return torch.from_numpy(normalised.transpose(2, 0, 1)[None]).float()


def test_feature_extraction_equals_extract_features_and_the_written_out_transform(mae_dir, frame):
    from transformers import ViTImageProcessorPil

    from usfmae_hf.inference import extract_features, load_encoder

    extractor = pipeline("image-feature-extraction", model=mae_dir)
    assert isinstance(extractor.image_processor, ViTImageProcessorPil)
    tokens = extractor(frame, return_tensors=True)[0]
    encoder = load_encoder(mae_dir)
    assert tokens.shape == (1 + (IMAGE_SIZE // 8) ** 2, 32)
    torch.testing.assert_close(tokens[0], extract_features(encoder, frame, "cls")[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens[1:], extract_features(encoder, frame, "patches")[0], rtol=0, atol=1e-6)
    with torch.no_grad():
        independent = encoder(pixel_values=usfmae_pixels(frame)).last_hidden_state[0]
    torch.testing.assert_close(tokens, independent, rtol=0, atol=1e-5)

    default = transformers.pipeline(
        "image-feature-extraction", model=load_encoder(mae_dir), image_processor=str(mae_dir)
    )
    assert not isinstance(default.image_processor, ViTImageProcessorPil)
    assert (default(frame, return_tensors=True)[0] - tokens).abs().max() > 1e-2


def test_feature_extraction_applies_dtype(mae_dir, frame):
    extractor = pipeline("image-feature-extraction", model=mae_dir, dtype=torch.bfloat16)
    assert next(extractor.model.parameters()).dtype == torch.bfloat16
    assert extractor(frame, return_tensors=True).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def classifier_dir(mae_dir, tmp_path_factory) -> Path:
    """A mean-head classifier (saved with its code) whose head gives logits of order one."""
    from usfmae_hf.finetuning.heads import build_classifier
    from usfmae_hf.image.processor import load_image_processor

    torch.manual_seed(1)
    model = build_classifier(mae_dir, ["benign", "malignant", "normal"], head="mean")
    with torch.no_grad():
        model.classifier.weight.normal_()
    out = tmp_path_factory.mktemp("pipeline_classifier") / "classifier"
    model.save_pretrained(out)
    load_image_processor(mae_dir).save_pretrained(out)
    return out


def _logits(results: list[dict], labels: list[str]) -> torch.Tensor:
    scores = {item["label"]: item["score"] for item in results}
    return torch.tensor([scores[label] for label in labels])


def test_classification_equals_the_classifier_on_exact_pixels(classifier_dir, frame):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(classifier_dir, trust_remote_code=True).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    with torch.no_grad():
        expected = model(pixel_values=usfmae_pixels(frame)).logits[0]

    classifier = pipeline("image-classification", model=classifier_dir, trust_remote_code=True)
    logits = _logits(classifier(frame, function_to_apply="none", top_k=None), labels)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)

    default = transformers.pipeline("image-classification", model=str(classifier_dir), trust_remote_code=True)
    default_logits = _logits(default(frame, function_to_apply="none", top_k=None), labels)
    assert (default_logits - expected).abs().max() > 1e-3


@pytest.fixture(scope="module")
def segmenter_dir(mae_dir, frame, tmp_path_factory) -> Path:
    """A DPT segmenter on the tiny encoder with its exact (DPT PIL-backend) processor.

    A fresh DPT's logits are ~1e-7 with margins at float-rounding level; its convolutions are re-drawn
    (He-normal) and the last bias set so that each class covers about half of ``frame``, with margins
    of order one.
    """
    from usfmae_hf.finetuning.segmenter import build_segmenter
    from usfmae_hf.image.processor import build_segmentation_processor

    torch.manual_seed(2)
    model = build_segmenter(mae_dir, ["background", "lesion"]).eval()
    with torch.no_grad():
        for module in [*model.neck.modules(), *model.head.modules()]:
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.kaiming_normal_(module.weight)
        logits = model(pixel_values=usfmae_pixels(frame)).logits[0]
        model.head.head[4].bias[1] += (logits[0] - logits[1]).median()
    out = tmp_path_factory.mktemp("pipeline_segmenter") / "segmenter"
    model.save_pretrained(out)
    build_segmentation_processor(IMAGE_SIZE).save_pretrained(out)
    return out


def _label_map(results: list[dict], label2id: dict[str, int], shape: tuple[int, int]) -> np.ndarray:
    mask = np.full(shape, -1)
    for item in results:
        mask[np.asarray(item["mask"]) > 0] = label2id[item["label"]]
    assert (mask >= 0).all()  # every pixel got exactly one label
    return mask


def test_segmentation_equals_predict_masks_and_the_written_out_transform(segmenter_dir, frame):
    from usfmae_hf.inference import load_segmenter, predict_masks

    model = load_segmenter(segmenter_dir)
    label2id = model.config.label2id
    shape = (frame.height, frame.width)
    masks = _label_map(pipeline("image-segmentation", model=segmenter_dir)(frame), label2id, shape)

    np.testing.assert_array_equal(masks, next(predict_masks(model, [frame])).mask)
    with torch.no_grad():
        logits = model(pixel_values=usfmae_pixels(frame)).logits
    independent = torch.nn.functional.interpolate(logits, size=shape, mode="bilinear", align_corners=False).argmax(1)
    np.testing.assert_array_equal(masks, independent[0].numpy())
    assert 0.2 < (masks == 1).mean() < 0.8  # both classes present, so a different input shows

    default = transformers.pipeline("image-segmentation", model=str(segmenter_dir))
    assert (_label_map(default(frame), label2id, shape) != masks).any()


def test_refuses_what_it_cannot_serve(mae_dir, tmp_path):
    with pytest.raises(UsfmaeError, match="not an image classifier"):
        pipeline("image-classification", model=mae_dir)
    with pytest.raises(UsfmaeError, match="not a segmentation model"):
        pipeline("image-segmentation", model=mae_dir)
    with pytest.raises(UsfmaeError, match="unsupported pipeline task"):
        pipeline("depth-estimation", model=mae_dir)
    with pytest.raises(UsfmaeError, match="no config.json"):
        pipeline("image-feature-extraction", model=tmp_path)


def test_default_backend_difference_is_rounding_at_integer_scales_only(frame):
    from usfmae_hf.image.processor import build_image_processor

    # 640x480 -> 32 is an integer scale (20, 15): both backends sample each block's centre pixel.
    integer = default_backend_difference(build_image_processor(32), [frame])
    assert integer["max"] < ROUNDING and integer["images_differing"] == 0
    off = default_backend_difference(build_image_processor(IMAGE_SIZE), [frame, frame])
    assert off["images_differing"] == 2
    torchvision_backend = transformers.ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=0, image_mean=list(MEAN), image_std=list(STD)
    )
    independent = (torchvision_backend(frame, return_tensors="pt")["pixel_values"] - usfmae_pixels(frame)).abs()
    assert off["max"] == pytest.approx(float(independent.max()), abs=1e-5) and off["max"] > 1
    assert off["mean"] == pytest.approx(float(independent.mean()), abs=1e-6)
