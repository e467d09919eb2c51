#!/usr/bin/env python
"""Convert an original USF-MAE / MAE checkpoint into a Hugging Face model directory.

Example (``--source`` declares the file to be the official 100-epoch release, for the model card):
    python conversion/convert_usfmae_to_hf.py USF-MAE_100ep.pth --output usf-mae-vit-base --source usf-mae-100ep

Runs ``usfmae convert``: the same flags, ``--help`` and one-line errors (exit status 2 for a bad flag
or input).
"""

import sys

from usfmae_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
