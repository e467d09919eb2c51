#!/usr/bin/env python
"""Fine-tune USF-MAE on class folders (``DATA/train/<class>/*.png``, optional ``validation/`` and ``test/``).

A handful of flags are turned into the flags of :func:`usfmae_hf.finetuning.run.main` (the Trainer
script ``training/finetune_classification.py``, whose ``--help`` lists every option), and the
metrics it writes to ``OUTPUT_DIR/all_results.json`` are printed at the end. The output folder also
holds the fine-tuned model, its image processor, ``{split}_predictions.csv``, confusion-matrix and
ROC plots, and a model card.

Example::

    python examples/finetune_folders.py --model usfmae-base --data /data/BUSI_split \\
        --output-dir runs/busi --recipe mae --epochs 50 --batch-size 32

Reduced size (a minute on CPU): ``--max-steps 5 --batch-size 4 --cpu`` on a few tiny images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from usfmae_hf.commands import positive_int
from usfmae_hf.finetuning.run import main as finetune

SPLITS = ("train", "validation", "test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", required=True, help="converted model directory (vitmae or vit format)")
    parser.add_argument(
        "--data", type=Path, required=True, help="folder holding train/ (and optionally validation/, test/)"
    )
    parser.add_argument("--output-dir", "-o", type=Path, required=True, help="where the model and reports go")
    parser.add_argument("--recipe", choices=("none", "mae"), default="none", help="'mae': original MAE recipe")
    parser.add_argument("--head", choices=("cls", "mean"), default=None, help="classifier head (default: recipe's)")
    parser.add_argument("--epochs", type=float, default=10, help="training epochs (default: 10)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per step (default: 32)")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="peak learning rate (default: 5e-5; --recipe mae sets it from its base rate and the batch size)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is available")
    return parser.parse_args(argv)


def finetune_arguments(args: argparse.Namespace) -> list[str]:
    """The ``usfmae_hf.finetuning.run`` flags for ``args``."""
    flags = ["--model_name_or_path", str(args.model), "--output_dir", str(args.output_dir)]
    for split in SPLITS:
        if (args.data / split).is_dir():
            flags += [f"--{split}_dir", str(args.data / split)]
    flags += ["--recipe", args.recipe, "--num_train_epochs", str(args.epochs), "--max_steps", str(args.max_steps)]
    flags += [
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--per_device_eval_batch_size",
        str(args.batch_size),
    ]
    flags += ["--seed", str(args.seed), "--save_strategy", "no", "--report_to", "none", "--logging_steps", "10"]
    if (args.data / "validation").is_dir():
        flags += ["--eval_strategy", "epoch"]
    if args.head:
        flags += ["--head", args.head]
    if args.learning_rate is not None:
        flags += ["--learning_rate", str(args.learning_rate)]
    if args.cpu:
        flags.append("--use_cpu")
    return flags


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "train").is_dir():
        print(
            f"finetune_folders: error: {args.data / 'train'}: no such folder (expected DATA/train/<class>/)",
            file=sys.stderr,
        )
        return 2
    status = finetune(finetune_arguments(args), description=__doc__)
    if status == 0:
        results = json.loads((args.output_dir / "all_results.json").read_text())
        for split in SPLITS[1:]:
            scores = {name: results.get(f"{split}_{name}") for name in ("accuracy", "f1_macro", "roc_auc")}
            if scores["accuracy"] is not None:
                print(
                    f"{split}: "
                    + ", ".join(f"{name} {value:.3f}" for name, value in scores.items() if value is not None)
                )
        print(f"model and reports in {args.output_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
