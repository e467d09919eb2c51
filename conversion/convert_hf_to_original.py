#!/usr/bin/env python
"""Write a converted Hugging Face USF-MAE directory back as an original MAE state dict (qkv merged).

Examples (the second writes the encoder alone, which timm's ``vit_base_patch16_224`` loads strictly):
    python conversion/convert_hf_to_original.py usf-mae-vit-base --output usf-mae-original.pth
    python conversion/convert_hf_to_original.py usf-mae-vit-base --output usf-mae-encoder.pth --encoder-only

Same as ``usfmae export-original``; see ``--help`` for every option.
"""

import argparse
import sys

from usfmae_hf.commands.convert import add_export_arguments, run_export
from usfmae_hf.errors import UsfmaeError

if __name__ == "__main__":
    parser = add_export_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    try:
        sys.exit(run_export(parser.parse_args()))
    except UsfmaeError as error:
        sys.exit(f"error: {error}")
