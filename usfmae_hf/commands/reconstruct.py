"""``usfmae reconstruct``: mask an image's patches and show the MAE reconstruction as a PNG grid."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from usfmae_hf.commands import open_unit_fraction
from usfmae_hf.commands.features import add_dtype_argument


def run_reconstruct(args: argparse.Namespace) -> int:
    from usfmae_hf.atomic import ensure_writable_output
    from usfmae_hf.errors import UnreadableImageError
    from usfmae_hf.inference.reconstruction import reconstruct, save_reconstruction_grid
    from usfmae_hf.io import load_frames
    from usfmae_hf.precision import choose_precision

    ensure_writable_output(args.output, args.overwrite)
    precision = choose_precision(args.dtype)
    print(f"precision: {precision}")
    frame = next((f for f in load_frames(args.input) if f.index == args.frame), None)
    if frame is None:
        raise UnreadableImageError(f"{args.input}: has no frame {args.frame}")
    result = reconstruct(args.model, frame.image, mask_ratio=args.mask_ratio, seed=args.seed, dtype=precision.dtype)
    settings = {
        "model": str(args.model),
        "input": str(args.input),
        "frame": args.frame,
        "mask_ratio": args.mask_ratio,
        "seed": args.seed,
        "dtype": precision.name,
        "precision": str(precision),
    }
    save_reconstruction_grid(result, args.output, metadata={"usfmae": json.dumps(settings)})
    print(f"masked {result.mask.mean():.0%} of the image; wrote {args.output}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "reconstruct",
        help="show what the MAE reconstructs from a masked image (PNG grid)",
        description="Preprocess one frame as USF-MAE does, hide a random MASK_RATIO of its patches (seeded), "
        "and write a PNG with the original, the masked input, the reconstruction, and the reconstruction "
        "with the visible patches pasted back. The settings (incl. --dtype) are stored in the PNG's text "
        "metadata (key usfmae).",
    )
    parser.add_argument("input", type=Path, help="image, DICOM, volume or video file")
    parser.add_argument(
        "--model", "-m", type=Path, required=True, help="converted vitmae model directory (with decoder)"
    )
    parser.add_argument("--output", "-o", type=Path, required=True, help="PNG file to write")
    parser.add_argument(
        "--mask-ratio", type=open_unit_fraction, default=0.75, help="fraction of patches to hide (default: 0.75)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask (default: 0)")
    parser.add_argument("--frame", type=int, default=0, help="frame or slice index in a multi-frame file (default: 0)")
    add_dtype_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(func=run_reconstruct)
