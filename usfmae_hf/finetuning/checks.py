"""Checks a fine-tuning run makes before it trains, each failing in one line instead of a Trainer traceback.

* :func:`check_training_arguments`: ``--max_steps 0`` / ``--num_train_epochs 0`` train nothing;
* :func:`check_class_folders`: every class folder of ``--train_dir`` & co. holds images ``imagefolder`` reads;
* :func:`prepare_output_dir`: a folder holding a previous run is refused unless ``--overwrite_output_dir``
  (which clears that run's outputs) or ``--resume_from_checkpoint``: a new run would otherwise mix its files
  with the old run's stale per-split files and checkpoints (and push them, or rotate its own checkpoints away);
* :func:`resolve_resume_checkpoint`: ``--resume_from_checkpoint`` names a complete Trainer checkpoint of this
  very model (``latest`` = the newest ``checkpoint-N`` of the output folder).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from usfmae_hf.errors import CheckpointError, OutputExistsError, UsfmaeError

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
SPLIT_OUTPUT_NAME = re.compile(r"^(validation|test)_")  # {split}_predictions.csv, {split}_overlays/ ...
_STATE = "trainer_state.json"
# What a fine-tuning run writes at the top of its output folder, by kind (besides {split}_* and checkpoint-N).
OUTPUT_GROUPS: tuple[tuple[str, frozenset[str]], ...] = (
    (
        "model",
        frozenset(
            {
                "config.json",
                "model.safetensors",
                "model.safetensors.index.json",
                "pytorch_model.bin",
                "adapter_config.json",
                "adapter_model.safetensors",
                "preprocessor_config.json",
                "modeling_usfmae.py",
            }
        ),
    ),
    ("model card", frozenset({"README.md"})),
    ("results", frozenset({"all_results.json", "train_results.json", "eval_results.json"})),
    ("Trainer state", frozenset({_STATE, "training_args.bin", "training_args.json"})),
    ("merged model", frozenset({"merged"})),
)
RUN_OUTPUT_FILES = frozenset().union(*(names for _, names in OUTPUT_GROUPS))
# Their presence means a run got as far as training or saving (a model card alone may be the user's).
_RUN_MARKERS = frozenset({"all_results.json", _STATE, "training_args.bin", "training_args.json"})
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Config entries that fix the shapes, labels and head of a classifier or segmenter.
_STRUCTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "image_size",
    "num_channels",
    "fusion_hidden_size",
    "neck_hidden_sizes",
    "backbone_out_indices",
)


def check_training_arguments(training_args: TrainingArguments) -> None:
    """Refuse a run that would take no optimizer step."""
    if training_args.max_steps == 0:
        raise UsfmaeError(
            "--max_steps 0 trains nothing: give a positive number of steps, or -1 (the default) to train for "
            "--num_train_epochs"
        )
    if training_args.max_steps < 0 and training_args.num_train_epochs <= 0:
        raise UsfmaeError(f"--num_train_epochs {training_args.num_train_epochs} trains nothing: give more than 0")


def check_class_folders(folders: Mapping[str, str | None]) -> None:
    """Every class folder (``<dir>/<class>/``) of each split (``{"train": dir, ...}``, None = not given) must hold
    at least one image ``imagefolder`` reads; a folder of DICOMs, say, would silently vanish from the labels."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    for split, folder in folders.items():
        if folder is None or not Path(folder).is_dir():
            continue  # not given, or reported by the loader
        empty, others = [], set()
        for class_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = [p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
            if not any(p.suffix.lower() in extensions for p in files):
                empty.append(class_dir.name)
                others.update(p.suffix.lower() or p.name for p in files)
        if empty:
            found = f" (found only {', '.join(sorted(others)[:5])} files)" if others else ""
            hint = "; convert DICOMs with `usfmae ingest`" if ".dcm" in others else ""
            raise UsfmaeError(
                f"--{split}_dir {folder}: class folder(s) {', '.join(empty)} hold no images{found}{hint}: add "
                "PNG/JPEG images or remove the folders"
            )


def previous_run_outputs(output_dir: str | Path) -> list[str]:
    """Top-level entries of ``output_dir`` that a fine-tuning run wrote, when it holds a previous run (else [])."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    names = sorted(path.name for path in folder.iterdir())
    if not any(name in _RUN_MARKERS or CHECKPOINT_NAME.match(name) for name in names):
        return []
    return [
        name
        for name in names
        if name in RUN_OUTPUT_FILES or CHECKPOINT_NAME.match(name) or SPLIT_OUTPUT_NAME.match(name)
    ]


def prepare_output_dir(training_args: TrainingArguments, *, overwrite: bool) -> list[str]:
    """Refuse an output folder holding a previous run unless the run resumes or ``overwrite``; then the main
    process removes that run's outputs (other files stay). Returns the names removed (on the main process).

    Every process decides from the same folder, so all refuse together; only the main process writes into the
    output folder, and not before training, so the others need not wait for the removal.
    """
    if training_args.resume_from_checkpoint is not None:
        return []
    found = previous_run_outputs(training_args.output_dir)
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise OutputExistsError(
            f"{training_args.output_dir} holds a previous run ({shown}): pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint latest to continue it, or another --output_dir"
        )
    if training_args.process_index != 0:
        return []
    for name in found:
        path = Path(training_args.output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return found


def resolve_resume_checkpoint(checkpoint: str | bool, model: Any, output_dir: str) -> str:
    """The checkpoint folder to resume from, after checking it is a complete Trainer checkpoint of ``model``.

    ``checkpoint`` is a folder, or ``latest`` / ``True`` for the newest ``checkpoint-N`` of ``output_dir``.
    Raises :class:`~usfmae_hf.errors.CheckpointError` naming what differs: not a folder, empty, a pretraining
    checkpoint, no ``trainer_state.json``, no weights, a LoRA adapter against a full model (or back), or another
    model (width, depth, patch, labels, head).
    """
    if checkpoint is True or checkpoint in ("latest", "True", "true"):
        checkpoint = _latest_checkpoint(Path(output_dir))
    folder = Path(checkpoint)
    prefix = f"--resume_from_checkpoint {folder}"
    if not folder.is_dir():
        raise CheckpointError(f"{prefix} is not a folder")
    names = {path.name for path in folder.iterdir()}
    if not names:
        raise CheckpointError(f"{prefix} is empty: not a Trainer checkpoint (checkpoint-N of a fine-tuning run)")
    state = _read_json(folder / _STATE, prefix) if _STATE in names else None
    if state is not None and "global_step" not in state and "step" in state:
        model_dir = folder / "model"
        raise CheckpointError(
            f"{prefix} is a pretraining checkpoint (`usfmae pretrain`), not a fine-tuning one: fine-tune its model "
            f"with --model_name_or_path {model_dir} and without --resume_from_checkpoint"
        )
    if state is None:
        kind = "a model folder" if "config.json" in names else "not a Trainer checkpoint"
        raise CheckpointError(
            f"{prefix} has no {_STATE}: {kind}; to start from a model give it as --model_name_or_path instead"
        )
    weights = [name for name in _WEIGHTS if name in names]
    if not weights:
        raise CheckpointError(
            f"{prefix} has {_STATE} but no model weights ({' / '.join(_WEIGHTS[:3])}): an incomplete checkpoint; "
            "resume from another checkpoint-N"
        )
    _check_same_model(folder, names, model, prefix)
    return str(folder)


def _latest_checkpoint(output_dir: Path) -> Path:
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := CHECKPOINT_NAME.match(p.name))]
    found = [(step, path) for step, path in found if path.is_dir()]
    if not found:
        raise CheckpointError(f"--resume_from_checkpoint latest: {output_dir} holds no checkpoint-N folder")
    return max(found)[1]


def _read_json(path: Path, prefix: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{prefix}: {path.name} is unreadable ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{prefix}: {path.name} is not a JSON object")
    return value


def _check_same_model(folder: Path, names: set[str], model: Any, prefix: str) -> None:
    """Compare the checkpoint's kind (adapter or full) and config with the model this run built."""
    is_adapter_run = hasattr(model, "peft_config")
    has_adapter = any(name in names for name in _ADAPTER_WEIGHTS)
    if has_adapter and not is_adapter_run:
        raise CheckpointError(f"{prefix} holds a LoRA adapter; this run trains the whole model: add --peft lora")
    if is_adapter_run and not has_adapter:
        raise CheckpointError(f"{prefix} holds a whole model; this run trains a LoRA adapter (--peft lora): drop it")
    if "config.json" not in names:
        return  # adapter checkpoints carry adapter_config.json only; peft checks the adapter's shapes
    saved = _read_json(folder / "config.json", prefix)
    current = model.config.to_dict()
    differences = [
        f"{key} {saved.get(key)} (checkpoint) vs {current.get(key)} (this run)"
        for key in _STRUCTURE_KEYS
        if key in saved and key in current and saved[key] != current[key]
    ]
    saved_labels = [saved.get("id2label", {})[key] for key in sorted(saved.get("id2label", {}), key=int)]
    labels = [model.config.id2label[key] for key in sorted(model.config.id2label)]
    if saved_labels and saved_labels != labels:
        differences.append(f"labels {saved_labels} (checkpoint) vs {labels} (this run)")
    architecture = (saved.get("architectures") or [None])[0]
    if architecture is not None and architecture != type(model).__name__:
        differences.append(f"{architecture} (checkpoint) vs {type(model).__name__} (this run)")
    if differences:
        raise CheckpointError(
            f"{prefix} is another model: {'; '.join(differences[:3])}; resume with the run's own "
            "--model_name_or_path, data and --head, or start without --resume_from_checkpoint"
        )
