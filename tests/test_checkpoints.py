"""Bad checkpoints: each gives one clear error, nothing runs, nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from usfmae_hf.errors import CheckpointError
from usfmae_hf.model.checkpoints import infer_vitmae_config_kwargs, load_original_checkpoint


class _RunsCode:
    """Pickles as a call to os.system: what a malicious checkpoint looks like."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state_dict(tiny_original_checkpoint):
    return torch.load(tiny_original_checkpoint, weights_only=True)


def _run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "usfmae_hf.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, tiny_original_checkpoint):
    marker = tmp_path / "pwned"
    payload = {**_state_dict(tiny_original_checkpoint), "evil": _RunsCode(marker)}
    path = tmp_path / "evil.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"refused: the pickle would import and run code \((posix|os)\.system\)"):
        load_original_checkpoint(path)
    assert not marker.exists()

    result = _run_cli("convert", path, "--output", tmp_path / "out")
    assert result.returncode == 2
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "refused" in result.stderr


def test_truncated_file(tmp_path, tiny_original_checkpoint):
    data = tiny_original_checkpoint.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_original_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x04\x95garbage"])
def test_garbage_files(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_original_checkpoint(path)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_original_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_original_checkpoint(tmp_path / "nope.pth")


def test_not_an_mae(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(CheckpointError, match="not an MAE/ViT checkpoint"):
        load_original_checkpoint(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_original_checkpoint(path)
    torch.save({"model": {"epoch": 3}}, path)
    with pytest.raises(CheckpointError, match="not tensors"):
        load_original_checkpoint(path)


def test_missing_and_unexpected_keys(tmp_path, tiny_original_checkpoint):
    sd = _state_dict(tiny_original_checkpoint)
    missing = dict(sd)
    del missing["blocks.1.mlp.fc2.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias$"):
        load_original_checkpoint(tmp_path / "missing.pth")

    torch.save({**sd, "head.weight": torch.zeros(2, 32)}, tmp_path / "unexpected.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: head\.weight$"):
        load_original_checkpoint(tmp_path / "unexpected.pth")

    gap = {k: v for k, v in sd.items() if not k.startswith("blocks.0.")}
    torch.save(gap, tmp_path / "gap.pth")
    with pytest.raises(CheckpointError, match=r"not contiguous \(missing \[0\]\)"):
        load_original_checkpoint(tmp_path / "gap.pth")


def test_inconsistent_shapes(tmp_path, tiny_original_checkpoint):
    sd = _state_dict(tiny_original_checkpoint)
    torch.save({**sd, "blocks.1.attn.qkv.weight": torch.zeros(90, 32)}, tmp_path / "qkv.pth")
    with pytest.raises(
        CheckpointError, match=r"blocks\.1\.attn\.qkv\.weight has shape \(90, 32\), expected \(96, 32\)"
    ):
        load_original_checkpoint(tmp_path / "qkv.pth")
    torch.save({**sd, "pos_embed": torch.zeros(1, 16, 32)}, tmp_path / "pos.pth")
    with pytest.raises(CheckpointError, match="not a square grid"):
        load_original_checkpoint(tmp_path / "pos.pth")
    torch.save({**sd, "decoder_pos_embed": torch.zeros(1, 17, 8)}, tmp_path / "dec.pth")
    with pytest.raises(CheckpointError, match=r"decoder_pos_embed has shape"):
        load_original_checkpoint(tmp_path / "dec.pth")


def test_ddp_prefix_is_stripped_and_architecture_inferred(tmp_path, tiny_original_checkpoint):
    sd = _state_dict(tiny_original_checkpoint)
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ddp.pth")
    checkpoint = load_original_checkpoint(tmp_path / "ddp.pth")
    assert checkpoint.layout == "mae_checkpoint" and checkpoint.extra == {"epoch": 3}
    kwargs = infer_vitmae_config_kwargs(checkpoint, num_attention_heads=2, decoder_num_attention_heads=2)
    assert kwargs == {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "qkv_bias": True,
        "layer_norm_eps": 1e-6,
        "image_size": 32,
        "patch_size": 8,
        "num_channels": 3,
        "decoder_hidden_size": 16,
        "decoder_num_hidden_layers": 1,
        "decoder_num_attention_heads": 2,
        "decoder_intermediate_size": 32,
    }


def test_heads_without_preset_need_a_flag(tiny_original_checkpoint):
    checkpoint = load_original_checkpoint(tiny_original_checkpoint)
    with pytest.raises(CheckpointError, match="--num-attention-heads"):
        infer_vitmae_config_kwargs(checkpoint)
    with pytest.raises(CheckpointError, match="not divisible by 3"):
        infer_vitmae_config_kwargs(checkpoint, num_attention_heads=3)


def test_cli_converts_and_exports(tmp_path, tiny_original_checkpoint):
    out = tmp_path / "hf"
    result = _run_cli(
        "convert",
        tiny_original_checkpoint,
        "--output",
        out,
        "--num-attention-heads",
        "2",
        "--decoder-num-attention-heads",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "detected layout: state_dict" in result.stdout and "verified against the reference MAE" in result.stdout
    again = _run_cli(
        "convert",
        tiny_original_checkpoint,
        "--output",
        out,
        "--num-attention-heads",
        "2",
        "--decoder-num-attention-heads",
        "2",
    )
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr

    script = _run_cli("export-original", out, "--output", tmp_path / "back.pth")
    assert script.returncode == 0, script.stderr
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    original = _state_dict(tiny_original_checkpoint)
    assert all(torch.equal(back[k], original[k]) for k in original) and back.keys() == original.keys()


def test_conversion_scripts_are_thin_entry_points(tmp_path, tiny_original_checkpoint):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script in ("convert_usfmae_to_hf.py", "convert_hf_to_original.py"):
        result = subprocess.run(
            [sys.executable, os.path.join(root, "conversion", script), "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0 and "--output" in result.stdout and "--overwrite" in result.stdout
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "conversion", "convert_usfmae_to_hf.py"),
            str(tmp_path / "missing.pth"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"usfmae convert: error: {tmp_path / 'missing.pth'}: no such file"]
    bad_flag = subprocess.run(
        [sys.executable, os.path.join(root, "conversion", "convert_hf_to_original.py"), "--bogus", "x", "-o", "y"],
        capture_output=True,
        text=True,
    )
    assert bad_flag.returncode == 2 and len(bad_flag.stderr.strip().splitlines()) == 1
    assert "unrecognized arguments: --bogus" in bad_flag.stderr and "usage:" not in bad_flag.stderr


@pytest.mark.parametrize(
    "save_options",
    [
        pytest.param({}, id="zip"),
        pytest.param({"_use_new_zipfile_serialization": False}, id="legacy"),
        pytest.param({"_use_new_zipfile_serialization": False, "pickle_protocol": 4}, id="legacy-protocol-4"),
        pytest.param({"pickle_protocol": 4}, id="zip-protocol-4"),
    ],
)
def test_code_running_pickles_are_refused_without_torch_advice(tmp_path, tiny_original_checkpoint, save_options):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({**_state_dict(tiny_original_checkpoint), "evil": _RunsCode(marker)}, path, **save_options)
    with pytest.raises(CheckpointError) as error:
        load_original_checkpoint(path)
    message = str(error.value)
    assert "refused" in message and "run code" in message and "system" in message
    assert "\n" not in message and "weights_only" not in message and "corrupt" not in message
    assert not marker.exists()


def test_cli_refusal_is_one_line_without_torch_advice(tmp_path, tiny_original_checkpoint):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"evil": _RunsCode(marker)}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    result = _run_cli("convert", path, "--output", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert (
        len(result.stderr.splitlines()) == 1 and len(lines) == 1 and "refused" in lines[0] and "run code" in lines[0]
    ), result.stderr
    assert "weights_only" not in result.stderr and not marker.exists()


def test_unreadable_safe_pickle_is_refused_not_called_corrupt(tmp_path, tiny_original_checkpoint):
    # The safe loader lacks protocol 4's FRAME opcode: a plain file it cannot read is refused, not "corrupt".
    path = tmp_path / "protocol4.pth"
    torch.save(_state_dict(tiny_original_checkpoint), path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with pytest.raises(CheckpointError) as error:
        load_original_checkpoint(path)
    message = str(error.value)
    assert "refused" in message and "nothing was executed" in message
    assert "weights_only" not in message and "\n" not in message and "run code" not in message


def test_torch_advice_is_stripped_from_passed_through_messages():
    from usfmae_hf.failures import one_line

    text = (
        "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument "
        "in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will "
        "likely succeed, but it can result in arbitrary code execution. Do it only if you got the file from a "
        "trusted source.\nPlease file an issue with the following so that we can make `weights_only=True` "
        "compatible with your use case: WeightsUnpickler error: \n\nUnsupported operand 149\n\nCheck the "
        "documentation of torch.load to learn more about types accepted by default with weights_only "
        "https://pytorch.org/docs/stable/generated/torch.load.html."
    )
    assert one_line(text) == "Unsupported operand 149"
