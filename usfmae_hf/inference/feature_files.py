"""Batch feature files (``usfmae features``): one ``.parquet`` or ``.npy`` file of encoder features, resumable.

:func:`write_features` encodes every kept frame of every input file with
:func:`usfmae_hf.inference.features.extract_features`. Finished rows are committed as shards in
``<output>.partial/`` (:class:`_Shards`) every few seconds, so rerunning the same command after an
interruption (Ctrl-C, a crash, a lost machine) skips the frames already done; the output is written
atomically at the end. A resumed run must compute the same numbers: the partial directory records
everything that changes them (model files, processor, pooling, strides, dtype) and a rerun with other
settings is refused, naming the difference.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
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
from usfmae_hf.precision import choose_precision

# In <output>.partial/: present when the run was allowed to replace an existing output (--overwrite),
# so that resuming it without --overwrite (which would start clean) may still replace that output.
_REPLACES_OUTPUT = "replaces-output"
_MISSING = object()


@dataclass(frozen=True)
class FeatureRun:
    """What :func:`write_features` did.

    Attributes:
        output: the feature file written.
        rows: frames in it (one row per frame).
        files: input files that contributed rows.
        resumed_files: of those, files with rows from an interrupted earlier run.
        skipped: one ``"path: reason"`` line per unreadable input file.
        precision: the compute precision and why, e.g. ``"bf16 (CPU has AMX)"``.
    """

    output: Path
    rows: int
    files: int
    resumed_files: int
    skipped: list[str]
    precision: str


class FeaturesInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`write_features`; what is saved for a rerun to resume from.

    Attributes:
        partial: the ``<output>.partial`` directory.
        rows: committed frame rows.
        files: input files all of whose frames are committed.
    """

    def __init__(self, partial: Path, rows: int, files: int) -> None:
        super().__init__(f"interrupted; {rows} finished row(s) ({files} file(s) complete) are saved in {partial}")
        self.partial, self.rows, self.files = partial, rows, files


class _Shards:
    """Committed feature rows in ``<output>.partial/``, so that a rerun with the same settings resumes.

    Each shard holds some frame rows and the names of the files completed by it (all of whose frames
    are in this or earlier shards); only completed files reach the output.
    """

    def __init__(self, directory: Path, settings: dict[str, Any]) -> None:
        self.directory = directory
        settings_file = directory / "settings.json"
        self.paths = sorted(directory.glob("shard-*.npz"))
        if settings_file.is_file():
            previous = json.loads(settings_file.read_text())
            current = json.loads(json.dumps(settings))  # as JSON would give it back (tuples as lists)
            if previous != current:
                raise UsfmaeError(
                    f"{directory} holds an interrupted run with other settings "
                    f"({'; '.join(_differences(previous, current))}): rerun with those settings, "
                    "or pass --overwrite to start clean"
                )
        elif self.paths:
            raise UsfmaeError(f"{directory} holds feature shards but no settings.json: pass --overwrite to start clean")
        else:
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(settings_file, json.dumps(settings, sort_keys=True))
        self.frames: dict[str, set[int]] = {}  # committed frame indices per file
        self.complete: set[str] = set()
        for shard in self.paths:
            with np.load(shard) as data:
                for path, frame in zip(data["paths"].tolist(), data["frames"].tolist()):
                    self.frames.setdefault(path, set()).add(frame)
                self.complete.update(data["complete"].tolist())

    @property
    def row_count(self) -> int:
        return sum(len(frames) for frames in self.frames.values())

    def commit(self, rows: list[tuple[str, int, torch.Tensor]], complete: list[str]) -> None:
        """Save ``rows`` (path, frame index, features) and mark ``complete`` files done, atomically."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            paths=np.array([path for path, _, _ in rows], dtype=str),
            frames=np.array([frame for _, frame, _ in rows], dtype=np.int64),
            features=torch.stack([row for _, _, row in rows]).numpy() if rows else np.zeros(0, np.float32),
            complete=np.array(complete, dtype=str),
        )
        shard = self.directory / f"shard-{len(self.paths):06d}.npz"
        atomic_write_bytes(shard, buffer.getvalue())
        self.paths.append(shard)
        for path, frame, _ in rows:
            self.frames.setdefault(path, set()).add(frame)
        self.complete.update(complete)

    def rows(self, order: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """All rows of the complete files in ``order``, sorted by that order and then by frame index."""
        rank = {path: position for position, path in enumerate(order) if path in self.complete}
        paths, frames, features = [], [], []
        for shard in self.paths:
            with np.load(shard) as data:
                keep = np.array([p in rank for p in data["paths"].tolist()], dtype=bool)
                if keep.any():
                    paths.extend(data["paths"][keep].tolist())
                    frames.append(data["frames"][keep])
                    features.append(data["features"][keep])
        if not paths:
            return [], np.zeros(0, np.int64), np.zeros((0,), np.float32)
        frames_array = np.concatenate(frames)
        order_index = sorted(range(len(paths)), key=lambda i: (rank[paths[i]], frames_array[i]))
        return [paths[i] for i in order_index], frames_array[order_index], np.concatenate(features)[order_index]


def _differences(previous: Any, current: Any, prefix: str = "") -> list[str]:
    """``"key was X, now Y"`` for every leaf where two settings dicts differ (nested keys dotted)."""
    if not (isinstance(previous, dict) and isinstance(current, dict)):
        return [f"{prefix} was {_show(previous)}, now {_show(current)}"]
    found = []
    for key in sorted(previous.keys() | current.keys()):
        old, new = previous.get(key, _MISSING), current.get(key, _MISSING)
        if old != new:
            found.extend(_differences(old, new, f"{prefix}.{key}" if prefix else key))
    return found


def _show(value: Any) -> str:
    text = "(not set)" if value is _MISSING else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _model_files(model: Path) -> dict[str, str]:
    """What identifies a model directory's numbers: config files by content, weight files by size and mtime.

    (Hashing the weights would cost seconds per run for large models; a copied or rewritten weight file
    changes its mtime, which refuses a resume that might not be needed, never allows a wrong one.)
    """
    found = {}
    for path in sorted(model.iterdir()):
        if path.name in ("config.json", "preprocessor_config.json"):
            found[path.name] = "sha256 " + hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
            stat = path.stat()
            found[path.name] = f"{stat.st_size} bytes, modified {stat.st_mtime_ns} ns"
    return found


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


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


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
    dtype: str | torch.dtype = "auto",
    overwrite: bool = False,
    progress: bool = True,
    on_skip: Any = None,
    checkpoint_rows: int = 1024,
    checkpoint_seconds: float = 5.0,
) -> FeatureRun:
    """Extract features of every frame of every input file into one ``.parquet`` or ``.npy`` file.

    Inputs are expanded by :func:`usfmae_hf.io.expand_inputs` (files, folders, globs; cines, volumes
    and videos give one row per kept frame), each real file once. Unreadable files are reported through
    ``on_skip(message)`` (default: a warning) and skipped. Finished rows are committed to
    ``<output>.partial/`` whenever ``checkpoint_rows`` are pending or ``checkpoint_seconds`` have passed,
    so rerunning the same call after an interruption resumes; ``overwrite`` starts clean instead. The
    output is written atomically at the end, with the settings and the precision in its metadata
    (Parquet schema metadata ``usfmae``, or ``<output>.json`` beside a ``.npy``).

    Args:
        dtype: compute precision, ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch dtype
            (see :func:`usfmae_hf.precision.choose_precision`).

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is false.
        UsfmaeError: no frame could be read from the inputs, or a partial run has other settings.
        FeaturesInterrupted: on Ctrl-C (a ``KeyboardInterrupt``), saying what is saved.
    """
    output = Path(output)
    if output.suffix not in (".parquet", ".npy"):
        raise UsfmaeError(f"{output}: the output must end in .parquet or .npy")
    partial = output.with_name(output.name + ".partial")
    if overwrite:
        _remove(partial)
    ensure_writable_output(output, overwrite or (partial / _REPLACES_OUTPUT).is_file())
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    precision = choose_precision(dtype, device)
    report = on_skip or (lambda message: warnings.warn(f"skipped {message}", stacklevel=2))
    files = [str(path) for path in expand_inputs(inputs)]
    encoder = load_encoder(model, device=device, dtype=precision.dtype)
    processor = processor_for(encoder)
    settings = {
        "model": str(Path(model).resolve()),
        "model_files": _model_files(Path(model)),
        "image_size": encoder.config.image_size,
        "processor": processor.to_dict(),
        "pooling": pooling,
        "frame_stride": frame_stride,
        "slice_stride": slice_stride,
        "axis": axis,
        "dtype": precision.name,
    }
    shards = _Shards(partial, settings)
    if overwrite:
        atomic_write_text(partial / _REPLACES_OUTPUT, "")
    resumed = [path for path in files if path in shards.frames or path in shards.complete]

    queue: list[tuple[str, int, np.ndarray]] = []  # frames waiting for a forward pass
    rows: list[tuple[str, int, torch.Tensor]] = []  # computed, not yet committed
    loaded: list[str] = []  # files read to the end since the last commit
    skipped: list[str] = []
    last_commit = time.monotonic()

    def run_queue() -> None:
        if queue:
            images = [image for _, _, image in queue]
            features = extract_features(encoder, images, pooling, len(queue), processor=processor)
            rows.extend((path, index, row) for (path, index, _), row in zip(queue, features))
            queue.clear()

    def commit() -> None:
        nonlocal last_commit
        run_queue()
        if rows or loaded:
            shards.commit(rows, loaded)
            rows.clear()
            loaded.clear()
        last_commit = time.monotonic()

    def due() -> bool:
        return len(rows) + len(queue) >= checkpoint_rows or time.monotonic() - last_commit >= checkpoint_seconds

    bar = tqdm(files, desc="features", unit="file", disable=not progress)
    try:
        for path in bar:
            if path in shards.complete:
                continue
            done = shards.frames.get(path, set())
            try:
                count = 0
                for frame in load_frames(path, frame_stride=frame_stride, slice_stride=slice_stride, axis=axis):
                    count += 1
                    if frame.index in done:
                        continue
                    queue.append((path, frame.index, frame.image))
                    if len(queue) >= batch_size:
                        run_queue()
                        if due():
                            commit()
                if count == 0:
                    raise UnreadableImageError(f"{path}: contains no frames")
            except UnreadableImageError as error:
                queue[:] = [item for item in queue if item[0] != path]
                rows[:] = [item for item in rows if item[0] != path]
                skipped.append(str(error))
                report(str(error))
                continue
            loaded.append(path)
            if due():
                commit()
        commit()
    except KeyboardInterrupt as interrupt:
        raise FeaturesInterrupted(partial, shards.row_count, len(shards.complete)) from interrupt
    finally:
        bar.close()

    paths, frames, features = shards.rows(files)
    if not paths:
        _remove(partial)
        raise UsfmaeError(f"no frame could be read from {len(files)} input file(s)")
    meta = {
        **settings,
        "precision": str(precision),
        "device": str(next(encoder.parameters()).device),
        "shape": list(features.shape),
        "encoder": "usfmae_hf.inference.features.load_encoder",
    }
    _write_feature_file(output, paths, frames, features, meta)
    _remove(partial)
    return FeatureRun(output, len(paths), len(set(paths)), len(resumed), skipped, str(precision))
