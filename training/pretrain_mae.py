#!/usr/bin/env python
"""MAE pretraining of USF-MAE with Hugging Face Accelerate.

Launch with ``python``, ``accelerate launch`` or ``torchrun``; see training/README.md and ``--help``.
All logic lives in :mod:`usfmae_hf.pretraining`.
"""

import sys

from usfmae_hf.pretraining import main

if __name__ == "__main__":
    sys.exit(main())
