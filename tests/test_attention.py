"""Attention maps and rollout, checked against a separately loaded eager ``ViTModel`` and the formula."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTModel

from usfmae_hf.cli import main
from usfmae_hf.errors import UnreadableImageError
from usfmae_hf.inference.attention import attention_maps, attention_rollout, eager_attention
from usfmae_hf.inference.features import load_encoder

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
TOKENS = 1 + 4 * 4  # tiny models: 32x32 input, patch 8


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A 32x32 RGB image (the tiny models' input size, so preprocessing does not resample) and its PNG."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pixels[8:24, 8:24] //= 4  # a dark square, so that attention has something to find
    path = tmp_path_factory.mktemp("scan") / "scan.png"
    Image.fromarray(pixels).save(path)
    return pixels, path


def reference_attentions(vit_dir, pixels: np.ndarray) -> np.ndarray:
    """``(layers, heads, T, T)`` from a stock ``ViTModel`` loaded with eager attention, on pixels normalised here."""
    model = ViTModel.from_pretrained(vit_dir, attn_implementation="eager", add_pooling_layer=False).eval()
    normalised = (pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    pixel_values = torch.tensor(normalised, dtype=torch.float32).permute(2, 0, 1)[None]
    with torch.no_grad():
        attentions = model(pixel_values=pixel_values, output_attentions=True).attentions
    return np.stack([layer[0].numpy() for layer in attentions]).astype(np.float64)


def rollout_by_hand(attentions: np.ndarray, discard_ratio: float = 0.0) -> np.ndarray:
    """Abnar & Zuidema's rollout, written out row by row: mean heads, drop, 0.5*A + 0.5*I, normalise, multiply."""
    tokens = attentions.shape[-1]
    layers = []
    for layer in attentions:
        fused = sum(layer[h] for h in range(layer.shape[0])) / layer.shape[0]
        fused = fused.copy()
        drop = int(discard_ratio * (tokens - 1))
        for row in range(tokens):
            for column in sorted(range(1, tokens), key=lambda c: fused[row, c])[:drop]:
                fused[row, column] = 0.0
        mixed = 0.5 * fused + 0.5 * np.identity(tokens)
        layers.append(mixed / mixed.sum(axis=1)[:, None])
    # R = A_L' ... A_1': fold the layers in from the first, each new one multiplied on the left
    return functools.reduce(lambda product, layer: layer @ product, layers, np.identity(tokens))


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_vit_dir"])
def test_maps_match_a_separately_loaded_eager_vit(fixture, request, scan, tiny_vit_dir):
    pixels, path = scan
    maps = attention_maps(request.getfixturevalue(fixture), path)
    expected = reference_attentions(tiny_vit_dir, pixels)

    assert maps.attentions.shape == (2, 2, TOKENS, TOKENS) and maps.grid == (4, 4)
    assert maps.heads.shape == (2, 4, 4) and maps.rollout.shape == (4, 4) and maps.head_mean.shape == (4, 4)
    np.testing.assert_allclose(maps.attentions, expected, atol=1e-6)
    np.testing.assert_allclose(maps.heads, expected[-1, :, 0, 1:].reshape(2, 4, 4), atol=1e-6)
    np.testing.assert_allclose(maps.rollout_matrix, rollout_by_hand(expected), atol=1e-6)
    np.testing.assert_allclose(maps.rollout, rollout_by_hand(expected)[0, 1:].reshape(4, 4), atol=1e-6)
    # the figure's background is what the model saw: here the image itself
    assert np.abs(maps.image.astype(int) - pixels).max() <= 1


def test_rows_sum_to_one_and_calls_are_deterministic(scan, tiny_model_dir):
    pixels, _ = scan
    model = load_encoder(tiny_model_dir)
    first, second = attention_maps(model, pixels), attention_maps(model, Image.fromarray(pixels))
    np.testing.assert_allclose(first.attentions.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(first.rollout_matrix.sum(axis=-1), 1.0, atol=1e-5)
    assert np.array_equal(first.attentions, second.attentions)
    assert np.array_equal(first.rollout_matrix, second.rollout_matrix)
    # rollout keeps more of the CLS token's own input than any single layer's head average does
    assert first.rollout_matrix[0, 0] > 0.5 * first.attentions[-1].mean(axis=0)[0, 0]


@pytest.mark.parametrize("discard_ratio", [0.25, 0.5, 0.9])
def test_discard_ratio_against_the_hand_transcription(discard_ratio):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 4, TOKENS, TOKENS)) * 2
    attentions = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    rollout = attention_rollout(attentions, discard_ratio)
    np.testing.assert_allclose(rollout, rollout_by_hand(attentions, discard_ratio), atol=1e-12)
    np.testing.assert_allclose(rollout.sum(axis=-1), 1.0, atol=1e-12)
    assert not np.allclose(rollout, attention_rollout(attentions))  # the option does something
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(attentions, 1.0)


def test_eager_only_for_the_call_and_sdpa_restored(scan, tiny_model_dir):
    pixels, _ = scan
    model = load_encoder(tiny_model_dir)
    pixel_values = torch.zeros(1, 3, 32, 32)
    assert model.config._attn_implementation == "sdpa"
    attention_maps(model, pixels)
    assert model.config._attn_implementation == "sdpa"
    assert all(layer.attention.config._attn_implementation == "sdpa" for layer in model.layers)
    with torch.no_grad():
        assert model(pixel_values=pixel_values).attentions is None
        assert not model(pixel_values=pixel_values, output_attentions=True).attentions  # SDPA gives none
    # restored after a failure inside the block as well, and an eager model stays eager
    with pytest.raises(RuntimeError), eager_attention(model):
        assert model.config._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    attention_maps(model, pixels)
    assert model.config._attn_implementation == "eager"


def test_frames_of_a_cine(tiny_model_dir, ultrasound_dicoms):
    cine = ultrasound_dicoms["OBXXXX1A_2frame.dcm"]
    model = load_encoder(tiny_model_dir)
    first, second = attention_maps(model, cine, frame=0), attention_maps(model, cine, frame=1)
    assert first.attentions.shape == second.attentions.shape == (2, 2, TOKENS, TOKENS)
    with pytest.raises(UnreadableImageError, match="has no frame 2"):
        attention_maps(model, cine, frame=2)


def test_cli_writes_png_and_raw_maps(scan, tiny_model_dir, tmp_path, capsys):
    pixels, path = scan
    figure, raw = tmp_path / "attention.png", tmp_path / "maps.npz"
    argv = ["attention", str(path), "--model", str(tiny_model_dir), "--output", str(figure)]
    assert main([*argv, "--save-maps", str(raw)]) == 0
    assert "2 layers, 2 heads, 4x4 patches" in capsys.readouterr().out
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.width > image.height > 100
        all_heads_width = image.width
    expected = attention_maps(tiny_model_dir, pixels)
    with np.load(raw) as saved:
        assert set(saved.files) == {"image", "attentions", "rollout_matrix", "heads", "head_mean", "rollout"}
        np.testing.assert_array_equal(saved["attentions"], expected.attentions)
        np.testing.assert_array_equal(saved["rollout"], expected.rollout)
        assert saved["heads"].shape == (2, 4, 4)
    # existing outputs are kept unless --overwrite; --heads mean draws fewer panels
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--heads", "mean", "--discard-ratio", "0.5", "--overwrite"]) == 0
    with Image.open(figure) as image:
        assert image.width < all_heads_width


def _one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # not transformers' loading progress bar
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err


def test_cli_bad_inputs_fail_in_one_line(scan, tiny_model_dir, tmp_path, capsys):
    _, path = scan
    output = tmp_path / "out.png"
    _one_line_error(
        capsys,
        ["attention", str(tmp_path / "missing.png"), "-m", str(tiny_model_dir), "-o", str(output)],
        "no such file",
    )
    _one_line_error(capsys, ["attention", str(path), "-m", str(tmp_path), "-o", str(output)], "not a model directory")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _one_line_error(
        capsys, ["attention", str(path), "-m", str(other), "-o", str(output)], "neither 'vit_mae' nor 'vit'"
    )
    _one_line_error(
        capsys,
        ["attention", str(path), "-m", str(tiny_model_dir), "-o", str(output), "--save-maps", str(tmp_path / "m.npy")],
        "ending in .npz",
    )
    assert not output.exists()


@pytest.mark.parametrize("ratio", ["1", "-0.1", "nan", "x"])
def test_cli_discard_ratio_is_validated(capsys, tmp_path, ratio):
    with pytest.raises(SystemExit) as exit_info:
        main(["attention", "x.png", "-m", str(tmp_path), "-o", str(tmp_path / "o.png"), "--discard-ratio", ratio])
    assert exit_info.value.code == 2 and "--discard-ratio" in capsys.readouterr().err
