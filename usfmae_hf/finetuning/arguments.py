"""The flags every fine-tuning task shares, as base dataclasses for ``HfArgumentParser``.

A task (classification, segmentation) subclasses :class:`CommonModelArguments` and
:class:`CommonDataArguments`, adds its own fields and, with :func:`task_help`, words the inherited
flags' help for its data (``--train_dir`` holds class folders for one task, images and masks for
another). The shared run (:mod:`usfmae_hf.finetuning.flow`) reads only the fields declared here.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from usfmae_hf.publishing.cards import LICENSE_EXAMPLES

RECIPES: tuple[str, ...] = ("none", "mae")

T = TypeVar("T")


def option(help: str, default: Any = None, *, choices: Sequence[str] | None = None) -> Any:  # noqa: A002
    """A dataclass field for ``HfArgumentParser``: ``default`` (None: unset), ``help`` and optional ``choices``."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = list(choices)
    return dataclasses.field(default=default, metadata=metadata)


def required(help: str) -> Any:  # noqa: A002
    """A dataclass field without default (a required flag) with ``help``."""
    return dataclasses.field(metadata={"help": help})


def task_help(choices: dict[str, Sequence[str]] | None = None, **texts: str) -> Callable[[type[T]], type[T]]:
    """Class decorator (above ``@dataclass``): the task's help ``texts`` (and ``choices``) of inherited fields.

    Only the decorated class's fields change; type, default and position stay those of the base class.
    """

    def decorate(cls: type[T]) -> type[T]:
        fields = cls.__dataclass_fields__
        for name in {*texts, *(choices or {})}:
            if name not in fields:
                raise TypeError(f"{cls.__name__} has no field {name!r} to word")
            field = copy.copy(fields[name])
            metadata = dict(field.metadata)
            if name in texts:
                metadata["help"] = texts[name]
            if choices and name in choices:
                metadata["choices"] = list(choices[name])
            field.metadata = types.MappingProxyType(metadata)
            fields[name] = field
        return cls

    return decorate


@dataclass
class CommonModelArguments:
    """The initial weights and the recipe options every task has (``None``: the ``--recipe`` preset's, else off)."""

    model_name_or_path: str = required("Converted USF-MAE directory (vit_mae or vit format, see `usfmae convert`).")
    recipe: str = option("Preset filling every option left unset ('none': no preset).", "none", choices=RECIPES)
    augment: str | None = option("Training augmentation (unset: the preset's, else usfmae).")
    blr: float | None = option("Base learning rate: learning_rate = blr * effective batch / 256 (overrides it).")
    layer_decay: float | None = option("Layer-wise lr decay of the encoder (1 = off).")
    class_weighted_loss: bool = option("Weight the loss by n / (n_classes * class count) of the training split.", False)
    license: str | None = option(
        f"Hub license id of the fine-tuned weights for the model card, e.g. {LICENSE_EXAMPLES} (default: the license "
        "recorded for the initial weights, else 'unknown')."
    )


@dataclass
class CommonDataArguments:
    """Where the data come from (exactly one of train_dir, dataset_name, task) and what the run does with them."""

    train_dir: str | None = option("Folder of training data.")
    validation_dir: str | None = option("Folder of validation data.")
    test_dir: str | None = option("Folder of test data.")
    dataset_name: str | None = option("A `datasets` dataset (local path or cached Hub id) with a train split.")
    image_column: str = option("Image column of --dataset_name.", "image")
    task: str | None = option("A dataset read by its adapter from --data_root.")
    data_root: str | None = option("Folder where the --task dataset was unpacked.")
    fold: int | None = option("Cross-validation fold of --task.")
    card_dataset_name: str | None = option(
        "Dataset name in the model card (default: the task's, --dataset_name, or the folder holding --train_dir)."
    )
    overwrite_output_dir: bool = option(
        "Start over in an --output_dir holding a previous run (its outputs are removed first; other files stay).",
        False,
    )

    # The data source, as the task's loader takes it; a task adds its own (e.g. the label column).
    SOURCE_FIELDS: ClassVar[tuple[str, ...]] = (
        "train_dir",
        "validation_dir",
        "test_dir",
        "dataset_name",
        "image_column",
        "task",
        "data_root",
        "fold",
    )

    def source(self) -> dict[str, Any]:
        """The keyword arguments of the task's loader that name the data source."""
        return {name: getattr(self, name) for name in self.SOURCE_FIELDS}

    def check_sources(self) -> None:
        """Checks of the sources that need no loading, made before the output folder is touched (none here)."""
