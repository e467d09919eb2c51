"""Batch feature files (``usfmae features``): one ``.parquet`` or ``.npy`` file of encoder features, resumable.

:func:`write_features` encodes every kept frame of every input file with
:func:`usfmae_hf.inference.features.extract_features`. Finished rows are committed as shards in
``<output>.partial/`` (:class:`Shards`) every few seconds, so rerunning the same command after an
interruption (Ctrl-C, a crash, a lost machine) skips the frames already done; the output is written
atomically at the end. A resumed run must compute the same numbers: the partial directory records
everything that changes them (model files, processor, pooling, strides, dtype) and a rerun with other
settings is refused, naming the difference.

:mod:`usfmae_hf.inference.distributed_features` runs the same steps (:func:`claim_output`,
:func:`load_for_features`, :func:`encode_files`, :func:`write_output`) on several processes, with one
shard directory per process in ``<output>.partial/rank-RRRRR-of-NNNNN/``; :func:`check_partial_processes`
keeps a run from resuming, or silently discarding, the partial directory of a run on another number of
processes. The partial state lives in :mod:`usfmae_hf.inference.feature_state`, the output writers in
:mod:`usfmae_hf.inference.feature_output`; their public names are importable from here too.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from usfmae_hf.atomic import atomic_write_text, ensure_writable_output
from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.inference.feature_output import write_output
from usfmae_hf.inference.feature_state import (
    REPLACES_OUTPUT,
    FeatureSetup,
    Shards,
    check_partial_processes,
    partial_directory,
    rank_directory,
    remove_partial,
)
from usfmae_hf.inference.features import POOLINGS, Pooling, extract_features, load_encoder, processor_for
from usfmae_hf.io import expand_inputs, load_frames
from usfmae_hf.precision import choose_precision

__all__ = [
    "REPLACES_OUTPUT",
    "FeatureRun",
    "FeatureSetup",
    "FeaturesInterrupted",
    "Shards",
    "check_partial_processes",
    "claim_output",
    "encode_files",
    "load_for_features",
    "partial_directory",
    "rank_directory",
    "write_features",
    "write_output",
]


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
        processes: how many processes shared the work.
    """

    output: Path
    rows: int
    files: int
    resumed_files: int
    skipped: list[str]
    precision: str
    processes: int = 1


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


def load_for_features(
    model: str | os.PathLike,
    *,
    pooling: Pooling,
    frame_stride: int,
    slice_stride: int,
    axis: int,
    device: str | torch.device | None,
    dtype: str | torch.dtype,
) -> FeatureSetup:
    """Load the encoder of ``model`` for :func:`encode_files` and list everything that changes its numbers.

    Raises:
        ValueError: ``pooling`` is unknown.
        UsfmaeError: ``model`` is not a converted model directory, or ``dtype`` cannot run on ``device``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    precision = choose_precision(dtype, device)
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
    return FeatureSetup(encoder, processor, precision, settings)


def claim_output(output: Path, *, overwrite: bool, processes: int) -> Path:
    """Check that a run on ``processes`` processes may write ``output``; its partial directory.

    With ``overwrite``, an interrupted run's partial directory is discarded first; without it, an
    existing ``output`` is refused unless the interrupted run being resumed was allowed to replace it.

    Raises:
        UsfmaeError: ``output`` does not end in ``.parquet`` or ``.npy``.
        OutputExistsError: ``output`` exists and may not be replaced.
        UsfmaeError: the partial directory holds a run on another number of processes.
    """
    if output.suffix not in (".parquet", ".npy"):
        raise UsfmaeError(f"{output}: the output must end in .parquet or .npy")
    partial = partial_directory(output)
    if overwrite:
        remove_partial(partial)
    ensure_writable_output(output, overwrite or (partial / REPLACES_OUTPUT).is_file())
    check_partial_processes(partial, processes)
    return partial


def encode_files(
    files: Sequence[str],
    setup: FeatureSetup,
    shards: Shards,
    *,
    batch_size: int,
    progress: bool,
    report: Callable[[str], None],
    checkpoint_rows: int,
    checkpoint_seconds: float,
) -> list[str]:
    """Encode every kept frame of ``files`` that ``shards`` lacks, committing rows as they are done.

    Returns the ``"path: reason"`` line of each unreadable file (also given to ``report``).

    Raises:
        FeaturesInterrupted: on Ctrl-C, saying what ``shards`` holds.
    """
    settings = setup.settings
    strides = {key: settings[key] for key in ("frame_stride", "slice_stride", "axis")}
    queue: list[tuple[str, int, np.ndarray]] = []  # frames waiting for a forward pass
    rows: list[tuple[str, int, torch.Tensor]] = []  # computed, not yet committed
    loaded: list[str] = []  # files read to the end since the last commit
    skipped: list[str] = []
    last_commit = time.monotonic()

    def run_queue() -> None:
        if queue:
            images = [image for _, _, image in queue]
            features = extract_features(
                setup.encoder, images, settings["pooling"], len(queue), processor=setup.processor
            )
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
                for frame in load_frames(path, **strides):
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
        raise FeaturesInterrupted(shards.directory, shards.row_count, len(shards.complete)) from interrupt
    finally:
        bar.close()
    return skipped


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

    This runs in one process; :func:`usfmae_hf.inference.distributed_features.write_features_distributed`
    shares the inputs among the processes of a launcher (``accelerate launch``, ``torchrun``).

    Args:
        dtype: compute precision, ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch dtype
            (see :func:`usfmae_hf.precision.choose_precision`).

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is false.
        UsfmaeError: no frame could be read from the inputs, or a partial run has other settings (or was
            run on several processes).
        FeaturesInterrupted: on Ctrl-C (a ``KeyboardInterrupt``), saying what is saved.
    """
    output = Path(output)
    partial = claim_output(output, overwrite=overwrite, processes=1)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    choose_precision(dtype, device)  # an impossible precision fails before the inputs are listed
    report = on_skip or (lambda message: warnings.warn(f"skipped {message}", stacklevel=2))
    files = [str(path) for path in expand_inputs(inputs)]
    setup = load_for_features(
        model,
        pooling=pooling,
        frame_stride=frame_stride,
        slice_stride=slice_stride,
        axis=axis,
        device=device,
        dtype=dtype,
    )
    shards = Shards(partial, setup.settings)
    if overwrite:
        atomic_write_text(partial / REPLACES_OUTPUT, "")
    resumed = [path for path in files if path in shards.frames or path in shards.complete]
    skipped = encode_files(
        files,
        setup,
        shards,
        batch_size=batch_size,
        progress=progress,
        report=report,
        checkpoint_rows=checkpoint_rows,
        checkpoint_seconds=checkpoint_seconds,
    )
    paths = write_output(output, partial, [shards.rows(files)], setup, len(files))
    return FeatureRun(output, len(paths), len(set(paths)), len(resumed), skipped, str(setup.precision))
