"""``--dtype``: weights written in fp32 by default, or in the source's or a chosen precision; verified in fp32."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from usfmae_hf.cli import main
from usfmae_hf.commands.convert import STORAGE_DTYPES as CLI_STORAGE_DTYPES
from usfmae_hf.errors import CheckpointError
from usfmae_hf.inference import extract_features, load_encoder
from usfmae_hf.model.conversion import DEFAULT_ATOL, STORAGE_DTYPES, convert_checkpoint, export_original

HEADS = dict(num_attention_heads=2, decoder_num_attention_heads=2)
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _source(tiny_original_checkpoint, folder, dtype, suffix):
    """The tiny checkpoint cast to ``dtype`` and saved as ``.pth`` or ``.safetensors``; returns (path, tensors)."""
    tensors = {k: v.to(dtype).contiguous() for k, v in torch.load(tiny_original_checkpoint, weights_only=True).items()}
    path = folder / f"source-{NAMES[dtype]}{suffix}"
    if suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path, tensors


def _stored_dtypes(model_dir) -> set[str]:
    with safe_open(model_dir / "model.safetensors", framework="pt") as handle:
        return {str(handle.get_slice(key).get_dtype()) for key in handle.keys()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize(
    ("source_dtype", "choice", "stored"),
    [
        (torch.float16, "keep", torch.float16),
        (torch.bfloat16, "keep", torch.bfloat16),
        (torch.bfloat16, "fp32", torch.float32),
        (torch.float32, "fp16", torch.float16),
        (torch.float32, "bf16", torch.bfloat16),
        (torch.bfloat16, "fp16", torch.float16),
    ],
)
def test_dtype_writes_the_chosen_precision(tiny_original_checkpoint, tmp_path, suffix, source_dtype, choice, stored):
    source, tensors = _source(tiny_original_checkpoint, tmp_path, source_dtype, suffix)
    result = convert_checkpoint(source, tmp_path / "hf", dtype=choice, **HEADS)
    assert result.max_abs_diff and max(result.max_abs_diff.values()) <= DEFAULT_ATOL  # verified, in fp32

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == NAMES[stored] and config["usfmae_provenance"]["dtype"] == NAMES[stored]
    assert config["usfmae_provenance"]["source_dtype"] == NAMES[source_dtype]
    assert _stored_dtypes(tmp_path / "hf") == {SAFETENSORS_NAMES[stored]}

    # from_pretrained loads the stored precision; export gives back the source's tensors cast once to it.
    encoder = load_encoder(tmp_path / "hf")
    assert next(encoder.parameters()).dtype == stored
    assert torch.isfinite(extract_features(encoder, torch.zeros(1, 3, 32, 32))).all()
    export_original(tmp_path / "hf", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        assert back[key].dtype == stored
        assert torch.equal(back[key], value.float().to(stored)), key
        if choice == "keep":
            assert torch.equal(back[key], value), key  # bit for bit the source


def test_keep_refuses_a_mixed_precision_source(tiny_original_checkpoint, tmp_path):
    tensors = torch.load(tiny_original_checkpoint, weights_only=True)
    tensors["cls_token"] = tensors["cls_token"].half()
    torch.save(tensors, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="found float16, float32; pass --dtype fp32") as info:
        convert_checkpoint(tmp_path / "mixed.pth", tmp_path / "hf", dtype="keep", **HEADS)
    assert "\n" not in str(info.value) and not (tmp_path / "hf").exists()
    convert_checkpoint(tmp_path / "mixed.pth", tmp_path / "hf", **HEADS)  # fp32 by default
    assert _stored_dtypes(tmp_path / "hf") == {"F32"}


def test_dtype_flag(tiny_original_checkpoint, tmp_path, capsys):
    assert CLI_STORAGE_DTYPES == STORAGE_DTYPES
    source, _ = _source(tiny_original_checkpoint, tmp_path, torch.float16, ".pth")
    heads = ["--num-attention-heads", "2", "--decoder-num-attention-heads", "2"]
    assert main(["convert", str(source), "-o", str(tmp_path / "keep"), "--dtype", "keep", *heads]) == 0
    assert main(["convert", str(source), "-o", str(tmp_path / "default"), *heads]) == 0
    assert _stored_dtypes(tmp_path / "keep") == {"F16"} and _stored_dtypes(tmp_path / "default") == {"F32"}
    card = (tmp_path / "keep" / "README.md").read_text()
    assert "| Stored dtype | `float16` |" in card and "| Source dtype | `float16` |" in card
    with pytest.raises(SystemExit):
        main(["convert", str(source), "-o", str(tmp_path / "bad"), "--dtype", "fp8"])
    assert "invalid choice" in capsys.readouterr().err


def test_saved_config_names_the_dtype_of_the_weights_written(tiny_mae_config, tmp_path):
    """A config inherited from an fp16 directory must not make fp32 weights load as fp16."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from usfmae_hf.model.conversion import save_vitmae_pretrained

    config = ViTMAEConfig(**tiny_mae_config.to_dict())
    model = ViTMAEForPreTraining(config)
    config.dtype = torch.float16  # as after continuing from a --dtype fp16 conversion
    save_vitmae_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    assert config.dtype == torch.float16  # the caller's config is left as it was
    reloaded = ViTMAEForPreTraining.from_pretrained(tmp_path / "out")
    assert next(reloaded.parameters()).dtype == torch.float32
