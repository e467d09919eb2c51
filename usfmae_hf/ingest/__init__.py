"""Dataset build: the OpenUS-46 catalogue and ingestion of unpacked datasets into one de-duplicated
Parquet Hugging Face dataset.

``push_build_to_hub`` lives in :mod:`usfmae_hf.publishing.hub` (publishing builds on ingest, never
the reverse); ``usfmae_hf.ingest.push_build_to_hub`` still finds it, importing it on first use.
"""

from __future__ import annotations

from typing import Any

from usfmae_hf.ingest.build import IngestOptions, ingest
from usfmae_hf.ingest.decode import ingest_features
from usfmae_hf.ingest.dedup import NearDuplicateIndex
from usfmae_hf.ingest.discover import FILES_PER_SHARD, discover_sources

__all__ = [
    "FILES_PER_SHARD",
    "IngestOptions",
    "NearDuplicateIndex",
    "discover_sources",
    "ingest",
    "ingest_features",
]


def __getattr__(name: str) -> Any:
    if name == "push_build_to_hub":
        import warnings

        warnings.warn(
            "usfmae_hf.ingest.push_build_to_hub moved to usfmae_hf.publishing.hub.push_build_to_hub; "
            "the old path will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        from usfmae_hf.publishing.hub import push_build_to_hub  # deprecated re-export, see tests/test_architecture.py

        return push_build_to_hub
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
