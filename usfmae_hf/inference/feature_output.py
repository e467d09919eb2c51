"""Writing a feature run's rows (``usfmae features``): one ``.parquet`` file, or ``.npy`` + ``.csv`` + ``.json``.

:func:`write_output` writes the committed rows of :class:`usfmae_hf.inference.feature_state.Shards` to the
output atomically, with the run's settings as metadata, and removes the partial directory.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from usfmae_hf.atomic import atomic_write_bytes, atomic_write_text
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.inference.feature_state import FeatureSetup, remove_partial


def _write_feature_file(output: Path, paths: list[str], frames: np.ndarray, features: np.ndarray, meta: dict) -> None:
    """Write ``.parquet`` (columns path, frame, features; ``meta`` as schema metadata) or ``.npy``
    (+ ``.csv`` with the path and frame of each row, + ``.json`` holding ``meta``)."""
    if output.suffix == ".npy":
        names = io.StringIO()
        writer = csv.writer(names, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
        writer.writerow(("path", "frame"))
        writer.writerows(zip(paths, frames.tolist()))
        atomic_write_text(output.with_suffix(".csv"), names.getvalue())
        atomic_write_text(output.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True))
        buffer = io.BytesIO()
        np.save(buffer, features.astype(np.float32))
        atomic_write_bytes(output, buffer.getvalue())
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array(features.astype(np.float32).reshape(-1))
    for size in reversed(features.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    table = pa.table(
        {"path": pa.array(paths, pa.string()), "frame": pa.array(frames, pa.int32()), "features": values},
    ).replace_schema_metadata({"usfmae": json.dumps(meta, sort_keys=True)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(output, buffer.getvalue())


def write_output(
    output: Path,
    partial: Path,
    parts: Sequence[tuple[list[str], np.ndarray, np.ndarray]],
    setup: FeatureSetup,
    input_count: int,
    **extra_meta: Any,
) -> list[str]:
    """Write the rows of ``parts`` (from :meth:`Shards.rows`, concatenated in order) to ``output`` atomically,
    with ``setup``'s settings and ``extra_meta`` as metadata, and remove ``partial``; the row paths.

    Raises:
        UsfmaeError: no part has a row (``partial`` is removed: nothing in it is worth resuming).
    """
    parts = [part for part in parts if part[0]]
    if not parts:
        remove_partial(partial)
        raise UsfmaeError(f"no frame could be read from {input_count} input file(s)")
    paths = [path for part in parts for path in part[0]]
    frames = np.concatenate([part[1] for part in parts])
    features = np.concatenate([part[2] for part in parts])
    meta = {
        **setup.settings,
        "precision": str(setup.precision),
        "device": str(next(setup.encoder.parameters()).device),
        "shape": list(features.shape),
        "encoder": "usfmae_hf.inference.features.load_encoder",
        **extra_meta,
    }
    _write_feature_file(output, paths, frames, features, meta)
    remove_partial(partial)
    return paths
