"""``usfmae datasets list`` and ``usfmae datasets show NAME``: the OpenUS-46 catalogue."""

from __future__ import annotations

import argparse

from usfmae_hf.ingest.catalogue import GENERIC_EXCLUDE_GLOBS, GENERIC_SKIP_DIRS, find_entry, load_catalogue


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "datasets",
        help="list the OpenUS-46 datasets or show one's ingestion rules",
        description="The OpenUS-46 catalogue: the 46 public ultrasound datasets USF-MAE was trained and evaluated on.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="one line per dataset", description="One line per OpenUS-46 dataset.")
    listing.add_argument("--held-out", action="store_true", help="only the datasets held out for evaluation")
    listing.set_defaults(func=_list)
    show = actions.add_parser(
        "show", help="a dataset's details and ingestion rules", description="A dataset's details and ingestion rules."
    )
    show.add_argument("name", metavar="NAME", help="catalogue name or alias, any case and punctuation (busbra, hc18)")
    show.set_defaults(func=_show)


def _list(args: argparse.Namespace) -> int:
    entries = [e for e in load_catalogue() if e.held_out or not args.held_out]
    print(f"{'id':>3}  {'name':<26} {'anatomy':<30} {'formats':<18} {'held out':<8} rules")
    for e in entries:
        rules = "specific" if e.has_layout_rules else "generic"
        held_out = "yes" if e.held_out else "no"
        print(f"{e.id:>3}  {e.name:<26} {e.anatomy:<30} {', '.join(e.formats):<18} {held_out:<8} {rules}")
    return 0


def _show(args: argparse.Namespace) -> int:
    e = find_entry(args.name, required=True)
    print(f"{e.name} (OpenUS-46 #{e.id})")
    print(f"  anatomy:      {e.anatomy}")
    print(f"  link:         {e.link}")
    print(f"  formats:      {', '.join(e.formats)}")
    print(f"  held out:     {'yes: excluded from ingest unless --include-heldout' if e.held_out else 'no'}")
    print(f"  folder names: {', '.join((e.name, *e.aliases))} (any case and punctuation)")
    if e.has_layout_rules:
        print(f"  images:       {', '.join(e.image_globs)}")
        if e.skip_dirs:
            print(f"  skip folders: {', '.join(e.skip_dirs)}")
        if e.exclude_globs:
            print(f"  skip files:   {', '.join(e.exclude_globs)}")
        print(f"  group id:     {e.group_regex or 'none known'}")
        print(f"  layout:       {e.notes}")
    else:
        print("  layout:       not checked; any supported image, DICOM, volume or video file")
    print(f"  always skipped: files {', '.join(GENERIC_EXCLUDE_GLOBS)}; folders {', '.join(GENERIC_SKIP_DIRS)}")
    return 0
