"""Finding a downstream dataset under a data root and splitting it: what every ``--task`` adapter shares.

The classification adapters (:mod:`usfmae_hf.evaluation.adapters`) and the segmentation ones
(:mod:`usfmae_hf.evaluation.segmentation_tasks`) find their dataset by a marker file, look its listed
images up in a folder whatever the file-name case, carve the validation split out of the training
data (by patient where patients are known) and call a ``--task``'s loader from their task table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from usfmae_hf.errors import UsfmaeError

logger = logging.getLogger(__name__)

#: ``--task`` name -> (loader name, its fold keyword or None, display name for model cards)
TaskTable = Mapping[str, tuple[str, str | None, str]]


def find_marker(root: str | os.PathLike, name: str, dataset: str) -> Path:
    """The one file called ``name`` in ``root`` or below (hidden folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise UsfmaeError(f"{root}: not a folder")
    if (root / name).is_file():
        return root / name
    found = sorted(
        p
        for p in root.rglob(name)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not found:
        raise UsfmaeError(f"no {dataset} found under {root} (looked for {name})")
    if len(found) > 1:
        raise UsfmaeError(
            f"several {dataset} copies under {root}: {', '.join(map(str, found[:3]))}; pass one of their folders"
        )
    return found[0]


def image_files(folder: Path, dataset: str) -> dict[str, Path]:
    """Lower-case file name -> path for the files of ``folder`` (file-name case differs between copies)."""
    if not folder.is_dir():
        raise UsfmaeError(f"{dataset}: image folder {folder} is missing")
    return {p.name.lower(): p for p in folder.iterdir() if p.is_file()}


def resolve_files(files: dict[str, Path], names: Sequence[str], dataset: str) -> list[str]:
    """The paths of the listed file ``names`` in ``files`` (from :func:`image_files`); all must be there."""
    missing = [name for name in names if name.lower() not in files]
    if missing:
        raise UsfmaeError(f"{dataset}: {len(missing)} listed images are missing, e.g. {missing[:3]}")
    return [str(files[name.lower()]) for name in names]


def read_cls_file(path: Path) -> tuple[list[str], list[int]]:
    """Image names and integer labels of a ``<image> <label>`` list file (MMOTU-2D's ``*_cls.txt``)."""
    names, labels = [], []
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise UsfmaeError(f"{path}:{line_number}: expected '<image> <label>', got {line!r}")
        names.append(fields[0])
        labels.append(int(fields[1]))
    return names, labels


def carve_validation(
    labels: np.ndarray, groups: np.ndarray | None, val_fraction: float, seed: int, *, dataset: str
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (train, validation): patient-disjoint when ``groups`` is given, else stratified by label.

    A split too small to stratify (fewer validation images than classes, or a class with one image)
    falls back to an unstratified shuffle split, with a warning; fewer than two images (or patients)
    is one clear error naming the dataset.
    """
    from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit, StratifiedShuffleSplit

    if not 0.0 < val_fraction < 1.0:
        raise UsfmaeError(f"val_fraction must be in (0, 1), got {val_fraction}")
    units = len(set(groups.tolist())) if groups is not None else len(labels)
    if units < 2:
        what = "patients" if groups is not None else "training images"
        raise UsfmaeError(f"{dataset}: {units} {what} cannot be split into train and validation; at least 2 are needed")
    if groups is not None:
        splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        return next(splitter.split(labels, labels, groups))
    n_validation = max(1, int(np.ceil(val_fraction * len(labels))))
    _, counts = np.unique(labels, return_counts=True)
    if n_validation < len(counts) or counts.min() < 2 or len(labels) - n_validation < len(counts):
        logger.warning(
            "%s: %d training images in %d classes are too few for a stratified %.0f%% validation split; "
            "using an unstratified one (some classes may be missing from validation)",
            dataset,
            len(labels),
            len(counts),
            100 * val_fraction,
        )
        splitter = ShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        return next(splitter.split(labels))
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    return next(splitter.split(labels, labels))


def take_rows(columns: dict[str, list], indices) -> dict[str, list]:
    """The rows ``indices`` of every column."""
    return {key: [values[i] for i in indices] for key, values in columns.items()}


def load_task(
    tasks: TaskTable, task: str, data_root: str | None, fold: int | None, loaders: ModuleType, *, kind: str = "task"
):
    """Run the loader ``tasks[task]`` names (an attribute of ``loaders``) on ``data_root``, with ``fold`` if given.

    Raises:
        UsfmaeError: an unknown ``task`` (a ``kind`` of task), no ``data_root``, or a ``fold`` for a
            dataset with a single split.
    """
    if task not in tasks:
        raise UsfmaeError(f"unknown {kind} {task!r}; choose one of {', '.join(tasks)}")
    if data_root is None:
        raise UsfmaeError(f"--task {task} needs --data_root (the folder where the dataset was unpacked)")
    loader_name, fold_keyword, display = tasks[task]
    kwargs = {}
    if fold is not None:
        if fold_keyword is None:
            raise UsfmaeError(f"{display} ({task}) has a single official split; --fold does not apply")
        kwargs[fold_keyword] = fold
    return getattr(loaders, loader_name)(data_root, **kwargs)
