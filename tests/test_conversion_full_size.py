"""ViT-Base-sized conversion (USF-MAE's real architecture) and loading under transformers 4.x."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch
from conftest import TINY_MAE_KWARGS

from usfmae_hf.model.conversion import DEFAULT_ATOL, convert_checkpoint, export_original
from usfmae_hf.model.reference_mae import ReferenceMAE


@pytest.mark.slow
def test_vit_base_mae_converts_verifies_and_round_trips(tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "usfmae_vitb.pth"
    state_dict = ReferenceMAE().state_dict()  # mae_vit_base_patch16_dec512d8b
    assert len(state_dict) == 254
    torch.save(state_dict, source)
    del state_dict

    result = convert_checkpoint(source, tmp_path / "hf")  # heads from presets: 12 and 16
    assert set(result.max_abs_diff) == {"encoder_unmasked", "encoder_masked", "decoder_pred", "loss", "mask"}
    assert max(result.max_abs_diff.values()) <= DEFAULT_ATOL
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    expected = {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "decoder_hidden_size": 512,
        "decoder_num_hidden_layers": 8,
        "decoder_num_attention_heads": 16,
        "decoder_intermediate_size": 2048,
        "image_size": 224,
        "patch_size": 16,
        "layer_norm_eps": 1e-6,
    }
    assert {k: config[k] for k in expected} == expected

    export_original(tmp_path / "hf", tmp_path / "back.pth")
    original, back = torch.load(source, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_weights_load_identically_in_transformers_4(tiny_model_dir, tmp_path, tf4_python):
    """transformers 4.x must load every tensor, decoder included, and compute the same outputs."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    torch.save({"images": images, "noise": noise}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch, transformers
        from transformers import ViTMAEForPreTraining
        assert transformers.__version__.startswith("4."), transformers.__version__
        model, info = ViTMAEForPreTraining.from_pretrained({str(tiny_model_dir)!r}, output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched keys
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            out = model.eval()(pixel_values=inputs["images"], noise=inputs["noise"])
        torch.save({{"logits": out.logits, "loss": out.loss, "decoder_pred_weight": model.decoder.decoder_pred.weight}}, {str(tmp_path / "tf4.pt")!r})
        """
    )
    result = subprocess.run(
        [tf4_python, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]

    from transformers import ViTMAEForPreTraining

    model = ViTMAEForPreTraining.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        out = model(pixel_values=images, noise=noise)
    tf4 = torch.load(tmp_path / "tf4.pt", weights_only=True)
    assert torch.equal(tf4["decoder_pred_weight"], model.decoder.decoder_pred.weight)
    torch.testing.assert_close(tf4["logits"], out.logits, atol=DEFAULT_ATOL, rtol=0)
    torch.testing.assert_close(tf4["loss"], out.loss, atol=DEFAULT_ATOL, rtol=0)


def test_plain_save_pretrained_decoder_bug_is_what_we_avoid(tiny_mae_config, tmp_path):
    """Documents why we write legacy names ourselves: 5.x save_pretrained mangles decoder keys."""
    from safetensors import safe_open
    from transformers import ViTMAEForPreTraining

    from usfmae_hf.model.conversion import save_vitmae_pretrained

    model = ViTMAEForPreTraining(tiny_mae_config)
    save_vitmae_pretrained(model, tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "model.safetensors", framework="pt") as handle:
        ours = set(handle.keys())
    assert {k for k in ours if k.startswith("decoder.decoder_layers.0.attention.attention.")}
    assert not any("decoder_encoder" in k for k in ours)
    reloaded = ViTMAEForPreTraining.from_pretrained(tmp_path / "ours")
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert TINY_MAE_KWARGS["decoder_hidden_size"] == reloaded.config.decoder_hidden_size
