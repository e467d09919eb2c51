"""Conversion of original MAE checkpoints: layouts, formats, parity, round trip, provenance."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import TINY_MAE_KWARGS
from safetensors import safe_open

from usfmae_hf.errors import OutputExistsError, VerificationError
from usfmae_hf.model.checkpoints import sha256_of_file
from usfmae_hf.model.conversion import DEFAULT_ATOL, convert_checkpoint, export_original
from usfmae_hf.model.reference_mae import ReferenceMAE

HEADS = dict(num_attention_heads=2, decoder_num_attention_heads=2)


def _random_images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference(path, norm_pix_loss=False, encoder_only=False):
    reference = ReferenceMAE.from_hf_config_kwargs(
        {**TINY_MAE_KWARGS, "norm_pix_loss": norm_pix_loss}, encoder_only=encoder_only
    )
    state_dict = torch.load(path, weights_only=False)  # written by the test itself
    state_dict = state_dict.get("model", state_dict)
    if encoder_only:
        state_dict = {k: v for k, v in state_dict.items() if not (k.startswith("decoder") or k == "mask_token")}
    reference.load_state_dict(state_dict)
    return reference.eval()


def _write_layout(sd: dict, path, layout: str):
    if layout == "mae_checkpoint":
        obj = {
            "model": sd,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 7,
            "args": argparse.Namespace(blr=1.5e-4),
        }
    elif layout == "encoder_only":
        obj = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
    else:
        obj = sd
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("layout", ["state_dict", "mae_checkpoint", "encoder_only"])
def test_all_layouts_are_detected_and_load_with_automodel(tiny_original_checkpoint, tmp_path, layout):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, ViTMAEModel

    sd = torch.load(tiny_original_checkpoint, weights_only=True)
    path = _write_layout(sd, tmp_path / f"{layout}.pth", layout)
    result = convert_checkpoint(path, tmp_path / "out", **HEADS)
    assert result.layout == layout
    assert all(value <= DEFAULT_ATOL for value in result.max_abs_diff.values())

    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.architectures == (["ViTMAEModel"] if layout == "encoder_only" else ["ViTMAEForPreTraining"])
    provenance = config.usfmae_provenance
    assert provenance["layout"] == layout
    assert provenance["source_sha256"] == sha256_of_file(path)
    assert provenance["converter_version"].startswith("usfmae-hf ")
    card = (tmp_path / "out" / "README.md").read_text()
    assert provenance["source_sha256"] in card and provenance["converter_version"] in card

    model = AutoModel.from_pretrained(tmp_path / "out")
    assert isinstance(model, ViTMAEModel)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.size == {"height": 32, "width": 32} and processor.resample == 0

    # The encoder in the directory is the checkpoint's encoder, number for number.
    reference = _reference(path, encoder_only=True)
    images = _random_images()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(images, mask_ratio=0.75, noise=noise).latent
        got = model(pixel_values=images, noise=noise).last_hidden_state
    torch.testing.assert_close(got, expected, atol=DEFAULT_ATOL, rtol=0)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_pretraining_model_matches_reference_decoder_and_loss(tiny_original_checkpoint, tmp_path, norm_pix_loss):
    from transformers import ViTMAEForPreTraining

    out = convert_checkpoint(
        tiny_original_checkpoint, tmp_path / "out", norm_pix_loss=norm_pix_loss, mask_ratio=0.6, **HEADS
    )
    assert set(out.max_abs_diff) == {"encoder_unmasked", "encoder_masked", "decoder_pred", "loss", "mask"}
    model = ViTMAEForPreTraining.from_pretrained(tmp_path / "out").eval()
    assert model.config.norm_pix_loss is norm_pix_loss and model.config.mask_ratio == 0.6

    reference = _reference(tiny_original_checkpoint, norm_pix_loss=norm_pix_loss)
    images = _random_images(seed=3)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = reference(images, mask_ratio=0.6, noise=noise)
        got = model(pixel_values=images, noise=noise)
    torch.testing.assert_close(got.logits, ref.pred, atol=DEFAULT_ATOL, rtol=0)
    torch.testing.assert_close(got.loss, ref.loss, atol=DEFAULT_ATOL, rtol=0)
    torch.testing.assert_close(got.mask, ref.mask)


def test_norm_pix_loss_changes_the_loss(tiny_original_checkpoint):
    """The flag matters, so recording it (not guessing it) matters."""
    images = _random_images(seed=5)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = _reference(tiny_original_checkpoint, norm_pix_loss=False)(images, noise=noise).loss
        normed = _reference(tiny_original_checkpoint, norm_pix_loss=True)(images, noise=noise).loss
    assert abs(plain.item() - normed.item()) > 1e-3


def test_saved_weights_use_legacy_names_with_decoder(tiny_model_dir):
    with safe_open(tiny_model_dir / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata() == {"format": "pt"}
    assert "vit.encoder.layer.0.attention.attention.query.weight" in keys
    assert "decoder.decoder_layers.0.attention.output.dense.weight" in keys
    assert "decoder.decoder_layers.0.intermediate.dense.weight" in keys
    assert not any("decoder_encoder" in key or ".layers." in key for key in keys)
    assert len(keys) == 62  # tiny: 4 + 2x16 + 2 encoder, 6 + 16 + 2 decoder (q/k/v split)


def test_vit_format_is_a_deterministic_ordered_encoder(tiny_original_checkpoint, tiny_vit_dir):
    from transformers import AutoModel, AutoModelForImageClassification, ViTModel, pipeline

    config = json.loads((tiny_vit_dir / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == ["ViTModel"]
    with safe_open(tiny_vit_dir / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
    assert not any(key.startswith(("decoder", "vit.")) for key in keys)
    # an identity pooler, so AutoModel's pooler is not random: pooler_output = normed CLS token
    assert {key for key in keys if key.startswith("pooler")} == {"pooler.dense.weight", "pooler.dense.bias"}
    assert config["pooler_act"] == "linear"

    model = AutoModel.from_pretrained(tiny_vit_dir).eval()
    assert isinstance(model, ViTModel)
    images = _random_images(seed=7)
    reference = _reference(tiny_original_checkpoint, encoder_only=True)
    in_order = torch.arange(16, dtype=torch.float32).expand(2, -1)
    with torch.no_grad():
        expected, _, _ = reference.forward_encoder(images, 0.0, in_order)
        first = model(pixel_values=images).last_hidden_state
        second = AutoModel.from_pretrained(tiny_vit_dir)(pixel_values=images).last_hidden_state
        pooled = [AutoModel.from_pretrained(tiny_vit_dir)(pixel_values=images).pooler_output for _ in range(2)]
    torch.testing.assert_close(first, expected, atol=DEFAULT_ATOL, rtol=0)
    assert torch.equal(first, second)
    assert torch.equal(pooled[0], pooled[1]) and torch.equal(pooled[0], first[:, 0])

    extractor = pipeline("image-feature-extraction", model=str(tiny_vit_dir))
    from PIL import Image

    features = extractor(Image.new("RGB", (40, 30), (90, 20, 200)), return_tensors=True)
    assert tuple(features.shape) == (1, 17, 32)
    pooled_by_pipeline = [
        pipeline("image-feature-extraction", model=str(tiny_vit_dir), pool=True)(
            Image.new("RGB", (40, 30), (90, 20, 200)), return_tensors=True
        )
        for _ in range(2)
    ]
    assert torch.equal(pooled_by_pipeline[0], pooled_by_pipeline[1])
    torch.testing.assert_close(pooled_by_pipeline[0][0], features[0, 0], atol=1e-6, rtol=0)

    classifier = AutoModelForImageClassification.from_pretrained(tiny_vit_dir, num_labels=3)
    assert classifier.config.num_labels == 3
    torch.testing.assert_close(classifier.vit.embeddings.position_embeddings, model.embeddings.position_embeddings)
    torch.testing.assert_close(classifier.vit.layers[1].mlp.fc2.weight, model.layers[1].mlp.fc2.weight)


@pytest.mark.parametrize("layout", ["state_dict", "encoder_only"])
@pytest.mark.parametrize("output_format", ["vitmae", "vit"])
def test_round_trip_is_bitwise_identical(tiny_original_checkpoint, tmp_path, layout, output_format):
    sd = torch.load(tiny_original_checkpoint, weights_only=True)
    source = _write_layout(sd, tmp_path / "source.pth", layout)
    convert_checkpoint(source, tmp_path / "hf", output_format=output_format, **HEADS)
    export_original(tmp_path / "hf", tmp_path / "back.pth")
    export_original(tmp_path / "hf", tmp_path / "again.pth")
    assert (tmp_path / "back.pth").read_bytes() == (tmp_path / "again.pth").read_bytes()  # same bytes every run
    expected = torch.load(source, weights_only=True)
    if output_format == "vit":
        expected = {k: v for k, v in expected.items() if not (k.startswith("decoder") or k == "mask_token")}
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == expected.keys()
    for key in expected:
        assert back[key].dtype == expected[key].dtype
        assert torch.equal(back[key], expected[key]), key


def test_a_mapping_bug_fails_verification_and_writes_nothing(tiny_original_checkpoint, tmp_path, monkeypatch):
    """Verification must catch a plausible conversion bug: q and k swapped when splitting qkv."""
    from usfmae_hf.model import conversion, keys

    def swapped_qk(state_dict, prefix="vit."):
        converted = keys.original_to_current(state_dict, prefix)
        for name in [k for k in converted if ".attention.q_proj." in k]:
            other = name.replace(".q_proj.", ".k_proj.")
            converted[name], converted[other] = converted[other], converted[name]
        return converted

    monkeypatch.setattr(conversion, "original_to_current", swapped_qk)
    with pytest.raises(VerificationError, match="differs from the reference") as info:
        convert_checkpoint(tiny_original_checkpoint, tmp_path / "out", **HEADS)
    assert "encoder_unmasked" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_original_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError):
        convert_checkpoint(tiny_original_checkpoint, out, **HEADS)
    assert (out / "keep.txt").read_text() == "precious"
    convert_checkpoint(tiny_original_checkpoint, out, overwrite=True, verify=False, **HEADS)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or backup left behind


def test_conversion_records_provenance_for_vit_format(tiny_vit_dir, tiny_original_checkpoint):
    config = json.loads((tiny_vit_dir / "config.json").read_text())
    assert config["usfmae_provenance"]["source_sha256"] == sha256_of_file(tiny_original_checkpoint)
    assert config["usfmae_provenance"]["format"] == "vit"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_reduced_and_double_precision_checkpoints_convert_with_verification(
    tiny_original_checkpoint, tmp_path, dtype, suffix
):
    from safetensors.torch import save_file

    sd = torch.load(tiny_original_checkpoint, weights_only=True)
    cast = {k: v.to(dtype) for k, v in sd.items()}
    source = tmp_path / f"source{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in cast.items()}, str(source))
    else:
        torch.save(cast, source)
    result = convert_checkpoint(source, tmp_path / "hf", **HEADS)  # verification on, in fp32
    assert result.max_abs_diff and max(result.max_abs_diff.values()) <= DEFAULT_ATOL
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["usfmae_provenance"]["source_dtype"] == str(dtype).removeprefix("torch.")
    export_original(tmp_path / "hf", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    for key, value in cast.items():
        assert back[key].dtype == torch.float32
        assert torch.equal(back[key], value.float()), key
