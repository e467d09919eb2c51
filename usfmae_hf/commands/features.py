"""``usfmae features``: encoder features of images, DICOMs, volumes and videos into one file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from usfmae_hf.commands import positive_int, torch_device

DTYPES = ("float32", "bfloat16", "float16")


def run_features(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from usfmae_hf.inference.feature_files import write_features

    result = write_features(
        args.inputs,
        args.model,
        args.output,
        pooling=args.pooling,
        batch_size=args.batch_size,
        frame_stride=args.frame_stride,
        slice_stride=args.slice_stride,
        axis=args.axis,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        overwrite=args.overwrite,
        progress=not args.quiet,
        on_skip=lambda message: tqdm.write(f"skipped {message}", file=sys.stderr),
    )
    resumed = f" ({result.resumed_files} resumed from an interrupted run)" if result.resumed_files else ""
    skipped = f"; {len(result.skipped)} unreadable file(s) skipped" if result.skipped else ""
    print(f"wrote {result.rows} feature rows from {result.files} file(s){resumed} to {result.output}{skipped}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "features",
        help="extract USF-MAE encoder features into a .parquet or .npy file",
        description="Encode every frame of the inputs (images, DICOM incl. cines, NIfTI/MHA/NRRD volumes as "
        "slices, videos) with a converted USF-MAE encoder, preprocessed exactly as in USF-MAE. Unreadable "
        "files are reported and skipped. Progress is kept in OUTPUT.partial/: rerunning the same command "
        "after an interruption resumes.",
    )
    parser.add_argument("inputs", nargs="+", help="files, folders (searched recursively) or quoted glob patterns")
    parser.add_argument(
        "--model", "-m", type=Path, required=True, help="converted model directory (vitmae or vit format)"
    )
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        required=True,
        help="FILE.parquet (columns path, frame, features) or FILE.npy (array; rows listed in FILE.csv)",
    )
    parser.add_argument(
        "--pooling",
        choices=("cls", "mean", "patches"),
        default="cls",
        help="cls: CLS token; mean: mean of patch tokens; patches: all patch tokens in spatial order (default: cls)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="frames per forward pass (default: 32)")
    parser.add_argument(
        "--frame-stride", type=positive_int, default=1, help="keep every n-th frame of cines and videos (default: 1)"
    )
    parser.add_argument(
        "--slice-stride", type=positive_int, default=1, help="keep every n-th slice of 3-D volumes (default: 1)"
    )
    parser.add_argument(
        "--axis",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="volume axis to slice along, in (z, y, x) order (default: 0)",
    )
    parser.add_argument(
        "--device", type=torch_device, default=None, help="torch device, e.g. cpu or cuda (default: cpu)"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_features)
