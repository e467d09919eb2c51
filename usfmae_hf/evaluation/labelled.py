"""Labelled image data for fine-tuning and probing: the ``--task`` names, loading, label checks, unreadable images.

Every source becomes a ``DatasetDict`` with a ``train`` split, optional ``validation`` / ``test``
splits, and columns ``image`` (``datasets.Image``), ``label`` (``ClassLabel``, one set of names for
all splits) and ``id`` (a string naming the image in prediction files).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from usfmae_hf.errors import UnreadableImageError, UsfmaeError

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("validation", "test")
# --task name -> (adapter in usfmae_hf.evaluation, its fold keyword or None, display name for model cards)
TASKS: dict[str, tuple[str, str | None, str]] = {
    "busbra": ("load_busbra", "fold", "BUS-BRA"),
    "mmotu2d": ("load_mmotu2d", None, "MMOTU-2D"),
    "gist514": ("load_gist514", "split", "GIST514-DB"),
}


def load_labelled_images(
    *,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    test_dir: str | None = None,
    dataset_name: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    task: str | None = None,
    data_root: str | None = None,
    fold: int | None = None,
):
    """Load one labelled source: class-per-folder directories, a ``datasets`` name/path, or a ``--task`` adapter.

    Class-per-folder directories share one label set (the union of all folder names, sorted), so a
    class missing from one split keeps its index.
    """
    from datasets import ClassLabel, DatasetDict, load_dataset

    sources = [train_dir is not None, dataset_name is not None, task is not None]
    if sum(sources) != 1:
        raise UsfmaeError("give exactly one data source: --train_dir, --dataset_name or --task")
    if task is not None:
        from usfmae_hf.evaluation import adapters
        from usfmae_hf.evaluation.dataset_files import load_task

        return load_task(TASKS, task, data_root, fold, adapters)
    if train_dir is not None:
        dirs = {"train": train_dir, "validation": validation_dir, "test": test_dir}
        dirs = {split: Path(path) for split, path in dirs.items() if path is not None}
        for split, path in dirs.items():
            if not path.is_dir():
                raise UsfmaeError(f"--{split}_dir {path} is not a directory")
        dataset = load_dataset("imagefolder", data_files={split: str(path / "**") for split, path in dirs.items()})
        if "label" not in dataset["train"].features:
            raise UsfmaeError(f"{train_dir} has no class folders: expected <dir>/<class>/<image>")
        return DatasetDict({split: _with_folder_ids(dataset[split], dirs[split]) for split in dirs})

    dataset = load_dataset(dataset_name)
    if "train" not in dataset:
        raise UsfmaeError(f"{dataset_name} has no 'train' split (splits: {', '.join(dataset)})")
    dataset = DatasetDict({split: dataset[split] for split in ("train", *EVAL_SPLITS) if split in dataset})
    features = dataset["train"].features
    for column in (image_column, label_column):
        if column not in features:
            raise UsfmaeError(f"{dataset_name} has no column {column!r} (columns: {', '.join(features)})")
    if not isinstance(features[label_column], ClassLabel):
        raise UsfmaeError(f"{dataset_name}: column {label_column!r} is not a ClassLabel; cannot name the classes")
    dataset = dataset.rename_columns(
        {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    )
    if "id" not in dataset["train"].column_names:
        dataset = DatasetDict(
            {split: ds.add_column("id", [f"{split}-{i}" for i in range(len(ds))]) for split, ds in dataset.items()}
        )
    return dataset


def task_display_name(task: str) -> str:
    """The dataset name used in model cards for a ``--task`` (e.g. ``"BUS-BRA"``)."""
    return TASKS[task][2]


def _with_folder_ids(dataset, root: Path):
    """Add an ``id`` column ``<class folder>/<file name>`` (relative to the split's directory)."""
    from datasets import Image

    paths = dataset.cast_column("image", Image(decode=False))["image"]
    return dataset.add_column(
        "id", [Path(item["path"]).resolve().relative_to(root.resolve()).as_posix() for item in paths]
    )


def check_labels(dataset) -> list[str]:
    """Return the class names; refuse evaluation labels that the training split never shows.

    A classifier cannot learn a class it never sees, and its metrics on such a split would look
    valid while measuring nothing: this is an error. A class absent from an evaluation split is
    fine (see the metric's documentation for how it is scored).
    """
    names = dataset["train"].features["label"].names
    seen = set(np.unique(dataset["train"]["label"]).tolist())
    for split in EVAL_SPLITS:
        if split not in dataset:
            continue
        if dataset[split].features["label"].names != names:
            raise UsfmaeError(
                f"the {split} split's classes {dataset[split].features['label'].names} differ from train's {names}"
            )
        unseen = sorted(set(np.unique(dataset[split]["label"]).tolist()) - seen)
        if unseen:
            raise UsfmaeError(
                f"the {split} split has class(es) {[names[i] for i in unseen]} that never occur in the training split; "
                "add training images of them or remove them"
            )
    absent = [name for index, name in enumerate(names) if index not in seen]
    if absent:
        logger.warning(
            "classes %s have no training images; the model can still predict them but never learns them", absent
        )
    return names


def _is_readable(image: dict[str, Any]) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as handle:
            handle.load()
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def drop_unreadable(dataset, *, skip: bool, progress: bool = True):
    """Decode every image once; raise :class:`UnreadableImageError` naming the bad ones, or drop them if ``skip``.

    ``progress`` shows a bar per split ("checking train images").

    USF-MAE skipped corrupt images with a warning; here that needs ``skip=True`` so that a broken
    download is never trained on silently.
    """
    from datasets import DatasetDict, Image

    kept = {}
    for split, ds in dataset.items():
        images = ds.cast_column("image", Image(decode=False))["image"]
        bad = [
            i
            for i, image in enumerate(tqdm(images, desc=f"checking {split} images", leave=False, disable=not progress))
            if not _is_readable(image)
        ]
        names = [ds["id"][i] for i in bad[:5]]
        if bad and len(bad) == len(ds):
            raise UnreadableImageError(f"none of the {len(ds)} {split} image(s) can be decoded, e.g. {names}; fix them")
        if bad and not skip:
            raise UnreadableImageError(
                f"{len(bad)} {split} image(s) cannot be decoded, e.g. {names}; fix them or pass --skip_unreadable"
            )
        if bad:
            logger.warning("skipping %d undecodable %s image(s)", len(bad), split)
            ds = ds.select(np.setdiff1d(np.arange(len(ds)), bad))
        kept[split] = ds
    return DatasetDict(kept)
