"""``usfmae pretrain ...``: MAE pretraining, the same entry point as ``training/pretrain_mae.py``.

Every flag after ``pretrain`` (``--help`` included) goes to :func:`usfmae_hf.pretraining.main`
untouched; :func:`register_forwarding` is the same hand-over for the fine-tuning commands.
"""

from __future__ import annotations

import argparse
import importlib
import os

from usfmae_hf.failures import DEBUG_ENVIRONMENT_VARIABLE

# No command-line argument can contain a NUL byte, so a sub-parser whose only option prefix is NUL
# sees every argument as a positional. With the usual "-" prefix argparse rejects a leading
# ``--output_dir`` as unrecognised, even before an ``argparse.REMAINDER`` positional.
_NO_OPTIONS = "\0"


def register_forwarding(subparsers: argparse._SubParsersAction, name: str, entry_point: str, help: str) -> None:
    """Add sub-command ``name`` that hands all of its arguments to ``entry_point`` (``"module:function"``).

    The function takes the argument list and returns an exit status, like the training mains; it is
    imported only when the command runs, so ``usfmae --help`` stays fast.
    """
    parser = subparsers.add_parser(name, help=help, add_help=False, prefix_chars=_NO_OPTIONS)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: _forward(entry_point, args))


def _forward(entry_point: str, args: argparse.Namespace) -> int:
    module_name, _, function_name = entry_point.partition(":")
    main = getattr(importlib.import_module(module_name), function_name)
    if not args.debug:
        return main(args.argv)
    # The training mains report their own failures and read --debug from the environment: set it for this
    # run only (a later in-process call, e.g. from a notebook, is not left printing tracebacks).
    previous = os.environ.get(DEBUG_ENVIRONMENT_VARIABLE)
    os.environ[DEBUG_ENVIRONMENT_VARIABLE] = "1"
    try:
        return main(args.argv)
    finally:
        if previous is None:
            del os.environ[DEBUG_ENVIRONMENT_VARIABLE]
        else:
            os.environ[DEBUG_ENVIRONMENT_VARIABLE] = previous


def register(subparsers: argparse._SubParsersAction) -> None:
    register_forwarding(
        subparsers,
        "pretrain",
        "usfmae_hf.pretraining:main",
        help="MAE pretraining with Accelerate (as training/pretrain_mae.py; --help lists every flag)",
    )
