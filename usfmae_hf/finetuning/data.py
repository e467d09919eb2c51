"""Fine-tuning's view of labelled data: on-the-fly training and evaluation transforms.

Loading, the ``--task`` names and label checks live in :mod:`usfmae_hf.evaluation.labelled` (probing
uses them too); they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable

from usfmae_hf.evaluation.labelled import (  # noqa: F401 (re-exported for fine-tuning)
    EVAL_SPLITS,
    TASKS,
    check_labels,
    drop_unreadable,
    load_labelled_images,
    task_display_name,
)


def _transform(image_transform: Callable, train: bool) -> Callable[[dict[str, list]], dict[str, list]]:
    def apply(batch: dict[str, list]) -> dict[str, list]:
        out = {"pixel_values": [image_transform(image) for image in batch["image"]], "labels": batch["label"]}
        if train:
            out["train"] = [True] * len(batch["label"])
        return out

    return apply


def with_transforms(dataset, *, image_size: int, augment: str | None):
    """Attach on-the-fly transforms: ``augment`` recipe (or none) on train, USF-MAE's eval transform elsewhere.

    Evaluation keeps USF-MAE's square resize whatever the training recipe, MAE's included (MAE evaluates a
    bicubic resize of the short side to ``S / 0.875`` and a centre crop): it is the transform of the image
    processor saved with the model, so the reported metrics are those ``pipeline()`` and ``usfmae predict``
    reproduce, and no part of the scan area is cropped away.
    """
    from datasets import DatasetDict

    from usfmae_hf.image.augment import build_eval_transform, build_train_transform

    eval_transform = build_eval_transform(image_size)
    train_transform = build_train_transform(augment, image_size) if augment else eval_transform
    return DatasetDict(
        {
            split: ds.with_transform(
                _transform(train_transform if split == "train" else eval_transform, split == "train")
            )
            for split, ds in dataset.items()
        }
    )


def _segmentation_transform(joint_transform: Callable) -> Callable[[dict[str, list]], dict[str, list]]:
    def apply(batch: dict[str, list]) -> dict[str, list]:
        pairs = [joint_transform(image, mask) for image, mask in zip(batch["image"], batch["mask"], strict=True)]
        return {"pixel_values": [image for image, _ in pairs], "labels": [mask for _, mask in pairs]}

    return apply


def with_segmentation_transforms(dataset, *, image_size: int, augment: str | None):
    """Attach joint image + mask transforms: ``augment`` recipe (or none) on train, the eval resize elsewhere."""
    from datasets import DatasetDict

    from usfmae_hf.image.augment import build_segmentation_transform

    return DatasetDict(
        {
            split: ds.with_transform(
                _segmentation_transform(
                    build_segmentation_transform(augment, image_size, train=split == "train" and augment is not None)
                )
            )
            for split, ds in dataset.items()
        }
    )
