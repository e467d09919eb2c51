"""``python -m usfmae_hf.finetuning`` (and ``accelerate launch -m usfmae_hf.finetuning``): classification.

The same entry point as ``training/finetune_classification.py`` and ``usfmae finetune``. Segmentation:
``usfmae finetune-segmentation``, or ``-m usfmae_hf.cli finetune-segmentation`` under a launcher.
"""

import sys

from usfmae_hf.finetuning.run import main

if __name__ == "__main__":
    sys.exit(main())
