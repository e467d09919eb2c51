"""``usfmae attention``: a figure of an encoder's last-layer CLS attention per head and its attention rollout."""

from __future__ import annotations

import argparse
from pathlib import Path

from usfmae_hf.commands import torch_device


def discard_ratio(text: str) -> float:
    """A float in [0, 1): the fraction of smallest attention entries the rollout drops."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def run_attention(args: argparse.Namespace) -> int:
    from usfmae_hf.atomic import ensure_writable_output
    from usfmae_hf.inference.attention import (
        attention_maps,
        check_maps_path,
        save_attention_figure,
        save_attention_maps,
    )

    ensure_writable_output(args.output, args.overwrite)
    if args.save_maps is not None:
        ensure_writable_output(check_maps_path(args.save_maps), args.overwrite)
    maps = attention_maps(
        args.model, args.input, frame=args.frame, discard_ratio=args.discard_ratio, device=args.device
    )
    save_attention_figure(maps, args.output, heads=args.heads)
    layers, heads = maps.attentions.shape[:2]
    grid = "x".join(map(str, maps.grid))
    print(f"wrote the attention figure ({layers} layers, {heads} heads, {grid} patches) to {args.output}")
    if args.save_maps is not None:
        save_attention_maps(maps, args.save_maps)
        print(f"wrote the raw maps to {args.save_maps}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "attention",
        help="draw an encoder's attention maps on an image (last-layer CLS attention per head, rollout)",
        description="Preprocess one frame as USF-MAE does, run the deterministic encoder (no masking) with eager "
        "attention, and write a PNG with the input, the last layer's CLS-to-patch attention of each head (or "
        "their mean) and the attention rollout (Abnar & Zuidema 2020: heads averaged, 0.5*A + 0.5*I, "
        "multiplied through the layers) drawn over it.",
    )
    parser.add_argument("input", type=Path, help="image, DICOM, volume or video file")
    parser.add_argument(
        "--model", "-m", type=Path, required=True, help="converted model directory (vitmae or vit format)"
    )
    parser.add_argument("--output", "-o", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--frame", type=int, default=0, help="frame or slice index in a multi-frame file (default: 0)")
    parser.add_argument(
        "--heads",
        choices=("all", "mean"),
        default="all",
        help="all: one overlay per last-layer head; mean: one overlay of their mean (default: all)",
    )
    parser.add_argument(
        "--discard-ratio",
        type=discard_ratio,
        default=0.0,
        help="before the rollout, drop this fraction of each row's smallest head-averaged patch attentions "
        "(not in the paper; default: 0, the paper's rollout)",
    )
    parser.add_argument(
        "--save-maps",
        type=Path,
        default=None,
        metavar="FILE.npz",
        help="also save the raw maps: all layers' attention, the rollout matrix, per-head and rollout grids",
    )
    parser.add_argument(
        "--device", type=torch_device, default=None, help="torch device, e.g. cpu or cuda (default: cpu)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.set_defaults(func=run_attention)
