"""Shared fixtures: tiny MAE models (seconds on CPU) and real ultrasound DICOM paths.

Every fixture writes under pytest's tmp paths, so tests are safe under ``pytest -n``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hub_server import hub_server  # noqa: F401 - a local Hub for push/download tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MAE_KWARGS = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=32,
    layer_norm_eps=1e-6,
    mask_ratio=0.75,
    norm_pix_loss=False,
)


@pytest.fixture(scope="session")
def tiny_mae_config():
    """A 32x32-input ViTMAEConfig with the structure of USF-MAE (2 encoder blocks, 1 decoder block)."""
    from transformers import ViTMAEConfig

    return ViTMAEConfig(**TINY_MAE_KWARGS)


@pytest.fixture(scope="session")
def tiny_original_checkpoint(tmp_path_factory) -> Path:
    """A random tiny MAE saved as the original code does: a bare state dict in a ``.pth`` file."""
    import torch

    from usfmae_hf.model.reference_mae import ReferenceMAE

    torch.manual_seed(0)
    model = ReferenceMAE.from_hf_config_kwargs(TINY_MAE_KWARGS)
    path = tmp_path_factory.mktemp("tiny_ckpt") / "tiny_mae.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_original_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint converted to a full ViTMAE directory (config, safetensors, processor, card)."""
    from usfmae_hf.model.conversion import convert_checkpoint

    out = tmp_path_factory.mktemp("tiny_hf") / "tiny-usfmae"
    convert_checkpoint(tiny_original_checkpoint, out, num_attention_heads=2, decoder_num_attention_heads=2)
    return out


@pytest.fixture(scope="session")
def tiny_vit_dir(tiny_original_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint converted to an encoder-only ``ViTModel`` directory (``--format vit``)."""
    from usfmae_hf.model.conversion import convert_checkpoint

    out = tmp_path_factory.mktemp("tiny_vit") / "tiny-usfmae-vit"
    convert_checkpoint(
        tiny_original_checkpoint, out, output_format="vit", num_attention_heads=2, decoder_num_attention_heads=2
    )
    return out


@pytest.fixture(scope="session")
def ultrasound_dicoms() -> dict[str, Path]:
    """Real ultrasound DICOM files shipped by ``pydicom-data``, by file name."""
    from pydicom.data import get_testdata_file

    from usfmae_hf.quickstart.runner import ULTRASOUND_DICOMS

    found = {}
    for name in ULTRASOUND_DICOMS:
        path = get_testdata_file(name)
        if path is not None:
            found[name] = Path(path)
    return found


@pytest.fixture
def tf4_python() -> str:
    """The transformers 4.x interpreter (``USFMAE_TF4_PYTHON``, built by ``.ci/make_tf4_env.sh``).

    Skips when there is none, and fails instead when ``USFMAE_REQUIRE_TF4`` is set (as in CI).
    """
    python = os.environ.get("USFMAE_TF4_PYTHON")
    if not python or not os.path.exists(python):
        if os.environ.get("USFMAE_REQUIRE_TF4"):
            pytest.fail("USFMAE_REQUIRE_TF4 is set but USFMAE_TF4_PYTHON is not a python (run .ci/make_tf4_env.sh)")
        pytest.skip("no transformers 4.x environment (set USFMAE_TF4_PYTHON; .ci/make_tf4_env.sh builds one)")
    return python
