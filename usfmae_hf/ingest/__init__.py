"""Dataset build: the OpenUS-46 catalogue and ingestion of unpacked datasets into one de-duplicated
Parquet Hugging Face dataset."""

from __future__ import annotations

from usfmae_hf.ingest.build import (
    FILES_PER_SHARD,
    IngestOptions,
    NearDuplicateIndex,
    discover_sources,
    ingest,
    ingest_features,
    push_build_to_hub,
)

__all__ = [
    "FILES_PER_SHARD",
    "IngestOptions",
    "NearDuplicateIndex",
    "discover_sources",
    "ingest",
    "ingest_features",
    "push_build_to_hub",
]
