"""MAE pretraining with Hugging Face Accelerate: continued or from scratch, one CPU to many GPUs, resumable.

``training/pretrain_mae.py`` is the launchable entry point; :func:`main` parses its flags.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from .arguments import RECIPES, DataArguments, ModelArguments, PretrainingArguments

__all__ = ["RECIPES", "DataArguments", "ModelArguments", "PretrainingArguments", "main", "run_pretraining"]


def run_pretraining(model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> Path:
    """Pretrain an MAE; see :func:`usfmae_hf.pretraining.trainer.run_pretraining`."""
    from .trainer import run_pretraining as run

    return run(model_args, data_args, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse command-line flags and pretrain; expected failures print one line and return 2."""
    import torch.distributed as dist
    from transformers import HfArgumentParser

    from ..errors import UsfmaeError

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, PretrainingArguments),
        description="MAE pretraining of USF-MAE (recipe presets: usfmae, mae; every value overridable).",
    )
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    try:
        run_pretraining(model_args, data_args, args)
    except UsfmaeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
