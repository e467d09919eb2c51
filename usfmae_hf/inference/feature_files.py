"""Batch feature files (``usfmae features``): one ``.parquet`` or ``.npy`` file of encoder features, resumable.

:func:`write_features` encodes every kept frame of every input file with
:func:`usfmae_hf.inference.features.extract_features`. Rows of completed input files are saved as
shards in ``<output>.partial/`` (:class:`_Shards`), so rerunning the same command after an
interruption skips the files already done; the output is written atomically at the end.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from usfmae_hf.atomic import atomic_write_bytes, atomic_write_text, ensure_writable_output
from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.inference.features import POOLINGS, Pooling, extract_features, load_encoder, processor_for
from usfmae_hf.io import expand_inputs, load_frames


@dataclass(frozen=True)
class FeatureRun:
    """What :func:`write_features` did.

    Attributes:
        output: the feature file written.
        rows: frames in it (one row per frame).
        files: input files that contributed rows.
        resumed_files: of those, files whose features came from an interrupted earlier run.
        skipped: one ``"path: reason"`` line per unreadable input file.
    """

    output: Path
    rows: int
    files: int
    resumed_files: int
    skipped: list[str]


class _Shards:
    """Feature rows of completed input files, saved in ``<output>.partial/`` so a rerun can resume.

    A shard is written only between input files and holds whole files, so every file it names is
    complete; a rerun with the same settings skips those files.
    """

    def __init__(self, directory: Path, settings: dict[str, Any]) -> None:
        self.directory = directory
        settings_file = directory / "settings.json"
        if settings_file.is_file():
            previous = json.loads(settings_file.read_text())
            if previous != settings:
                raise UsfmaeError(
                    f"{directory} holds an interrupted run with other settings ({previous}); "
                    "rerun with those settings or delete it"
                )
        else:
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(settings_file, json.dumps(settings, sort_keys=True))
        self.paths = sorted(directory.glob("shard-*.npz"))
        self.done: set[str] = set()
        for shard in self.paths:
            with np.load(shard) as data:
                self.done.update(data["paths"].tolist())

    def write(self, paths: list[str], frames: list[int], features: list[torch.Tensor]) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            paths=np.array(paths),
            frames=np.array(frames, dtype=np.int64),
            features=torch.stack(features).numpy(),
        )
        shard = self.directory / f"shard-{len(self.paths):06d}.npz"
        atomic_write_bytes(shard, buffer.getvalue())
        self.paths.append(shard)
        self.done.update(paths)

    def rows(self, order: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """All rows of files in ``order``, sorted by that order and then by frame index."""
        rank = {path: position for position, path in enumerate(order)}
        paths, frames, features = [], [], []
        for shard in self.paths:
            with np.load(shard) as data:
                keep = np.array([p in rank for p in data["paths"].tolist()], dtype=bool)
                paths.extend(data["paths"][keep].tolist())
                frames.append(data["frames"][keep])
                features.append(data["features"][keep])
        if not paths:
            return [], np.zeros(0, np.int64), np.zeros((0,), np.float32)
        frames_array = np.concatenate(frames)
        order_index = sorted(range(len(paths)), key=lambda i: (rank[paths[i]], frames_array[i]))
        return [paths[i] for i in order_index], frames_array[order_index], np.concatenate(features)[order_index]


def _write_feature_file(output: Path, paths: list[str], frames: np.ndarray, features: np.ndarray, meta: dict) -> None:
    """Write ``.parquet`` (columns path, frame, features) or ``.npy`` (+ ``.csv`` of path, frame per row)."""
    if output.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, features.astype(np.float32))
        rows = "path,frame\n" + "".join(f'"{p}",{f}\n' for p, f in zip(paths, frames.tolist()))
        atomic_write_text(output.with_suffix(".csv"), rows)
        atomic_write_bytes(output, buffer.getvalue())
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array(features.astype(np.float32).reshape(-1))
    for size in reversed(features.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    table = pa.table(
        {"path": pa.array(paths, pa.string()), "frame": pa.array(frames, pa.int32()), "features": values},
    ).replace_schema_metadata({"usfmae": json.dumps(meta)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(output, buffer.getvalue())


def write_features(
    inputs: Sequence[str | os.PathLike],
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    pooling: Pooling = "cls",
    batch_size: int = 32,
    frame_stride: int = 1,
    slice_stride: int = 1,
    axis: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_skip: Any = None,
    checkpoint_rows: int = 1024,
) -> FeatureRun:
    """Extract features of every frame of every input file into one ``.parquet`` or ``.npy`` file.

    Inputs are expanded by :func:`usfmae_hf.io.expand_inputs` (files, folders, globs; cines, volumes
    and videos give one row per kept frame). Unreadable files are reported through ``on_skip(message)``
    (default: a warning) and skipped. Progress is saved in ``<output>.partial/`` whenever at least
    ``checkpoint_rows`` rows of whole files are pending, so rerunning the same command after an interruption resumes;
    the output is written atomically at the end and the partial directory removed.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is false.
        UsfmaeError: no frame could be read from the inputs, or a partial run has other settings.
    """
    output = Path(output)
    if output.suffix not in (".parquet", ".npy"):
        raise UsfmaeError(f"{output}: the output must end in .parquet or .npy")
    ensure_writable_output(output, overwrite)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    report = on_skip or (lambda message: warnings.warn(f"skipped {message}", stacklevel=2))
    files = [str(path) for path in expand_inputs(inputs)]
    settings = {
        "model": str(Path(model).resolve()),
        "pooling": pooling,
        "frame_stride": frame_stride,
        "slice_stride": slice_stride,
        "axis": axis,
    }
    partial = output.with_name(output.name + ".partial")
    shards = _Shards(partial, settings)
    resumed = [path for path in files if path in shards.done]
    encoder = load_encoder(model, device=device, dtype=dtype)
    processor = processor_for(encoder)

    queue: list[tuple[str, int, np.ndarray]] = []  # frames waiting for a forward pass
    rows: list[tuple[str, int, torch.Tensor]] = []  # computed, not yet in a shard
    skipped: list[str] = []

    def run_queue() -> None:
        if queue:
            images = [image for _, _, image in queue]
            features = extract_features(encoder, images, pooling, len(queue), processor=processor)
            rows.extend((path, index, row) for (path, index, _), row in zip(queue, features))
            queue.clear()

    def write_shard() -> None:
        run_queue()
        if rows:
            shards.write([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
            rows.clear()

    bar = tqdm(files, desc="features", unit="file", disable=not progress)
    for path in bar:
        if path in shards.done:
            continue
        try:
            count = 0
            for frame in load_frames(path, frame_stride=frame_stride, slice_stride=slice_stride, axis=axis):
                queue.append((path, frame.index, frame.image))
                count += 1
                if len(queue) >= batch_size:
                    run_queue()
            if count == 0:
                raise UnreadableImageError(f"{path}: contains no frames")
        except UnreadableImageError as error:
            queue[:] = [item for item in queue if item[0] != path]
            rows[:] = [item for item in rows if item[0] != path]
            skipped.append(str(error))
            report(str(error))
            continue
        if len(rows) + len(queue) >= checkpoint_rows:
            write_shard()
    write_shard()
    bar.close()

    paths, frames, features = shards.rows(files)
    if not paths:
        shutil.rmtree(partial, ignore_errors=True)
        raise UsfmaeError(f"no frame could be read from {len(files)} input file(s)")
    meta = {**settings, "shape": list(features.shape), "encoder": "usfmae_hf.inference.features.load_encoder"}
    _write_feature_file(output, paths, frames, features, meta)
    shutil.rmtree(partial, ignore_errors=True)
    return FeatureRun(output, len(paths), len(set(paths)), len(resumed), skipped)
