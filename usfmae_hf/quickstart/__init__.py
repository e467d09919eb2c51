"""The ``usfmae quickstart`` demo: the whole lifecycle on real ultrasound DICOMs, and its report."""

from __future__ import annotations

from usfmae_hf.quickstart.runner import (
    NUM_STEPS,
    RAW_FOLDER,
    SMALL_MAE,
    ULTRASOUND_DICOMS,
    Quickstart,
    QuickstartSettings,
    build_orientation_task,
    collect_ultrasound_dicoms,
    run_quickstart,
)

__all__ = [
    "NUM_STEPS",
    "RAW_FOLDER",
    "SMALL_MAE",
    "ULTRASOUND_DICOMS",
    "Quickstart",
    "QuickstartSettings",
    "build_orientation_task",
    "collect_ultrasound_dicoms",
    "run_quickstart",
]
