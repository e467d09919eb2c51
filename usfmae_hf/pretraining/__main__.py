"""``python -m usfmae_hf.pretraining`` (and ``accelerate launch -m usfmae_hf.pretraining``): MAE pretraining.

The same entry point as ``training/pretrain_mae.py`` and ``usfmae pretrain``, for installs without
the repository's ``training/`` folder.
"""

import sys

from usfmae_hf.pretraining import main

if __name__ == "__main__":
    sys.exit(main())
