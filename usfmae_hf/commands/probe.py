"""``usfmae probe``: linear-probe and k-NN baselines on frozen USF-MAE features."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from usfmae_hf.commands import positive_int, torch_device
from usfmae_hf.commands.features import add_dtype_argument
from usfmae_hf.evaluation.labelled import TASKS


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The labelled-data flags shared by ``probe`` and ``cv`` (one source: folders, a dataset, or a task)."""
    group = parser.add_argument_group("data (give --train-dir, --dataset-name or --task)")
    group.add_argument(
        "--train-dir", "--train_dir", dest="train_dir", help="class-per-folder training images (DIR/<class>/<image>)"
    )
    group.add_argument(
        "--validation-dir", "--validation_dir", dest="validation_dir", help="class-per-folder validation images"
    )
    group.add_argument("--test-dir", "--test_dir", dest="test_dir", help="class-per-folder test images")
    group.add_argument(
        "--dataset-name",
        "--dataset_name",
        dest="dataset_name",
        help="a `datasets` dataset (local path or cached Hub id)",
    )
    group.add_argument(
        "--image-column",
        "--image_column",
        dest="image_column",
        default="image",
        help="image column of --dataset-name (default: image)",
    )
    group.add_argument(
        "--label-column",
        "--label_column",
        dest="label_column",
        default="label",
        help="ClassLabel column of --dataset-name (default: label)",
    )
    group.add_argument("--task", choices=TASKS, help="a held-out USF-MAE evaluation set, read by its adapter")
    group.add_argument(
        "--data-root", "--data_root", dest="data_root", help="folder where the --task dataset was unpacked"
    )
    group.add_argument(
        "--skip-unreadable",
        "--skip_unreadable",
        dest="skip_unreadable",
        action="store_true",
        help="drop undecodable images with a warning (default: stop with an error naming them)",
    )


def data_kwargs(args: argparse.Namespace, fold: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``load_labelled_images`` from parsed :func:`add_data_arguments` flags."""
    names = (
        "train_dir",
        "validation_dir",
        "test_dir",
        "dataset_name",
        "image_column",
        "label_column",
        "task",
        "data_root",
    )
    return {**{name: getattr(args, name) for name in names}, "fold": fold}


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """The probe flags shared by ``probe`` and ``cv``."""
    parser.add_argument(
        "--model", type=Path, required=True, metavar="DIR", help="converted USF-MAE directory (vit_mae or vit)"
    )
    parser.add_argument(
        "--method",
        choices=("linear", "knn"),
        default="linear",
        help="linear: logistic regression on standardised features; knn: cosine k-nearest neighbours (default: linear)",
    )
    parser.add_argument(
        "--pooling",
        choices=("cls", "mean"),
        default="cls",
        help="feature: CLS token or mean of patch tokens (default: cls)",
    )
    parser.add_argument("--k", type=int, default=20, help="neighbours for --method knn (default: 20)")
    parser.add_argument(
        "--C", dest="c", type=float, default=1.0, help="inverse L2 regularisation of --method linear (default: 1.0)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="images per encoder forward pass (default: 32)"
    )
    parser.add_argument("--device", type=torch_device, help="torch device for the encoder (default: CPU)")
    add_dtype_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed of the probe (default: 0)")


def add_output_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--output-dir`` (required) and ``--overwrite``."""
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", type=Path, required=True, help=help_text)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def probe_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``run_probe`` from parsed :func:`add_probe_arguments` flags (and the global ``--quiet``)."""
    names = ("method", "pooling", "k", "c", "batch_size", "device", "dtype", "seed", "skip_unreadable")
    return {name: getattr(args, name) for name in names} | {"progress": not getattr(args, "quiet", False)}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="linear-probe / k-NN baseline on frozen encoder features",
        description=(
            "Extract frozen features of every split with the encoder at --model, fit a logistic regression "
            "(standardised features) or a cosine k-NN on train, and score validation and test with the same "
            "metrics and outputs as fine-tuning: all_results.json, <split>_predictions.csv, "
            "<split>_confusion_matrix.png, <split>_roc.png. A split lacking a class is flagged with a warning "
            "(printed and recorded as <split>_warnings): its AUROC is undefined and its averages cover fewer classes."
        ),
    )
    add_probe_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--fold", type=int, help="cross-validation fold of --task (BUS-BRA 1..5, GIST514-DB 0..4)")
    add_output_arguments(parser, "folder to create for the results")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_hf.evaluation.probe import run_probe
    from usfmae_hf.precision import describe_precision

    print(f"precision: {describe_precision(args.dtype, args.device)}")
    results = run_probe(
        args.model, args.output_dir, data=data_kwargs(args, args.fold), overwrite=args.overwrite, **probe_kwargs(args)
    )
    for split in ("validation", "test"):
        if f"{split}_headline" in results:
            print(f"{split}: {results[f'{split}_headline']}")
            for warning in results[f"{split}_warnings"]:
                print(f"WARNING: {warning}")
    print(f"Wrote {args.output_dir}")
    return 0
