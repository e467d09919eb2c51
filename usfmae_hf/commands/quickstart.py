"""``usfmae quickstart``: the whole lifecycle on real ultrasound DICOMs, with a report."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from usfmae_hf.quickstart.runner import QuickstartSettings, run_quickstart

    settings = QuickstartSettings()
    if args.smoke:
        settings = QuickstartSettings(pretrain_steps=4, finetune_steps=4, frame_stride=20, batch_size=4)
    if args.pretrain_steps is not None:
        settings.pretrain_steps = args.pretrain_steps
    if args.finetune_steps is not None:
        settings.finetune_steps = args.finetune_steps
    report = run_quickstart(args.output, settings=settings, overwrite=args.overwrite)
    print(f"open {report}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="run the whole lifecycle on real ultrasound DICOMs and write a report",
        description="Ingest the real ultrasound DICOMs of pydicom-data, convert a small MAE, continue "
        "pretraining it, load it back with the exact image processor, extract features and a reconstruction, "
        "build a labelled task split by scan (checked for leakage), fine-tune a classifier on it, and write "
        "REPORT.md with figures, metrics and the commands for the real USF-MAE release.",
    )
    parser.add_argument("--output", "-o", type=Path, required=True, help="directory for every output and REPORT.md")
    parser.add_argument("--overwrite", action="store_true", help="empty a non-empty output directory first")
    parser.add_argument(
        "--pretrain-steps", type=int, default=None, help="optimizer steps of continued pretraining (default: 200)"
    )
    parser.add_argument(
        "--finetune-steps", type=int, default=None, help="optimizer steps of fine-tuning (default: 150)"
    )
    parser.add_argument("--smoke", action="store_true", help="reduced size for CI: 4 steps each, every 20th cine frame")
    parser.set_defaults(func=run)
