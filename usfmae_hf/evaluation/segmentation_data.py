"""Segmentation data: images with label masks as leakage-safe ``DatasetDict``s (train / validation / test).

Every source becomes splits with the columns ``image`` (``datasets.Image``; files are read lazily),
``mask`` (``datasets.Image``: single-channel PNG of label ids ``0..K-1``, decoded as mode ``L``),
``classes`` (the label ids present in that mask, ``Sequence(ClassLabel)`` naming all ``K`` labels,
background first: ``ds.features["classes"].feature.names``), ``id`` (file stem), plus ``patient`` where
the layout knows patients and ``pixel_spacing`` (mm; None when unknown) where it knows the spacing.
Masks are converted once, at load time, whatever their stored form (0/1 or 0/255 binaries, colour
codes, outlines), so every consumer reads plain label ids; a value that is not a label is an error.

Sources (:func:`load_segmentation_images`, the one entry point): ``--train_dir`` etc. holding
``images/`` + ``masks/``, a ``datasets`` name or path with image and mask columns
(:mod:`~usfmae_hf.evaluation.segmentation_sources`), or a ``--task`` of :data:`SEGMENTATION_TASKS`
(BUS-BRA, BUSI, MMOTU-2D binary and 8-class, HC18; :mod:`~usfmae_hf.evaluation.segmentation_tasks`).
The task adapters find their dataset under ``data_root`` like :mod:`usfmae_hf.evaluation.adapters`,
use the official test split where there is one, carve validation by patient where patients are known,
and record the protocol in ``Dataset.info.description``. Masks are decoded by
:mod:`~usfmae_hf.evaluation.segmentation_masks`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.evaluation import segmentation_tasks
from usfmae_hf.evaluation.dataset_files import load_task
from usfmae_hf.evaluation.segmentation_masks import BINARY_LABELS
from usfmae_hf.evaluation.segmentation_sources import (
    load_segmentation_dataset,
    load_segmentation_folders,
    read_label_names,
)
from usfmae_hf.evaluation.segmentation_tasks import (
    HC18_LABELS,
    MMOTU2D_PALETTE,
    MMOTU2D_SEG_LABELS,
    SEGMENTATION_TASKS,
    load_busbra_seg,
    load_busi_seg,
    load_hc18_seg,
    load_mmotu2d_seg,
    load_mmotu2d_seg8,
)

__all__ = [
    "BINARY_LABELS",
    "HC18_LABELS",
    "MMOTU2D_PALETTE",
    "MMOTU2D_SEG_LABELS",
    "SEGMENTATION_TASKS",
    "load_busbra_seg",
    "load_busi_seg",
    "load_hc18_seg",
    "load_mmotu2d_seg",
    "load_mmotu2d_seg8",
    "load_segmentation_images",
]


def load_segmentation_images(
    *,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    test_dir: str | None = None,
    dataset_name: str | None = None,
    image_column: str = "image",
    mask_column: str = "mask",
    task: str | None = None,
    data_root: str | None = None,
    fold: int | None = None,
    label_names: Sequence[str] | str | os.PathLike | None = None,
):
    """Load one segmentation source: ``images/`` + ``masks/`` directories, a ``datasets`` name/path, or a ``--task``.

    Directories: each of ``train_dir`` / ``validation_dir`` / ``test_dir`` holds ``images/`` (any image
    format) and ``masks/`` (PNG) with matching file stems. Masks holding only 0/1 or 0/255 are
    background/lesion; other masks hold label ids, named by ``label_names`` (a list, or a text file
    with one name per line, or a JSON list) or ``background, class_1, ...``. A ``dataset_name`` needs
    Image columns ``image_column`` and ``mask_column``; its label names come from a ``classes``
    ``Sequence(ClassLabel)`` column if it has one. ``task`` is a key of :data:`SEGMENTATION_TASKS`,
    read from ``data_root`` (``fold`` selects the official fold where the dataset has folds).
    """
    sources = [train_dir is not None, dataset_name is not None, task is not None]
    if sum(sources) != 1:
        raise UsfmaeError("give exactly one data source: --train_dir, --dataset_name or --task")
    if task is not None:
        if label_names is not None:
            raise UsfmaeError(f"--task {task} has fixed label names; --label_names does not apply")
        return load_task(SEGMENTATION_TASKS, task, data_root, fold, segmentation_tasks, kind="segmentation task")
    names = read_label_names(label_names)
    if train_dir is not None:
        dirs = {"train": train_dir, "validation": validation_dir, "test": test_dir}
        return load_segmentation_folders({split: Path(path) for split, path in dirs.items() if path is not None}, names)
    return load_segmentation_dataset(dataset_name, image_column, mask_column, names)
