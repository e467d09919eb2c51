"""Training data for MAE pretraining: sources, per-sample seeding, bad-image skipping, loading, previews.

Each sample's augmentation parameters and masking noise are drawn from its own generator seeded by
``(seed, epoch, sample index)``. A sample therefore looks the same whichever process, DataLoader
worker or resumed run produces it, which is what makes a 2-process run step-for-step equal to a
1-process run with the same global batch, and a resumed run equal to an uninterrupted one.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from usfmae_hf.errors import UsfmaeError

if TYPE_CHECKING:
    from usfmae_hf.pretraining.arguments import DataArguments, PretrainingArguments

logger = logging.getLogger(__name__)

# A run of this many unreadable samples in a row means the data, not a file, is broken.
MAX_CONSECUTIVE_BAD = 100
# Fewer samples than this say little about the bad-image rate; the check waits (except at the end).
MIN_SAMPLES_FOR_BAD_CHECK = 1000


def sample_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative ints (well mixed by numpy's SeedSequence)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def decode_image(value: Any) -> Any:
    """Decode one stored image: ``{"bytes", "path"}`` (datasets ``Image(decode=False)``), a path, PIL or array.

    Raises whatever the decoder raises for a corrupt image; callers count and skip it.
    """
    from PIL import Image

    if isinstance(value, dict):
        if value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
            image.load()
            return image
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)):
        from usfmae_hf.io import load_image

        return load_image(value)
    if value is None:
        raise UsfmaeError("empty image value")
    return value


@dataclass
class SampleMaker:
    """Turn a stored image into a training sample with its own augmentation and masking randomness."""

    transform: Callable[[Any], torch.Tensor]
    num_patches: int
    seed: int

    def __call__(self, value: Any, *key: int) -> dict[str, Any]:
        generator = sample_generator(self.seed, *key)
        noise = torch.rand(self.num_patches, generator=generator)
        augment_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        image = decode_image(value)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(augment_seed)
            pixel_values = self.transform(image).as_subclass(torch.Tensor)
        return {"pixel_values": pixel_values, "noise": noise, "augment_seed": augment_seed}


class MapStyleImages(Dataset):
    """Map-style training samples; an unreadable sample is replaced by the next readable one and counted."""

    def __init__(self, source: Sequence[Any], make_sample: SampleMaker, column: str | None) -> None:
        self.source, self.make_sample, self.column = source, make_sample, column
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(MAX_CONSECUTIVE_BAD):
            position = (index + attempt) % len(self.source)
            item = self.source[position]
            try:
                # keyed by the requested index: a stand-in gets its own augmentation and mask
                sample = self.make_sample(item[self.column] if self.column else item, self.epoch, index)
            except Exception as error:  # any decoder failure means "bad image": skip it, count it
                logger.warning("skipping unreadable sample %d: %s", position, error)
                continue
            return {**sample, "num_bad": attempt}
        raise UsfmaeError(f"{MAX_CONSECUTIVE_BAD} unreadable samples in a row from index {index}; is the data broken?")


class StreamingImages(IterableDataset):
    """Streamed training samples from a (node-sharded, shuffled) ``datasets.IterableDataset``."""

    def __init__(self, source: Any, make_sample: SampleMaker, column: str, rank: int) -> None:
        self.source, self.make_sample, self.column, self.rank = source, make_sample, column, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        bad = 0
        for count, item in enumerate(self.source):
            try:
                sample = self.make_sample(item[self.column], self.epoch, self.rank, worker_id, count)
            except Exception as error:  # any decoder failure means "bad image": skip it, count it
                logger.warning("skipping unreadable streamed sample: %s", error)
                bad += 1
                if bad >= MAX_CONSECUTIVE_BAD:
                    raise UsfmaeError(
                        f"{MAX_CONSECUTIVE_BAD} unreadable samples in a row; is the data broken?"
                    ) from None
                continue
            yield {**sample, "num_bad": bad}
            bad = 0


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples; ``num_bad`` becomes the number of unreadable samples skipped for this batch."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "noise": torch.stack([s["noise"] for s in samples]),
        "augment_seed": torch.tensor([s["augment_seed"] for s in samples], dtype=torch.int64),
        "num_bad": torch.tensor(sum(s["num_bad"] for s in samples), dtype=torch.int64),
    }


def load_source(
    *,
    dataset_dir: str | None,
    train_dir: str | None,
    dataset_name: str | None,
    dataset_config_name: str | None = None,
    split: str = "train",
    image_column: str = "image",
    streaming: bool = False,
) -> tuple[Any, str | None]:
    """Open the training images; return ``(source, column)`` where ``column`` is None for a list of paths.

    Image columns are read undecoded (``Image(decode=False)``) so that a corrupt image is caught per
    sample instead of failing the whole batch.
    """
    if train_dir is not None:
        from usfmae_hf.io import expand_inputs

        if not Path(train_dir).is_dir():
            raise UsfmaeError(f"{train_dir}: not a folder")
        paths = [str(path) for path in expand_inputs([train_dir])]
        if not paths:
            raise UsfmaeError(f"{train_dir}: no supported image files")
        return paths, None

    import datasets

    dataset = open_dataset(
        dataset_dir=dataset_dir,
        dataset_name=dataset_name,
        dataset_config_name=dataset_config_name,
        split=split,
        streaming=streaming,
    )
    features = dataset.features
    if features is not None and image_column not in features:
        raise UsfmaeError(f"no image column {image_column!r}; columns are {', '.join(features)} (use --image_column)")
    if features is not None and isinstance(features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset.select_columns([image_column]), image_column


def open_dataset(
    *, dataset_dir: str | None, dataset_name: str | None, dataset_config_name: str | None, split: str, streaming: bool
) -> Any:
    """The split of a local datasets folder (``save_to_disk`` or data files) or of a Hub dataset, all columns."""
    import datasets

    if dataset_dir is None:
        return datasets.load_dataset(dataset_name, dataset_config_name, split=split, streaming=streaming)
    directory = Path(dataset_dir)
    if not directory.is_dir():
        raise UsfmaeError(f"{dataset_dir}: not a folder")
    if (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file():
        dataset = datasets.load_from_disk(str(directory))
        dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
        return dataset.to_iterable_dataset() if streaming else dataset
    return datasets.load_dataset(str(directory), split=split, streaming=streaming)


def first_images(source: Any, column: str | None, count: int) -> list[Any]:
    """The first ``count`` decodable images of a source (unshuffled), for fixed reconstruction grids."""
    images = []
    for item in source:
        if len(images) == count:
            break
        try:
            images.append(decode_image(item[column] if column else item))
        except Exception:  # unreadable images are simply not shown
            continue
    return images


def check_bad_fraction(images: int, bad_images: int, max_fraction: float, *, final: bool) -> None:
    """Fail once more than ``max_fraction`` of the samples read (``images`` decoded, ``bad_images`` not) were
    unreadable. Before the end of training (``final=False``) the check waits for
    :data:`MIN_SAMPLES_FOR_BAD_CHECK` samples, since fewer say little about the rate.

    Raises:
        UsfmaeError: too many unreadable samples.
    """
    read = images + bad_images
    if read and (final or read >= MIN_SAMPLES_FOR_BAD_CHECK) and bad_images > max_fraction * read:
        raise UsfmaeError(
            f"{bad_images} of {read} samples could not be decoded "
            f"({bad_images / read:.1%} > --max_bad_fraction {max_fraction:.1%})"
        )


def default_num_workers(device: torch.device, cpus: int | None = None) -> int:
    """DataLoader workers per process when ``--dataloader_num_workers`` is not given.

    On a GPU the host only feeds the device: available CPUs minus one, at most 4. On CPUs every worker
    takes cycles from the training threads, and a descheduled thread stalls all of them at the next
    barrier: with 2 cores, one worker ran a ViT-B step at 0.95 of a bare loop's speed, none at 1.0
    (decoding and augmenting 8 images in the loop costs ~1% of the step). So none below 8 CPUs, then
    one per 8 CPUs, at most 4.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type == "cpu":
        return min(4, cpus // 8)
    return min(4, max(0, cpus - 1))


def build_dataloader(
    dataset: Dataset | IterableDataset, *, batch_size: int, num_workers: int, drop_last: bool = True
) -> DataLoader:
    """The training loader: shuffled (map-style) batches, decoded and augmented in ``num_workers`` workers.

    ``drop_last`` drops each epoch's last short batch (MAE does; USF-MAE trains on it).

    Workers run torch on one thread each (torch sets that in every worker) and leave the main process's
    threads alone (see :func:`default_num_workers`). Workers are not kept between epochs: each epoch's
    workers must see the dataset's new epoch number.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=not isinstance(dataset, IterableDataset),
        drop_last=drop_last,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def head(source: Any, count: int) -> Any:
    """The first ``count`` items of a list of paths, a ``Dataset`` or an ``IterableDataset``."""
    if isinstance(source, list):
        return source[:count]
    if hasattr(source, "select"):
        return source.select(range(min(count, len(source))))
    return source.take(count)


def preview_images(
    source: Any, column: str | None, count: int, image_size: int, validation_dir: str | None = None
) -> torch.Tensor | None:
    """Fixed reconstruction-preview images (evaluation transform), the same on every process; None if none."""
    from usfmae_hf.image.augment import build_eval_transform

    if count < 1:
        return None
    if validation_dir is not None:
        source, column = load_source(dataset_dir=None, train_dir=validation_dir, dataset_name=None)
    images = first_images(source, column, count)
    if not images:
        return None
    transform = build_eval_transform(image_size)
    return torch.stack([transform(image).as_subclass(torch.Tensor) for image in images])


class TrainingData(NamedTuple):
    """What the loop reads: the dataset, its loader, the on-device augmentation (or None), the previews."""

    dataset: MapStyleImages | StreamingImages
    dataloader: DataLoader
    device_transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    preview: torch.Tensor | None


def build_training_data(
    data_args: DataArguments, args: PretrainingArguments, config: Any, accelerator: Any
) -> TrainingData:
    """Open the source (the main process first, filling any datasets cache) and build the loader and previews.

    A streamed source is split by process (each reads its own shard) and shuffled in a buffer.
    """
    from usfmae_hf.image.augment import build_split_train_transform, build_train_transform

    image_size = config.image_size
    if data_args.augment_on_device:
        worker_transform, device_transform = build_split_train_transform(args.augmentation, image_size)
    else:
        worker_transform, device_transform = build_train_transform(args.augmentation, image_size), None
    with accelerator.main_process_first():
        source, column = load_source(
            dataset_dir=data_args.dataset_dir,
            train_dir=data_args.train_dir,
            dataset_name=data_args.dataset_name,
            dataset_config_name=data_args.dataset_config_name,
            split=data_args.dataset_split,
            image_column=data_args.image_column,
            streaming=data_args.streaming,
        )
    if data_args.max_train_samples is not None:
        source = head(source, data_args.max_train_samples)
    make_sample = SampleMaker(worker_transform, (image_size // config.patch_size) ** 2, args.seed)
    if data_args.streaming:
        from datasets.distributed import split_dataset_by_node

        shard = split_dataset_by_node(source, rank=accelerator.process_index, world_size=accelerator.num_processes)
        shuffled = shard.shuffle(seed=args.seed, buffer_size=data_args.shuffle_buffer_size)
        dataset = StreamingImages(shuffled, make_sample, column, accelerator.process_index)
    else:
        dataset = MapStyleImages(source, make_sample, column)
    dataloader = build_dataloader(
        dataset,
        batch_size=args.per_device_train_batch_size,
        num_workers=data_args.dataloader_num_workers,
        drop_last=args.dataloader_drop_last,
    )
    preview = preview_images(source, column, data_args.num_reconstruction_images, image_size, data_args.validation_dir)
    return TrainingData(dataset, dataloader, device_transform, preview)
