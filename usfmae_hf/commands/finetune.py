"""``usfmae finetune ...`` and ``usfmae finetune-segmentation ...``: Trainer fine-tuning.

The same entry points as ``training/finetune_classification.py`` and
``training/finetune_segmentation.py``: every flag (``--help`` and all ``TrainingArguments`` included)
is handed over untouched.
"""

from __future__ import annotations

import argparse

from usfmae_hf.commands.pretrain import register_forwarding


def register(subparsers: argparse._SubParsersAction) -> None:
    register_forwarding(
        subparsers,
        "finetune",
        "usfmae_hf.finetuning.run:main",
        help="fine-tune an image classifier with the Trainer (as training/finetune_classification.py)",
    )
    register_forwarding(
        subparsers,
        "finetune-segmentation",
        "usfmae_hf.finetuning.segmentation:main",
        help="fine-tune a DPT segmenter with the Trainer (as training/finetune_segmentation.py)",
    )
