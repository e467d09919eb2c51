"""``usfmae leakage-check BUILD --against DIR...``: images of one build found in others, by pixel hash."""

from __future__ import annotations

import argparse

_EXAMPLES = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "leakage-check",
        help="report images of a build that also appear in other builds or dataset folders",
        description=(
            "Compare images by the SHA-256 of their decoded pixels. BUILD and each DIR may be an `usfmae ingest` "
            "output (its sha256 column is read, nothing is decoded) or any folder of images, DICOMs, volumes or "
            "videos (every frame is decoded). Exit status 1 when an image is shared."
        ),
    )
    parser.add_argument("build", metavar="BUILD", help="the build to check, e.g. a pretraining ingest output")
    parser.add_argument(
        "--against", nargs="+", required=True, metavar="DIR", help="builds or folders it must not share images with"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_hf.evaluation.leakage import find_shared_images

    shared = find_shared_images(args.build, args.against, progress=not args.quiet)
    for other, pairs in shared.items():
        print(f"{other}: {len(pairs)} images shared with {args.build}")
        for mine, theirs in pairs[:_EXAMPLES]:
            print(f"  {', '.join(mine)}  ==  {', '.join(theirs)}")
        if len(pairs) > _EXAMPLES:
            print(f"  ... and {len(pairs) - _EXAMPLES} more")
    return 1 if any(shared.values()) else 0
