"""Inference: deterministic encoder features, masked reconstructions, and the resumable feature-file writer."""

from __future__ import annotations

from usfmae_hf.inference.features import (
    FeatureRun,
    Reconstruction,
    extract_features,
    load_encoder,
    pool_tokens,
    processor_for,
    reconstruct,
    save_reconstruction_grid,
    write_features,
)

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
