"""The ``usfmae`` command line.

Every module in :mod:`usfmae_hf.commands` contributes one or more sub-commands through a
``register(subparsers)`` function, so a feature's command lives next to nothing but itself. Every
sub-command (but the training ones, which hand their arguments over untouched) also takes ``-q``
(warnings and errors only, no progress bars) and ``-v`` (library progress bars too, which are
hidden by default); a command-line mistake is one ``error:`` line, like every other failure.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from usfmae_hf import commands
from usfmae_hf.failures import DEBUG_ENVIRONMENT_VARIABLE, OneLineArgumentErrors, run_reporting_failures
from usfmae_hf.launch import VERBOSE_ENVIRONMENT_VARIABLE, library_progress_bars, verbose_requested
from usfmae_hf.version import __version__


class ArgumentParser(OneLineArgumentErrors, argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line (its sub-parsers' too)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``usfmae`` parser with every sub-command of :mod:`usfmae_hf.commands`."""
    parser = ArgumentParser(
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
    for sub_parser in subparsers.choices.values():
        _add_output_flags(sub_parser)
    return parser


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``-q`` and ``-v`` to ``parser`` (unless it has flags of those names), or to its own sub-commands."""
    if parser.prefix_chars != "-":  # a training command: every argument goes to the training script
        return
    nested = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if nested:
        for action in nested:
            for sub_parser in action.choices.values():
                _add_output_flags(sub_parser)
        return
    group = parser.add_mutually_exclusive_group()
    for flags, help in (
        (("--quiet", "-q"), "print warnings and errors only: no progress bars, no progress messages"),
        (("--verbose", "-v"), f"also show the progress bars of libraries (model loading, datasets), hidden by "
         f"default (also: {VERBOSE_ENVIRONMENT_VARIABLE}=1)"),
    ):  # fmt: skip
        try:
            group.add_argument(*flags, action="store_true", help=help)
        except argparse.ArgumentError:  # the command defines it (e.g. features' --quiet): its own stays
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``usfmae`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet, verbose = getattr(args, "quiet", False), verbose_requested(getattr(args, "verbose", False))
    logging.basicConfig(format="%(message)s")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    try:
        with library_progress_bars(verbose and not quiet):
            # One failure path for every command: see usfmae_hf.failures (shared with the training scripts).
            return run_reporting_failures(lambda: args.func(args), f"usfmae {args.command}", debug=args.debug)
    finally:
        root.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
