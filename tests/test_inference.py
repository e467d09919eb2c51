"""Inference API: encoder features against ViTMAEModel and timm on the same weights; reconstructions."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.image.processor import build_image_processor
from usfmae_hf.inference import features as features_module
from usfmae_hf.inference.features import extract_features, fast_path_blocker, load_encoder, processor_for
from usfmae_hf.inference.reconstruction import reconstruct


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8) for i in range(3)]


@pytest.fixture(scope="module")
def pixel_values(images) -> torch.Tensor:
    return build_image_processor(32)(images, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return load_encoder(tiny_model_dir)


def timm_encoder(checkpoint_path):
    """timm's VisionTransformer holding the original checkpoint's encoder (the original MAE key names)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_classes=0,
        global_pool="",
    )
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    encoder_state = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    model.load_state_dict(encoder_state, strict=True)
    return model.eval()


def test_both_converted_flavours_load_the_same_encoder(tiny_model_dir, tiny_vit_dir, pixel_values):
    from_mae = extract_features(load_encoder(tiny_model_dir), pixel_values, pooling="patches")
    from_vit = extract_features(load_encoder(tiny_vit_dir), pixel_values, pooling="patches")
    torch.testing.assert_close(from_mae, from_vit, rtol=0, atol=0)


def test_tokens_match_timm_on_the_original_weights(encoder, tiny_original_checkpoint, pixel_values):
    with torch.no_grad():
        reference = timm_encoder(tiny_original_checkpoint).forward_features(pixel_values)
    torch.testing.assert_close(
        extract_features(encoder, pixel_values, pooling="cls"), reference[:, 0], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        extract_features(encoder, pixel_values, pooling="patches"), reference[:, 1:], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        extract_features(encoder, pixel_values, pooling="mean"), reference[:, 1:].mean(1), rtol=1e-5, atol=1e-5
    )


def test_tokens_match_unshuffled_vitmae_model(tiny_model_dir, encoder, pixel_values):
    from transformers import ViTMAEModel

    stock = ViTMAEModel.from_pretrained(tiny_model_dir, mask_ratio=0.0).eval()
    num_patches = stock.embeddings.patch_embeddings.num_patches
    noise = torch.arange(num_patches, dtype=torch.float32).expand(len(pixel_values), -1)
    with torch.no_grad():
        reference = stock(pixel_values, noise=noise).last_hidden_state
    features = extract_features(encoder, pixel_values, pooling="patches")
    assert features.shape == (3, num_patches, 32)
    torch.testing.assert_close(features, reference[:, 1:], rtol=1e-5, atol=1e-5)


def test_all_input_kinds_and_batch_sizes_agree(encoder, images, pixel_values, tmp_path):
    reference = extract_features(encoder, pixel_values)
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image).save(paths[-1])
    for batch in (images, [Image.fromarray(a) for a in images], paths, [str(p) for p in paths]):
        for batch_size in (1, 2, 32):
            torch.testing.assert_close(
                extract_features(encoder, batch, batch_size=batch_size), reference, rtol=1e-5, atol=1e-6
            )
    torch.testing.assert_close(extract_features(encoder, images[1]), reference[1:2], rtol=1e-5, atol=1e-6)
    # identical (bit for bit) on every call
    assert torch.equal(extract_features(encoder, images, batch_size=2), extract_features(encoder, images, batch_size=2))


def test_dtype_and_bad_arguments(tiny_model_dir, pixel_values):
    encoder = load_encoder(tiny_model_dir)
    reference = extract_features(encoder, pixel_values)
    half = extract_features(encoder, pixel_values, dtype=torch.bfloat16)
    assert half.dtype == torch.float32 and next(encoder.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(half, reference, rtol=0.05, atol=0.1)
    with pytest.raises(ValueError, match="pooling"):
        extract_features(encoder, pixel_values, pooling="max")
    with pytest.raises(ValueError, match="pixel_values"):
        extract_features(encoder, torch.zeros(3, 32, 32))


def test_bf16_features_of_real_ultrasound_frames_stay_close_to_fp32(tiny_model_dir, ultrasound_dicoms):
    from usfmae_hf.io import load_frames

    frames = [frame.image for path in ultrasound_dicoms.values() for frame in load_frames(path, frame_stride=40)]
    assert len(frames) >= 8
    for pooling in ("cls", "patches"):
        full = extract_features(load_encoder(tiny_model_dir), frames, pooling, dtype="fp32").numpy()
        half = extract_features(load_encoder(tiny_model_dir), frames, pooling, dtype="bf16").numpy()
        full, half = full.reshape(len(frames), -1).astype(np.float64), half.reshape(len(frames), -1)
        cosine = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
        assert cosine.min() > 0.9995, (pooling, cosine.min())  # measured 0.99998 (cls), 0.99999 (patches)
        assert 0 < np.abs(full - half).max() < 0.1  # measured 0.02 on features of magnitude up to 3


def test_fused_bf16_keeps_more_of_what_varies_between_frames_than_stock_bf16(tiny_model_dir, ultrasound_dicoms):
    """Its fp32 residual stream: the bf16 error, per feature, against that feature's spread over real frames.

    A linear probe standardises every feature, so the error that matters is the one relative to how much the
    feature varies between images, not to its magnitude (a cosine to fp32 of 0.99998 hides it).
    """
    from usfmae_hf.io import load_frames

    frames = [frame.image for path in ultrasound_dicoms.values() for frame in load_frames(path, frame_stride=10)]
    full = extract_features(load_encoder(tiny_model_dir), frames, "mean").numpy()
    spread = full.std(0)
    encoder = load_encoder(tiny_model_dir, dtype="bf16")
    noise = {
        name: np.median((extract_features(encoder, frames, "mean", fast=fast).numpy() - full).std(0) / spread)
        for name, fast in (("fused", True), ("stock", False))
    }
    assert noise["fused"] < 0.75 * noise["stock"], noise  # measured 0.014 against 0.023


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_forward_equals_the_stock_forward(tiny_model_dir, images, dtype):
    encoder = load_encoder(tiny_model_dir, dtype=dtype)
    assert fast_path_blocker(encoder) is None
    tolerance = {"fp32": 1e-5, "bf16": 0.05}[dtype]
    for pooling in ("cls", "mean", "patches"):
        # batch 2 then 1: the reused work buffers serve a smaller last batch
        fused = extract_features(encoder, images, pooling, batch_size=2)
        stock = extract_features(encoder, images, pooling, batch_size=2, fast=False)
        torch.testing.assert_close(fused, stock, rtol=tolerance, atol=tolerance)
    on_onednn = features_module._onednn_linear(torch.device("cpu"), encoder.dtype)
    assert features_module._fast_vit(encoder).packed == on_onednn


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build")
@pytest.mark.parametrize("onednn", [False, True])
def test_both_fp32_linear_paths_equal_the_stock_forward(tiny_model_dir, images, monkeypatch, onednn):
    # Whichever this CPU takes (oneDNN on AMD with AVX-512, MKL elsewhere), both are checked here.
    monkeypatch.setattr(features_module, "_onednn_linear", lambda device, dtype: onednn)
    encoder = load_encoder(tiny_model_dir)
    assert features_module._fast_vit(encoder).packed == onednn
    assert features_module.linear_backend(encoder) == ("oneDNN, pre-packed weights" if onednn else "torch.mm")
    for pooling in ("cls", "patches"):
        fused = extract_features(encoder, images, pooling, batch_size=2)
        stock = extract_features(encoder, images, pooling, batch_size=2, fast=False)
        torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "vendor, flags, fp32_on_onednn",
    [
        ("AuthenticAMD", "avx2 avx512f avx512_bf16", True),  # measured faster than MKL there
        ("AuthenticAMD", "avx2", False),
        ("GenuineIntel", "avx2 avx512f avx512_bf16 amx_tile", False),
    ],
)
def test_fp32_takes_onednn_only_on_amd_with_avx512(tmp_path, monkeypatch, vendor, flags, fp32_on_onednn):
    from usfmae_hf import precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert features_module._onednn_linear(torch.device("cpu"), torch.float32) == fp32_on_onednn
    assert not features_module._onednn_linear(torch.device("meta"), torch.float32)


def test_bf16_without_onednn_takes_the_plain_ops(tiny_model_dir, pixel_values, monkeypatch):
    encoder = load_encoder(tiny_model_dir, dtype="bf16")
    expected = extract_features(encoder, pixel_values, "patches", fast=False)

    def unsupported():
        raise RuntimeError("no oneDNN bf16 in this build")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", unsupported)
    assert not features_module._onednn_linear(torch.device("cpu"), torch.bfloat16)
    features_module._FAST.clear()
    assert not features_module._fast_vit(encoder).packed
    torch.testing.assert_close(extract_features(encoder, pixel_values, "patches"), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_forward_follows_changed_and_moved_weights(tiny_model_dir, pixel_values, dtype):
    encoder = load_encoder(tiny_model_dir, dtype=dtype)
    before = extract_features(encoder, pixel_values, "patches")
    with torch.no_grad():
        encoder.layers[1].mlp.fc2.weight.mul_(3)  # in place: the packed copies are stale now
    after = extract_features(encoder, pixel_values, "patches")
    assert (after - before).abs().max() > 0.1
    torch.testing.assert_close(
        after, extract_features(encoder, pixel_values, "patches", fast=False), rtol=0.05, atol=0.05
    )
    other = "fp32" if dtype == "bf16" else "bf16"
    moved = extract_features(encoder, pixel_values, "patches", dtype=other)
    assert next(encoder.parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[other]
    torch.testing.assert_close(moved, after, rtol=0.05, atol=0.05)


def test_encoders_the_fused_forward_does_not_reproduce_take_the_stock_one(tiny_model_dir, pixel_values):
    encoder = load_encoder(tiny_model_dir)
    plain = extract_features(encoder, pixel_values, "patches")
    handle = encoder.layers[0].mlp.register_forward_hook(lambda module, args, output: 3 * output)
    assert "hook" in fast_path_blocker(encoder)
    hooked = extract_features(encoder, pixel_values, "patches")
    assert (hooked - plain).abs().max() > 0.1  # the hook ran
    torch.testing.assert_close(hooked, extract_features(encoder, pixel_values, "patches", fast=False))
    handle.remove()

    class Scaled(torch.nn.Linear):  # e.g. what LoRA puts in place of a projection
        def forward(self, x):
            return 2 * super().forward(x)

    scaled = Scaled(32, 32)
    scaled.load_state_dict(encoder.layers[1].attention.v_proj.state_dict())
    encoder.layers[1].attention.v_proj = scaled
    assert "Scaled" in fast_path_blocker(encoder)
    torch.testing.assert_close(
        extract_features(encoder, pixel_values, "patches"),
        extract_features(encoder, pixel_values, "patches", fast=False),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in fast_path_blocker(encoder)
    assert "training" in fast_path_blocker(load_encoder(tiny_model_dir).train())


def test_threads_may_share_an_encoder(encoder, pixel_values):
    from concurrent.futures import ThreadPoolExecutor

    expected = extract_features(encoder, pixel_values, "patches", fast=False)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: extract_features(encoder, pixel_values, "patches", batch_size=1), range(8)))
    for result in results:
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_processor_comes_from_the_model_directory(encoder, tiny_model_dir, tmp_path):
    assert processor_for(encoder).to_dict() == build_image_processor(32).to_dict()
    with pytest.raises(UsfmaeError, match="config.json"):
        load_encoder(tmp_path)


def test_reconstruct_is_seeded_and_consistent(tiny_model_dir, images, tmp_path):
    from transformers import ViTMAEForPreTraining

    model = ViTMAEForPreTraining.from_pretrained(tiny_model_dir)
    first = reconstruct(model, images, seed=3, output=tmp_path / "grid.png")
    again = reconstruct(tiny_model_dir, images, seed=3)
    other = reconstruct(model, images, seed=4)
    assert first.original.shape == first.reconstruction.shape == (3, 32, 32, 3) and first.original.dtype == np.uint8
    np.testing.assert_array_equal(first.reconstruction, again.reconstruction)
    assert not np.array_equal(first.mask, other.mask)
    assert np.allclose(first.mask.reshape(3, 4, 8, 4, 8).mean(axis=(2, 4)).mean(axis=(1, 2)), 0.75)
    visible = ~first.mask
    np.testing.assert_array_equal(first.pasted[visible], first.original[visible])
    np.testing.assert_array_equal(first.masked[visible], first.original[visible])
    np.testing.assert_array_equal(first.pasted[first.mask], first.reconstruction[first.mask])
    assert model.config.mask_ratio == 0.75
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[0] > grid.size[1] > 0
    # the decoder's own output, unpatchified, is the reconstruction
    pixel_values = build_image_processor(32)(images, return_tensors="pt")["pixel_values"]
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model.eval()(pixel_values, noise=noise).logits
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = ((model.unpatchify(logits) * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(first.reconstruction, expected)


def test_norm_pix_loss_predictions_are_unnormalised_with_visible_statistics(tiny_model_dir, monkeypatch):
    from transformers import ViTMAEForPreTraining

    model = ViTMAEForPreTraining.from_pretrained(tiny_model_dir, norm_pix_loss=True).eval()
    real_forward = model.forward

    def perfect_forward(pixel_values, noise=None, **kwargs):
        # A decoder that predicts every patch exactly, as norm_pix_loss targets (per-patch normalised).
        outputs = real_forward(pixel_values, noise=noise, **kwargs)
        target = model.patchify(pixel_values)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        outputs.logits = (target - mean) / (var + 1e-6) ** 0.5
        return outputs

    monkeypatch.setattr(model, "forward", perfect_forward)
    # Every patch of this image is the same 8x8 tile, so the visible patches' statistics are exact.
    tile = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    result = reconstruct(model, np.tile(tile, (4, 4, 1)), seed=0)
    assert np.abs(result.reconstruction.astype(int) - result.original.astype(int)).max() <= 1


def test_reconstruct_in_bf16_masks_the_same_patches(tiny_model_dir, images):
    full = reconstruct(tiny_model_dir, images, seed=2, dtype="fp32")
    half = reconstruct(tiny_model_dir, images, seed=2, dtype=torch.bfloat16)
    np.testing.assert_array_equal(half.mask, full.mask)
    np.testing.assert_array_equal(half.original, full.original)
    difference = np.abs(half.reconstruction.astype(int) - full.reconstruction.astype(int))
    assert 0 < difference.max() <= 4 and difference.mean() < 0.5  # measured: at most 1, mean 0.11


def test_reconstruct_needs_the_decoder(tiny_vit_dir, images):
    with pytest.raises(UsfmaeError, match="decoder"):
        reconstruct(tiny_vit_dir, images)
    with pytest.raises(ValueError, match="mask_ratio"):
        reconstruct(tiny_vit_dir, images, mask_ratio=1.0)
