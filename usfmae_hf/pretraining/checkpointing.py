"""Atomic, rotating training checkpoints that a resumed run can trust.

A checkpoint is written into ``.checkpoint-N.tmp`` by every process (accelerate stores model,
optimizer, scaler and per-process RNG states there), completed by the main process with
``trainer_state.json`` and an HF model directory (``model/``), and only then renamed to
``checkpoint-N``. Resume only ever looks at ``checkpoint-N`` names, so a run killed while saving
leaves nothing that could be half-loaded.

Before a checkpoint is loaded, :func:`check_resumable` compares its architecture, optimizer layout and
run settings (``run_settings.json``) with the current run, so that a mismatch is one line naming the
difference, not a failure deep inside ``load_state_dict``. The learning-rate schedule is a function
of the step alone and is rebuilt, not loaded, so checkpoints without scheduler state resume as well.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from usfmae_hf.atomic import atomic_write_text
from usfmae_hf.errors import CheckpointError, OutputExistsError, UsfmaeError
from usfmae_hf.model.fields import SHAPE_AND_LOSS_FIELDS

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
SETTINGS_FILE = "run_settings.json"
#: What a run writes besides checkpoints; ``--overwrite_output_dir`` removes exactly these.
RUN_OUTPUTS = ("log.jsonl", "training_curves.png", "final", "reconstructions")


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


def batches_to_skip(state: TrainState, per_device_batch: int, num_processes: int) -> int:
    """Per-process micro-batches of the current epoch that ``state`` has consumed; a resumed run skips them.

    Any process count works as long as the global micro-batch is the same as the saved run's.

    Raises:
        UsfmaeError: the samples consumed are not a whole number of global micro-batches.
    """
    global_batch = per_device_batch * num_processes
    if state.samples_in_epoch % global_batch:
        raise UsfmaeError(
            f"cannot resume: {state.samples_in_epoch} samples into the epoch is not a multiple of the global "
            f"micro-batch {global_batch}; resume with the same global batch size"
        )
    return state.samples_in_epoch // global_batch


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


def prepare_output_dir(output_dir: Path, *, resuming: bool, overwrite: bool) -> str:
    """Make ``output_dir`` ready for a run; return a note ("" if none). Main process only.

    A fresh run refuses a folder holding a checkpoint or a final model unless ``overwrite``, which
    removes the checkpoints and :data:`RUN_OUTPUTS` (nothing else). The log of a failed run that left
    neither is replaced without asking: there is nothing to resume from.
    """
    if resuming and overwrite:
        raise UsfmaeError("--overwrite_output_dir starts over and --resume_from_checkpoint continues: give one")
    checkpoints = list_checkpoints(output_dir)
    note = ""
    if not resuming:
        kept = [path.name for path in checkpoints] + (["final/"] if (output_dir / "final").is_dir() else [])
        if kept and not overwrite:
            raise OutputExistsError(
                f"{output_dir} holds a run ({', '.join(kept)}); pass --resume_from_checkpoint latest to continue "
                "it, --overwrite_output_dir to start over, or another --output_dir"
            )
        stale = [path for path in checkpoints + [output_dir / name for name in RUN_OUTPUTS] if path.exists()]
        if stale and overwrite:
            note = f"--overwrite_output_dir: removed {', '.join(path.name for path in stale)} from {output_dir}"
        elif stale:
            note = f"{output_dir} holds the log of a run that saved no checkpoint or model; starting over"
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output_dir)
    return note


def optimizer_layout(param_groups: list[Mapping[str, Any]], sizes: Mapping[Any, int]) -> dict[str, Any]:
    """Parameter groups as compared on resume: tensors and values per group, and their hyperparameters.

    ``param_groups`` are ``optimizer.param_groups`` or those of a saved optimizer state; ``sizes`` maps
    each entry of their ``params`` (a tensor or a saved index) to its number of values; a group with an
    entry missing from ``sizes`` (a state saved before any step) has ``None`` values (not compared).
    """
    values = []
    for group in param_groups:
        counts = [sizes.get(_key(p)) for p in group["params"]]
        values.append(None if None in counts else sum(counts))
    return {
        "tensors": [len(group["params"]) for group in param_groups],
        "values": values,
        "weight_decay": [group["weight_decay"] for group in param_groups],
        "betas": [list(group["betas"]) for group in param_groups],
        "eps": [group["eps"] for group in param_groups],
    }


def _key(parameter: Any) -> Any:
    return parameter if isinstance(parameter, int) else id(parameter)


def current_settings(config: Any, optimizer: Any, run: Mapping[str, Any], precision: str) -> dict[str, Any]:
    """What :func:`check_resumable` compares, for the current run (also saved in every checkpoint)."""
    sizes = {id(p): p.numel() for group in optimizer.param_groups for p in group["params"]}
    return {
        "architecture": {name: getattr(config, name, None) for name in SHAPE_AND_LOSS_FIELDS},
        "optimizer": optimizer_layout(optimizer.param_groups, sizes),
        "run": dict(run),
        "precision": precision,
    }


def save_settings(directory: Path, settings: Mapping[str, Any]) -> None:
    atomic_write_text(directory / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")


def check_resumable(checkpoint: Path, current: Mapping[str, Any]) -> list[str]:
    """Raise :class:`CheckpointError` (one line) if ``checkpoint`` cannot continue the current run.

    Compares the architecture, the optimizer layout and hyperparameters, and the run settings
    (batch, schedule, seed, data size); a checkpoint older than ``run_settings.json`` is checked on
    what its model config and optimizer state record. Returns notes on harmless differences.
    """
    saved, notes = saved_settings(checkpoint), []
    if not (checkpoint / SETTINGS_FILE).is_file():
        notes.append(f"{checkpoint.name} predates {SETTINGS_FILE}: compared its model config and optimizer state only")
    differences = []
    for section in ("architecture", "optimizer", "run"):
        if section not in saved:
            notes.append(f"{checkpoint.name} records no {section} settings; not compared")
            continue
        for name, value in current[section].items():
            if name in saved[section] and not _same(saved[section][name], value):
                differences.append(
                    f"{section} {name} {_show(saved[section][name])} in the checkpoint, {_show(value)} now"
                )
    if differences:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: {'; '.join(differences)}. Resume with the checkpoint's settings, or "
            f"start a new --output_dir with --model_name_or_path {checkpoint / 'model'}"
        )
    if saved.get("precision") not in (None, current["precision"]):
        notes.append(f"{checkpoint.name} trained in {saved['precision']}; continuing in {current['precision']}")
    return notes


def saved_settings(checkpoint: Path) -> dict[str, Any]:
    """The settings a checkpoint records: its run_settings.json, or what older checkpoints' files tell."""
    path = checkpoint / SETTINGS_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError as error:
            raise CheckpointError(f"{path}: unreadable ({error})") from None
    saved: dict[str, Any] = {}
    config = checkpoint / "model" / "config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        saved["architecture"] = {name: values[name] for name in SHAPE_AND_LOSS_FIELDS if name in values}
    optimizer = checkpoint / "optimizer.bin"
    if optimizer.is_file():
        import torch

        state = torch.load(optimizer, map_location="cpu", mmap=True, weights_only=True)
        sizes = {index: moments["exp_avg"].numel() for index, moments in state["state"].items() if "exp_avg" in moments}
        saved["optimizer"] = optimizer_layout(state["param_groups"], sizes)
        peaks = {group.get("initial_lr") for group in state["param_groups"]} - {None}
        if len(peaks) == 1:
            saved["run"] = {"peak_lr": peaks.pop()}
    return saved


def _same(saved: Any, current: Any) -> bool:
    """Equal, floats to 1e-9 relative; ``None`` saved (not recorded) matches anything."""
    if saved is None:
        return True
    numbers = (int, float)
    if isinstance(saved, float) or isinstance(current, float):
        return (
            isinstance(saved, numbers) and isinstance(current, numbers) and math.isclose(saved, current, rel_tol=1e-9)
        )
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        return len(saved) == len(current) and all(_same(a, b) for a, b in zip(saved, current))
    return saved == current


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "/".join(_show(item) for item in value)
    return str(value)
