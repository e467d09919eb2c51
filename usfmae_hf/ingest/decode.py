"""The per-chunk worker of a build, and the schema of its rows.

A chunk is decoded (in a worker process when the build runs several) through
:func:`usfmae_hf.io.load_frames` (volumes become slices, cines and videos frames; HDF5 stacks go
through :func:`usfmae_hf.io.hdf5.read_hdf5_frames`) into a staged Parquet file of
:func:`ingest_features` rows. The worker only hashes: each frame's pixel SHA-256
(:func:`usfmae_hf.io.hashing.pixel_sha256` of the decoded, full-size frame) and 64-bit perceptual
hash (``imagehash.phash`` of the full-size frame) go back to the main process, which de-duplicates.
A file that cannot be decoded (corrupt, over the decoded-size limit of :mod:`usfmae_hf.io.limits`,
out of memory) is listed with the reason and skipped; the rest of the chunk goes on.

Worker processes end with the build process (:func:`end_with_parent`), even when it is killed, so no
orphan goes on writing into a build.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from usfmae_hf.errors import UnreadableImageError
from usfmae_hf.ingest.discover import Chunk, SourceFile
from usfmae_hf.io import Frame, file_suffix, load_frames
from usfmae_hf.io.hashing import pixel_sha256
from usfmae_hf.io.hdf5 import HDF5_SUFFIXES, read_hdf5_frames
from usfmae_hf.io.limits import DecodedSizeError

if TYPE_CHECKING:
    from usfmae_hf.ingest.options import IngestOptions

__all__ = ["ROWS_PER_BATCH", "decode_chunk_task", "end_with_parent", "ingest_features"]

#: Rows per Parquet write (bounded memory in the workers and when shards are copied).
ROWS_PER_BATCH = 64
_PNG_COMPRESS_LEVEL = 3
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def ingest_features():
    """The ``datasets.Features`` of a build: image, dataset, path, frame, group, sha256."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "dataset": datasets.Value("string"),
            "path": datasets.Value("string"),
            "frame": datasets.Value("int32"),
            "group": datasets.Value("string"),
            "sha256": datasets.Value("string"),
        }
    )


def end_with_parent(parent_pid: int) -> None:
    """Worker initializer: make this process end when its parent, the build process ``parent_pid``, dies.

    On Linux the kernel kills the worker (``prctl(PR_SET_PDEATHSIG, SIGKILL)``: immediate, even while
    it decodes); elsewhere a daemon thread watches for the worker being re-parented. A worker whose
    parent died before this ran exits at once.
    """
    pdeathsig = False
    if sys.platform.startswith("linux"):
        pdeathsig = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    if not pdeathsig:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _frames(file: SourceFile, options: IngestOptions, max_decoded_bytes: int) -> Iterator[Frame]:
    if file_suffix(file.path) in HDF5_SUFFIXES:
        return read_hdf5_frames(file.path, options.frame_stride)
    return load_frames(
        file.path,
        frame_stride=options.frame_stride,
        slice_stride=options.slice_stride,
        max_decoded_bytes=max_decoded_bytes,
    )


def _encode(rgb: np.ndarray, resize: int | None) -> bytes:
    """PNG bytes of the frame as stored: optionally resized NEAREST, 8-bit grey when the channels agree."""
    image = Image.fromarray(rgb, mode="RGB")
    if resize is not None:
        image = image.resize((resize, resize), Image.Resampling.NEAREST)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        image = image.convert("L")  # lossless here, and a third of the bytes to decode at training time
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _failure(file: SourceFile, error: Exception) -> dict[str, Any]:
    """The report entry of a file that could not be ingested."""
    if isinstance(error, UnreadableImageError):
        reason = str(error).removeprefix(f"{file.path}: ")
    elif isinstance(error, MemoryError):  # numpy's _ArrayMemoryError included
        reason = f"out of memory ({str(error) or type(error).__name__})"
    else:
        reason = f"{type(error).__name__}: {error}"
    failure: dict[str, Any] = {"path": file.relative, "reason": reason}
    if isinstance(error, DecodedSizeError):
        failure["decoded_bytes"] = error.decoded_bytes
    return failure


def _decode_chunk(chunk: Chunk, options: IngestOptions, staged: Path, max_decoded_bytes: int) -> dict[str, Any]:
    """Worker: decode every file of ``chunk`` into ``staged`` (Parquet); return hashes and failures.

    A failure is ``{"path", "reason"}``, plus ``decoded_bytes`` (the header's claim) for a file over
    the ``max_decoded_bytes`` limit, so that a rerun with a higher limit decodes it.
    """
    import imagehash
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = ingest_features().arrow_schema
    hashes: list[list] = []
    errors: list[dict[str, str]] = []
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(staged, schema) as writer:
        for file in chunk.files:
            rows, row_hashes = [], []
            try:
                for frame in _frames(file, options, max_decoded_bytes):
                    sha = pixel_sha256(frame.image)
                    phash = str(imagehash.phash(Image.fromarray(frame.image, mode="RGB")))
                    group = frame.metadata.get("group", file.group)
                    rows.append(
                        {
                            "image": {"bytes": _encode(frame.image, options.resize), "path": None},
                            "dataset": chunk.dataset,
                            "path": file.relative,
                            "frame": frame.index,
                            "group": group,
                            "sha256": sha,
                        }
                    )
                    row_hashes.append([file.relative, frame.index, sha, phash])
                if not rows:
                    raise UnreadableImageError(f"{file.path}: contains no frames")
            except Exception as error:  # noqa: BLE001 - one bad file must never stop a build
                errors.append(_failure(file, error))
                continue
            hashes.extend(row_hashes)
            batch.extend(rows)
            while len(batch) >= ROWS_PER_BATCH:
                writer.write_table(pa.Table.from_pylist(batch[:ROWS_PER_BATCH], schema=schema))
                del batch[:ROWS_PER_BATCH]
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return {"hashes": hashes, "errors": errors}


def decode_chunk_task(args: tuple[Chunk, IngestOptions, Path, int]) -> dict[str, Any]:
    """:func:`_decode_chunk` on one ``(chunk, options, staged, max_decoded_bytes)`` tuple (``Executor.map``'s form)."""
    return _decode_chunk(*args)
