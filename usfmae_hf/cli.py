"""The ``usfmae`` command line.

Every module in :mod:`usfmae_hf.commands` contributes one or more sub-commands through a
``register(subparsers)`` function, so a feature's command lives next to nothing but itself.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from usfmae_hf import commands
from usfmae_hf.failures import DEBUG_ENVIRONMENT_VARIABLE, run_reporting_failures
from usfmae_hf.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usfmae",
        description="USF-MAE ultrasound foundation model tools: conversion, features, data, training, publishing.",
    )
    parser.add_argument("--version", action="version", version=f"usfmae-hf {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show full tracebacks instead of one-line errors (also: {DEBUG_ENVIRONMENT_VARIABLE}=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``usfmae`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    # One failure path for every command: see usfmae_hf.failures (shared with the training scripts).
    return run_reporting_failures(lambda: args.func(args), f"usfmae {args.command}", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
