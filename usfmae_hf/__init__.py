"""usfmae-hf: USF-MAE, the ultrasound masked-autoencoder foundation model, for the Hugging Face stack.

Heavy modules (torch, transformers) are imported on first use of a public name, so that
``import usfmae_hf`` and ``usfmae --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from usfmae_hf import _moved
from usfmae_hf.version import __version__

_moved.install()

# public name -> module that defines it
_LAZY_EXPORTS = {
    "convert_checkpoint": "usfmae_hf.model.conversion",
    "export_original": "usfmae_hf.model.conversion",
    "load_original_checkpoint": "usfmae_hf.model.checkpoints",
    "load_frames": "usfmae_hf.io",
    "load_image": "usfmae_hf.io",
    "expand_inputs": "usfmae_hf.io",
    "write_features": "usfmae_hf.inference.features",
    "load_encoder": "usfmae_hf.inference.features",
    "extract_features": "usfmae_hf.inference.features",
    "reconstruct": "usfmae_hf.inference.features",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'usfmae_hf' has no attribute {name!r}")
