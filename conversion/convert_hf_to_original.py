#!/usr/bin/env python
"""Write a converted Hugging Face USF-MAE directory back as an original MAE state dict (qkv merged).

Examples (the second writes the encoder alone, which timm's ``vit_base_patch16_224`` loads strictly):
    python conversion/convert_hf_to_original.py usf-mae-vit-base --output usf-mae-original.pth
    python conversion/convert_hf_to_original.py usf-mae-vit-base --output usf-mae-encoder.pth --encoder-only

Runs ``usfmae export-original``: the same flags, ``--help`` and one-line errors (exit status 2 for a bad flag
or input).
"""

import sys

from usfmae_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-original", *sys.argv[1:]]))
