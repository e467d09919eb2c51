"""Atomic, rotating training checkpoints that a resumed run can trust.

A checkpoint is written into ``.checkpoint-N.tmp`` by every process (accelerate stores model,
optimizer, scaler and per-process RNG states there), completed by the main process with
``trainer_state.json`` and an HF model directory (``model/``), and only then renamed to
``checkpoint-N``. Resume only ever looks at ``checkpoint-N`` names, so a run killed while saving
leaves nothing that could be half-loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from usfmae_hf.atomic import atomic_write_text
from usfmae_hf.errors import CheckpointError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Where a run stands; saved with every checkpoint."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    samples_in_epoch: int = 0  # samples (all processes) already consumed in the current epoch
    images_seen: int = 0
    bad_images_seen: int = 0

    def save(self, directory: Path) -> None:
        atomic_write_text(directory / STATE_FILE, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        try:
            return cls(**json.loads((directory / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise CheckpointError(f"{directory}: not a training checkpoint ({error})") from None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()
    ]
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """``latest`` -> the newest complete checkpoint (None on a fresh run); a path -> that checkpoint."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {STATE_FILE})")
    return path


def staging_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f".checkpoint-{step}.tmp"


def remove_stale_staging(output_dir: Path) -> None:
    """Delete leftovers of checkpoints interrupted while being written."""
    for path in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def publish(staging: Path, output_dir: Path, step: int, save_total_limit: int | None) -> Path:
    """Rename a finished staging directory to ``checkpoint-N`` and drop the oldest beyond the limit."""
    final = output_dir / f"checkpoint-{step}"
    if final.exists():  # the same step saved again after a resume: the new one replaces it
        shutil.rmtree(final)
    staging.rename(final)
    if save_total_limit is not None:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final
