"""usfmae-hf: USF-MAE, the ultrasound masked-autoencoder foundation model, for the Hugging Face stack.

Each sub-package does one job. Layers, lowest first; a module imports only its own layer and the
layers below it (``tests/test_architecture.py`` reads every import, lazy ones included, and fails on
an upward import or a circle):

1. ``errors``, ``failures`` (one-line reports of failures), ``version``, ``atomic`` (atomic writes),
   ``launch`` (the training scripts' launcher)
2. ``io``: files to RGB frames (images, DICOM incl. cine, volumes, video, HDF5), content hashes
3. ``image``: USF-MAE's exact image processor, augmentations, scan-area crop and de-annotation
4. ``ingest``: the OpenUS-46 catalogue and the de-duplicated Parquet dataset build
5. ``publishing``: model and dataset cards, Hub uploads
6. ``model``: the MAE key table, safe checkpoint reading, conversion, export, the reference MAE
7. ``inference``: deterministic features, reconstructions, resumable feature files
8. ``evaluation``: downstream adapters, leakage checks, metrics, probes, cross-validation, reports
9. ``pretraining``: Accelerate MAE pretraining
10. ``finetuning``: Trainer fine-tuning (heads, recipe, data transforms)
11. ``quickstart``, ``commands``, ``cli``: the ``usfmae`` command line and its demo

Heavy modules (torch, transformers) are imported on first use of a public name, so that
``import usfmae_hf`` and ``usfmae --help`` stay fast. Modules moved in 0.2 keep their old import
paths for one release, with a ``DeprecationWarning``.
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
    "write_features": "usfmae_hf.inference.feature_files",
    "load_encoder": "usfmae_hf.inference.features",
    "extract_features": "usfmae_hf.inference.features",
    "reconstruct": "usfmae_hf.inference.reconstruction",
    "attention_maps": "usfmae_hf.inference.attention",
    "load_segmenter": "usfmae_hf.inference.segmentation",
    "predict_masks": "usfmae_hf.inference.segmentation",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'usfmae_hf' has no attribute {name!r}")
