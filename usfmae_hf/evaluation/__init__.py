"""Downstream evaluation sets (BUS-BRA, MMOTU-2D, GIST514-DB; segmentation sets too) and leakage checks.

``load_busbra``, ``load_mmotu2d`` and ``load_gist514`` return ``DatasetDict``s with ``train``,
``validation`` and ``test`` splits; :func:`check_leakage` proves that no patient and no image content
is shared by two splits.
"""

from __future__ import annotations

from usfmae_hf.evaluation.adapters import BUSBRA_CLASSES, MMOTU2D_CLASSES, load_busbra, load_gist514, load_mmotu2d
from usfmae_hf.evaluation.leakage import DataLeakageError, LeakageReport, check_leakage, find_shared_images, hash_images
from usfmae_hf.evaluation.segmentation_data import SEGMENTATION_TASKS, load_segmentation_images

__all__ = [
    "BUSBRA_CLASSES",
    "MMOTU2D_CLASSES",
    "SEGMENTATION_TASKS",
    "DataLeakageError",
    "LeakageReport",
    "check_leakage",
    "find_shared_images",
    "hash_images",
    "load_busbra",
    "load_gist514",
    "load_mmotu2d",
    "load_segmentation_images",
]
