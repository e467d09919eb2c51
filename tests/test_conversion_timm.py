"""Encoder-only export for timm: ``timm.create_model("vit_base_patch16_224", num_classes=0)`` loads it strictly.

timm's VisionTransformer is an implementation independent of transformers' ViT: the same features from
both on the same weights show that the export is the encoder the package runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from usfmae_hf.cli import main
from usfmae_hf.inference import extract_features, load_encoder
from usfmae_hf.inference.features import processor_for
from usfmae_hf.model.conversion import convert_checkpoint, export_original
from usfmae_hf.model.reference_mae import ReferenceMAE

# The tiny test models (conftest.TINY_MAE_KWARGS) as timm keyword arguments.
TIMM_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def _speckle_images(count: int, size: tuple[int, int]) -> list[Image.Image]:
    """Grey frames with ultrasound-like Rayleigh speckle, of a size that the processor must resize."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.rayleigh(50, size=size).clip(0, 255).astype(np.uint8)) for _ in range(count)]


def _timm_vit(path, **shape) -> torch.nn.Module:
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **shape)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return model.eval()


def _assert_same_features(model_dir, timm_model, images) -> None:
    encoder = load_encoder(model_dir)
    ours = extract_features(encoder, images, pooling="cls")
    pixel_values = processor_for(encoder)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = timm_model(pixel_values)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_dir_fixture", ["tiny_model_dir", "tiny_vit_dir"])
def test_encoder_only_export_loads_strictly_in_timm_with_the_packages_features(model_dir_fixture, request, tmp_path):
    model_dir = request.getfixturevalue(model_dir_fixture)
    path = export_original(model_dir, tmp_path / "encoder.pth", encoder_only=True)
    again = export_original(model_dir, tmp_path / "again.pth", encoder_only=True)
    assert path.read_bytes() == again.read_bytes()  # the same bytes every run

    images = _speckle_images(3, (45, 60))
    _assert_same_features(model_dir, _timm_vit(path, **TIMM_TINY), images)
    # timm's own loading path (its checkpoint filter, then a strict load) takes the file as it is, too.
    filtered = timm.create_model(
        "vit_base_patch16_224", pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}, **TIMM_TINY
    ).eval()
    _assert_same_features(model_dir, filtered, images)


def test_full_export_is_not_a_timm_encoder_but_the_flag_makes_it_one(tiny_model_dir, tmp_path, capsys):
    export_original(tiny_model_dir, tmp_path / "full.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _timm_vit(tmp_path / "full.pth", **TIMM_TINY)
    assert main(["export-original", str(tiny_model_dir), "-o", str(tmp_path / "enc.pth"), "--encoder-only"]) == 0
    full, encoder = (torch.load(tmp_path / name, weights_only=True) for name in ("full.pth", "enc.pth"))
    assert set(full) - set(encoder) == {key for key in full if key.startswith("decoder") or key == "mask_token"}
    for key, value in encoder.items():
        assert torch.equal(value, full[key]), key
    _timm_vit(tmp_path / "enc.pth", **TIMM_TINY)


@pytest.mark.slow
def test_vit_base_encoder_export_is_timm_vit_base_patch16_224(tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "usfmae_vitb.pth"
    torch.save(ReferenceMAE().state_dict(), source)  # mae_vit_base_patch16_dec512d8b
    convert_checkpoint(source, tmp_path / "hf", verify=False)
    path = export_original(tmp_path / "hf", tmp_path / "encoder.pth", encoder_only=True)
    model = _timm_vit(path)  # the stock 224x224 ViT-B/16: 12 blocks, 768 wide, 12 heads
    _assert_same_features(tmp_path / "hf", model, _speckle_images(2, (300, 400)))
