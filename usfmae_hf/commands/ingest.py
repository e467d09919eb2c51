"""``usfmae ingest ROOT --output DIR``: dataset folders -> a de-duplicated Hugging Face Parquet dataset."""

from __future__ import annotations

import argparse
import os

from usfmae_hf.commands import positive_int


def _resize(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 224, or 'none', got {value!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError("size must be positive")
    return size


def _threshold(value: str) -> int | None:
    threshold = int(value)
    return None if threshold < 0 else threshold


def _megabytes(value: str) -> float:
    try:
        megabytes = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MiB such as 4096, got {value!r}") from None
    if not 0 < megabytes < float("inf"):
        raise argparse.ArgumentTypeError("the limit must be a positive number of MiB")
    return megabytes


def _names(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="turn unpacked OpenUS-46 folders into a de-duplicated Hugging Face dataset",
        description=(
            "Read every dataset folder of ROOT (one per dataset, named as in `usfmae datasets list`; other "
            "folders get the generic rules) and write a Parquet image dataset that "
            "datasets.load_dataset(DIR, split='train') loads, with a dataset card and an ingest report. "
            "Masks and labels are skipped, duplicates removed, unreadable files listed. A rerun with the "
            "same options only decodes what changed."
        ),
    )
    parser.add_argument("root", metavar="ROOT", help="folder holding one sub-folder per dataset")
    parser.add_argument(
        "--output", "-o", required=True, metavar="DIR", help="output dataset folder (created or extended)"
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        metavar="NAME",
        help="only these datasets (catalogue names, aliases or folder names; space- or comma-separated)",
    )
    parser.add_argument(
        "--include-heldout", action="store_true", help="also ingest the evaluation sets BUS-BRA, MMOTU-2D, GIST514-DB"
    )
    parser.add_argument("--num-proc", type=int, default=1, metavar="N", help="decoding processes (default 1)")
    parser.add_argument(
        "--frame-stride", type=positive_int, default=1, metavar="K", help="keep every K-th cine/video frame"
    )
    parser.add_argument(
        "--slice-stride", type=positive_int, default=1, metavar="K", help="keep every K-th volume slice"
    )
    parser.add_argument(
        "--resize",
        type=_resize,
        default=224,
        metavar="224|none",
        help="store images resized to SxS with NEAREST, USF-MAE's first transform (default 224); 'none': full size",
    )
    parser.add_argument(
        "--near-dup-threshold",
        type=_threshold,
        default=2,
        metavar="T",
        help="perceptual-hash Hamming distance (of 64 bits) up to which images are near duplicates (default 2, -1 off)",
    )
    parser.add_argument(
        "--max-decoded-mb",
        type=_megabytes,
        metavar="MB",
        help=(
            "skip (and list) DICOM, volume and video files whose header claims more decoded pixels than MB MiB, "
            "checked before decoding (default: $USFMAE_MAX_DECODED_MB, else 2048); a rerun with a higher limit "
            "decodes the files it now allows"
        ),
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the build already in DIR and rebuild it (needed to change options)",
    )
    parser.add_argument("--push-to-hub", metavar="REPO", help="then upload the build to this Hub dataset repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_hf.ingest.build import IngestOptions, ingest
    from usfmae_hf.publishing.hub import push_build_to_hub

    options = IngestOptions(
        resize=args.resize,
        frame_stride=args.frame_stride,
        slice_stride=args.slice_stride,
        near_dup_threshold=args.near_dup_threshold,
        include_heldout=args.include_heldout,
    )
    report = ingest(
        args.root,
        args.output,
        datasets=_names(args.datasets),
        options=options,
        num_proc=args.num_proc,
        overwrite=args.overwrite,
        progress=not args.quiet,
        max_decoded_bytes=None if args.max_decoded_mb is None else max(1, int(args.max_decoded_mb * 2**20)),
    )
    unreadable = sum(len(d["unreadable"]) for d in report["datasets"])
    duplicates = sum(d["exact_duplicates"] + d["near_duplicates"] for d in report["datasets"])
    print(
        f"{report['rows']} images from {len(report['datasets'])} datasets in {args.output} "
        f"({duplicates} duplicates removed, {unreadable} unreadable files skipped, "
        f"{len(report['skipped_folders'])} folders skipped); see {os.path.join(args.output, 'ingest_report.md')}"
    )
    if args.push_to_hub:
        print(push_build_to_hub(args.output, args.push_to_hub, private=args.private))
    return 0
