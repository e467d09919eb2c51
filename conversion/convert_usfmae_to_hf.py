#!/usr/bin/env python
"""Convert an original USF-MAE / MAE checkpoint into a Hugging Face model directory.

Example (``--source`` declares the file to be the official 100-epoch release, for the model card):
    python conversion/convert_usfmae_to_hf.py USF-MAE_100ep.pth --output usf-mae-vit-base --source usf-mae-100ep

Same as ``usfmae convert``; see ``--help`` for every option.
"""

import argparse
import logging
import sys

from usfmae_hf.commands.convert import add_convert_arguments, run_convert
from usfmae_hf.errors import UsfmaeError

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = add_convert_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    try:
        sys.exit(run_convert(parser.parse_args()))
    except UsfmaeError as error:
        sys.exit(f"error: {error}")
