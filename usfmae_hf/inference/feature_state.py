"""The resumable state of a feature run (``usfmae features``): ``<output>.partial/`` and what it must match.

:class:`Shards` holds the committed rows of an unfinished run and refuses to resume one with other
settings (:class:`FeatureSetup`), naming the difference; :func:`partial_directory`, :func:`rank_directory`
and :func:`check_partial_processes` lay out the partial directory of a run on one or several processes.
:mod:`usfmae_hf.inference.feature_files` runs the steps that fill it.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usfmae_hf.atomic import atomic_write_bytes, atomic_write_text
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.precision import Precision

# In <output>.partial/: present when the run was allowed to replace an existing output (--overwrite),
# so that resuming it without --overwrite (which would start clean) may still replace that output.
REPLACES_OUTPUT = "replaces-output"
_MISSING = object()


@dataclass(frozen=True)
class FeatureSetup:
    """One process's encoder for a feature run, and the settings that decide its numbers.

    Attributes:
        encoder: the encoder, on its device, in its compute dtype.
        processor: its exact USF-MAE image processor.
        precision: the compute precision and why.
        settings: what a resumed run must match (recorded in ``settings.json`` and the output's metadata).
    """

    encoder: torch.nn.Module
    processor: Any
    precision: Precision
    settings: dict[str, Any]


class Shards:
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


def partial_directory(output: Path) -> Path:
    """Where the committed rows of an unfinished run writing ``output`` are kept: ``<output>.partial``."""
    return output.with_name(output.name + ".partial")


def rank_directory(partial: Path, rank: int, processes: int) -> Path:
    """The shard directory of process ``rank`` of ``processes`` in a multi-process run's ``partial`` directory."""
    return partial / f"rank-{rank:05d}-of-{processes:05d}"


def check_partial_processes(partial: Path, processes: int) -> None:
    """Refuse to resume ``partial`` with ``processes`` processes when it holds a run with another process count.

    Raises:
        UsfmaeError: ``partial`` holds the shards of a 1-process run and ``processes`` > 1, or shard
            directories of another process count.
    """
    if not partial.is_dir():
        return
    counts = {path.name.rpartition("-of-")[2] for path in partial.glob("rank-*-of-*") if path.is_dir()}
    found = {int(count) for count in counts if count.isdigit()}
    if (partial / "settings.json").is_file() or any(partial.glob("shard-*.npz")):
        found.add(1)
    for count in sorted(found - {processes}):
        how = "without a launcher" if count == 1 else f"on {count} processes"
        raise UsfmaeError(
            f"{partial} holds an interrupted {count}-process run: rerun it {how}, or pass --overwrite to start clean"
        )


def remove_partial(path: Path) -> None:
    """Remove ``path`` (a partial directory, or a file or link in its place) if it exists."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
