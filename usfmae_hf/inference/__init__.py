"""Inference: deterministic encoder features, masked reconstructions, and the resumable feature-file writer."""

from __future__ import annotations

from usfmae_hf.inference.feature_files import FeatureRun, write_features
from usfmae_hf.inference.features import extract_features, load_encoder, pool_tokens, processor_for
from usfmae_hf.inference.reconstruction import Reconstruction, reconstruct, save_reconstruction_grid

__all__ = [
    "FeatureRun",
    "Reconstruction",
    "extract_features",
    "load_encoder",
    "pool_tokens",
    "processor_for",
    "reconstruct",
    "save_reconstruction_grid",
    "write_features",
]
