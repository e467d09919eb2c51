"""Inference: deterministic encoder features, masked reconstructions, attention maps, segmentation masks, and the
resumable feature-file writer."""

from __future__ import annotations

from usfmae_hf.inference.attention import AttentionMaps, attention_maps, attention_rollout, save_attention_figure
from usfmae_hf.inference.distributed_features import write_features_distributed
from usfmae_hf.inference.feature_files import FeatureRun, write_features
from usfmae_hf.inference.features import extract_features, load_encoder, pool_tokens, processor_for
from usfmae_hf.inference.reconstruction import Reconstruction, reconstruct, save_reconstruction_grid
from usfmae_hf.inference.segmentation import SegmentationPrediction, load_segmenter, predict_masks

__all__ = [
    "AttentionMaps",
    "FeatureRun",
    "Reconstruction",
    "SegmentationPrediction",
    "attention_maps",
    "attention_rollout",
    "extract_features",
    "load_encoder",
    "load_segmenter",
    "pool_tokens",
    "predict_masks",
    "processor_for",
    "reconstruct",
    "save_attention_figure",
    "save_reconstruction_grid",
    "write_features",
    "write_features_distributed",
]
