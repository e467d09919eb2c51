"""``usfmae segment``: masks (at each frame's own size) and overlays from a fine-tuned segmentation model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from usfmae_hf.commands import positive_int, torch_device


def _output_stem(path: Path, root: Path | None, frame: int, num_frames: int) -> str:
    relative = path.relative_to(root) if root is not None and path.is_relative_to(root) else Path(path.name)
    stem = "__".join(relative.with_suffix("").parts)
    return f"{stem}_frame{frame:04d}" if num_frames > 1 else stem


def run_segment(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from usfmae_hf.atomic import atomic_directory, atomic_write_bytes
    from usfmae_hf.errors import UnreadableImageError
    from usfmae_hf.inference.segmentation import load_segmenter, mask_png, overlay_png, predict_masks
    from usfmae_hf.io import expand_inputs, load_frames

    files = expand_inputs(args.inputs)
    model = load_segmenter(args.model, device=args.device)
    num_labels = model.config.num_labels
    single_folder = len(args.inputs) == 1 and Path(args.inputs[0]).is_dir()
    root = Path(os.path.abspath(args.inputs[0])) if single_folder else None
    written, skipped = 0, []
    with atomic_directory(args.output, overwrite=args.overwrite) as staging:
        for path in tqdm(files, desc="segment", unit="file", disable=args.quiet):
            try:
                frames = list(load_frames(path, frame_stride=args.frame_stride))
            except UnreadableImageError as error:
                skipped.append(str(error))
                tqdm.write(f"skipped {error}", file=sys.stderr)
                continue
            predictions = predict_masks(model, [frame.image for frame in frames], batch_size=args.batch_size)
            for frame, prediction in zip(frames, predictions, strict=True):
                stem = _output_stem(Path(os.path.abspath(path)), root, frame.index, len(frames))
                atomic_write_bytes(staging / f"{stem}_mask.png", mask_png(prediction.mask, num_labels))
                if not args.no_overlays:
                    atomic_write_bytes(
                        staging / f"{stem}_overlay.png", overlay_png(frame.image, prediction.mask, num_labels)
                    )
                written += 1
    labels = ", ".join(f"{index} = {name}" for index, name in sorted(model.config.id2label.items()))
    note = f"; {len(skipped)} unreadable file(s) skipped" if skipped else ""
    print(f"wrote {written} mask(s) to {args.output} (pixel values: {labels}){note}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment images, DICOMs and cines with a fine-tuned USF-MAE segmentation model",
        description="Preprocess every frame of the inputs exactly as USF-MAE does, predict its mask with a model "
        "from `usfmae finetune-segmentation`, and write into OUTPUT one <name>_mask.png per frame (a palette PNG "
        "at the frame's own size whose pixel values are the label ids) and one <name>_overlay.png (the frame "
        "beside it with the prediction drawn over it). Cine and video frames get a _frameNNNN suffix. Unreadable "
        "files are reported and skipped.",
    )
    parser.add_argument("inputs", nargs="+", help="files, folders (searched recursively) or quoted glob patterns")
    parser.add_argument(
        "--model", "-m", type=Path, required=True, help="segmentation model directory (a fine-tuning output)"
    )
    parser.add_argument("--output", "-o", type=Path, required=True, help="folder to write the masks into")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="frames per forward pass (default: 8)")
    parser.add_argument(
        "--frame-stride", type=positive_int, default=1, help="keep every n-th frame of cines and videos (default: 1)"
    )
    parser.add_argument(
        "--device", type=torch_device, default=None, help="torch device, e.g. cpu or cuda (default: cpu)"
    )
    parser.add_argument("--no-overlays", action="store_true", help="write the masks only")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_segment)
