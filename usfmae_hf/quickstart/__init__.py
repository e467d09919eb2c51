"""The ``usfmae quickstart`` demo: the whole lifecycle on real ultrasound DICOMs, and its report."""

from __future__ import annotations

from usfmae_hf.quickstart.runner import (
    NUM_STEPS,
    RAW_FOLDER,
    SMALL_MAE,
    ULTRASOUND_DICOMS,
    Quickstart,
    QuickstartSettings,
    collect_ultrasound_dicoms,
    run_quickstart,
)
from usfmae_hf.quickstart.task import OrientationTask, build_orientation_task, check_task_leakage

__all__ = [
    "NUM_STEPS",
    "RAW_FOLDER",
    "SMALL_MAE",
    "ULTRASOUND_DICOMS",
    "Quickstart",
    "QuickstartSettings",
    "OrientationTask",
    "build_orientation_task",
    "check_task_leakage",
    "collect_ultrasound_dicoms",
    "run_quickstart",
]
