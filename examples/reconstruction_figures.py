#!/usr/bin/env python
"""MAE reconstruction figures: what USF-MAE fills in when a random share of an image's patches is hidden.

For each readable input file (first frame) and each ``--mask-ratio``,
:func:`usfmae_hf.inference.reconstruction.reconstruct` hides that share of the patches (seeded, so
the figures are reproducible) and writes ``OUTPUT_DIR/NNN_<name>_mask<ratio>.png``: the input as the
model saw it, the masked input, the reconstruction, and the reconstruction with the visible patches
pasted back. ``OUTPUT_DIR/summary.csv`` lists, per figure, the share of pixels hidden and the mean
squared error (in 0-255 grey levels) of the reconstruction on the hidden pixels. Needs a ``vit_mae``
directory (with the decoder), not an encoder-only ``--format vit`` one.

Example::

    python examples/reconstruction_figures.py /data/scans --model usfmae-base --mask-ratio 0.5 0.75 0.9 \\
        --output-dir runs/reconstructions --max-images 8

Reduced size (seconds on CPU): a few small images, ``--max-images 2``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
from transformers import ViTMAEForPreTraining

from usfmae_hf.atomic import atomic_write_text
from usfmae_hf.commands import open_unit_fraction, positive_int
from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.failures import run_reporting_failures
from usfmae_hf.inference.reconstruction import reconstruct
from usfmae_hf.io import expand_inputs, load_image
from usfmae_hf.model.directory import model_type


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image, DICOM, volume or video files, or folders of them")
    parser.add_argument("--model", "-m", type=Path, required=True, help="converted vitmae model directory")
    parser.add_argument("--output-dir", "-o", type=Path, required=True, help="folder for the PNGs and summary.csv")
    parser.add_argument(
        "--mask-ratio",
        type=open_unit_fraction,
        nargs="+",
        default=[0.75],
        help="share(s) of patches to hide; one figure per ratio (default: 0.75, as in pretraining)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks (default: 0)")
    parser.add_argument("--max-images", type=positive_int, default=None, help="stop after this many readable files")
    return parser.parse_args(argv)


def draw(args: argparse.Namespace) -> None:
    if model_type(args.model) != "vit_mae":
        raise UsfmaeError(f"{args.model}: reconstructions need the MAE decoder; convert with --format vitmae")
    model = ViTMAEForPreTraining.from_pretrained(args.model)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "mask_ratio", "masked_fraction", "masked_mse", "figure"])
    drawn = 0
    for path in expand_inputs(args.inputs):
        if args.max_images is not None and drawn == args.max_images:
            break
        try:
            image = load_image(path)
        except UnreadableImageError as error:
            print(f"skipped {error}", file=sys.stderr)
            continue
        for ratio in args.mask_ratio:
            figure = args.output_dir / f"{drawn:03d}_{path.stem}_mask{round(ratio * 100):02d}.png"
            result = reconstruct(model, image, mask_ratio=ratio, seed=args.seed, output=figure)
            hidden = result.mask[0]
            residual = result.reconstruction[0].astype(np.float64) - result.original[0]
            writer.writerow([path, ratio, f"{hidden.mean():.4f}", f"{np.mean(residual[hidden] ** 2):.2f}", figure.name])
        drawn += 1
    if not drawn:
        raise UsfmaeError(f"no readable image among {', '.join(args.inputs)}")
    atomic_write_text(args.output_dir / "summary.csv", buffer.getvalue())
    print(f"wrote {drawn * len(args.mask_ratio)} figure(s) and summary.csv to {args.output_dir}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_reporting_failures(lambda: draw(args), "reconstruction_figures")


if __name__ == "__main__":
    sys.exit(main())
