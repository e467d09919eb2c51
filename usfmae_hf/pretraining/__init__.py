"""MAE pretraining with Hugging Face Accelerate: continued or from scratch, one CPU to many GPUs, resumable.

``training/pretrain_mae.py`` is the launchable entry point; :func:`main` parses its flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from usfmae_hf.pretraining.arguments import RECIPES, DataArguments, ModelArguments, PretrainingArguments

__all__ = ["RECIPES", "DataArguments", "ModelArguments", "PretrainingArguments", "main", "run_pretraining"]


def run_pretraining(model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> Path:
    """Pretrain an MAE; see :func:`usfmae_hf.pretraining.trainer.run_pretraining`."""
    from usfmae_hf.pretraining.trainer import run_pretraining as run

    return run(model_args, data_args, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse command-line flags and pretrain; expected failures print one line and return 2."""
    from usfmae_hf.launch import run_from_command_line

    return run_from_command_line(
        (ModelArguments, DataArguments, PretrainingArguments),
        run_pretraining,
        prog="pretrain_mae",
        description="MAE pretraining of USF-MAE (recipe presets: usfmae, mae; every value overridable).",
        argv=argv,
    )
