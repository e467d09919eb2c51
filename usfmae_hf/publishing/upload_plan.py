"""What a push of a model directory sends to the Hub, checked before a byte leaves the machine.

:func:`plan_upload` refuses what a Hub reviewer would: symlinks leading out of the folder, pickles
(found by content, whatever their name), files over the Hub's size limit, missing files, weights
safetensors cannot read, configs or processors that do not load, invalid card metadata. It leaves out,
and says so, what a fine-tuning output folder holds only for resuming training: the Trainer's state
pickles (``training_args.bin``, ``optimizer.pt``, ...) and its ``checkpoint-*/`` folders.
:func:`usfmae_hf.publishing.hub.push_model_dir` uploads exactly the plan.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.publishing.pickles import find_pickle

README = "README.md"
REQUIRED_FILES = ("config.json", "preprocessor_config.json", README)
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
REQUIRED_CARD_FIELDS = ("license", "library_name", "pipeline_tag")
# What transformers' Trainer writes only to resume training, all pickles (transformers.trainer's
# TRAINING_ARGS_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME and _save_rng_state's files).
TRAINER_STATE_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")
CHECKPOINT_DIRS = "checkpoint-*"  # the Trainer's f"{PREFIX_CHECKPOINT_DIR}-{step}" folders
# Per-file limits of the Hub, from huggingface/hub-docs docs/hub/storage-limits.md ("Repository
# limitations and recommendations", 2026): no file may exceed 500 GB; chunks under 200 GB are
# recommended. Files over 10 MB must be stored with Git LFS/Xet (docs/hub/repositories-getting-started.md):
# huggingface_hub asks the Hub how to send each file (preupload) and does so, so they need nothing here.
MAX_FILE_BYTES = 500 * 10**9
RECOMMENDED_MAX_FILE_BYTES = 200 * 10**9


class PublishError(UsfmaeError):
    """A model directory cannot be published (invalid content, or the Hub refused it)."""


@dataclass(frozen=True)
class UploadPlan:
    """What a push of ``folder`` uploads.

    ``files`` maps each path in the repository to the regular file read for it (for a symlink, its
    target inside ``folder``); ``notes`` are the lines telling the user what is left out, and why.
    """

    folder: Path
    files: dict[str, Path]
    notes: tuple[str, ...]


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.3g} GB"


def _walk(folder: Path, include_checkpoints: bool) -> tuple[dict[str, Path], list[str], list[str]]:
    """Every entry but folders under ``folder`` (links to folders included), by relative path.

    Also returns the problems met (unreadable folders) and the checkpoint folders left out. Links to
    folders are listed, never entered; what ``upload_folder`` never uploads (``.git``, its cache) is skipped.
    """
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS

    def ignored(name: str) -> bool:
        return any(fnmatch(name, pattern) for pattern in DEFAULT_IGNORE_PATTERNS)

    entries: dict[str, Path] = {}
    problems: list[str] = []
    checkpoints: list[str] = []

    def unreadable(error: OSError) -> None:
        problems.append(f"cannot list {error.filename}: {error.strerror}")

    for root, dirs, names in os.walk(folder, onerror=unreadable):  # followlinks=False: links are not entered
        here = Path(root)
        if here == folder and not include_checkpoints:
            checkpoints = sorted(name for name in dirs if fnmatch(name, CHECKPOINT_DIRS))
        entered = []
        for name in sorted(dirs):
            relative = (here / name).relative_to(folder).as_posix()
            if ignored(relative) or relative in checkpoints:
                continue
            if (here / name).is_symlink():
                entries[relative] = here / name
            else:
                entered.append(name)
        dirs[:] = entered
        for name in names:
            relative = (here / name).relative_to(folder).as_posix()
            if not ignored(relative):
                entries[relative] = here / name
    return entries, problems, checkpoints


def _regular_file(name: str, path: Path, folder: Path) -> tuple[Path | None, str | None, str | None]:
    """The regular file read for the entry ``name``, or a problem, or a note (a link to a folder)."""
    if not path.is_symlink():
        if stat.S_ISREG(path.lstat().st_mode):
            return path, None, None
        return None, f"{name} is not a regular file", None
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return None, f"{name} is a dangling symlink (to {os.readlink(path)})", None
    except RuntimeError:  # a loop, before Python 3.13
        return None, f"{name} is a symlink loop", None
    except OSError as error:  # a loop since Python 3.13 (ELOOP), or a link that cannot be followed
        return None, f"{name} is a symlink loop" if error.errno == errno.ELOOP else f"{name}: {error.strerror}", None
    if not target.is_relative_to(folder):
        return None, f"{name} is a symlink to {target}, outside {folder} (copy the file in or remove the link)", None
    if target.is_dir():
        where = target.relative_to(folder).as_posix()
        return None, None, f"{name} links to the folder {where}/ and is not followed (its files are uploaded once)"
    if not target.is_file():
        return None, f"{name} is a symlink to {target}, which is not a regular file", None
    return target, None, None


def _select_files(folder: Path, include_checkpoints: bool) -> UploadPlan:
    """Pick the files a push uploads; raise :class:`PublishError` on any that must not leave the machine."""
    entries, problems, checkpoints = _walk(folder, include_checkpoints)
    files: dict[str, Path] = {}
    notes: list[str] = []
    for name, path in sorted(entries.items()):
        source, problem, note = _regular_file(name, path, folder)
        problems += [problem] if problem else []
        notes += [note] if note else []
        if source is not None:
            files[name] = source

    trainer_state = [name for name in files if any(fnmatch(PurePosixPath(name).name, p) for p in TRAINER_STATE_FILES)]
    for name in trainer_state:
        del files[name]
    pickles = []
    for name, source in files.items():
        try:
            found, size = find_pickle(source), source.stat().st_size
        except OSError as error:
            problems.append(f"cannot read {name}: {error.strerror}")
            continue
        if found is not None:
            pickles.append(f"{name} is {found.description}")
        if size > MAX_FILE_BYTES:
            problems.append(
                f"{name} is {_gigabytes(size)}, over the Hub's limit of {_gigabytes(MAX_FILE_BYTES)} per file "
                "(split it, e.g. save_pretrained(max_shard_size=...))"
            )
        elif size > RECOMMENDED_MAX_FILE_BYTES:
            notes.append(
                f"{name} is {_gigabytes(size)}: the Hub recommends files under "
                f"{_gigabytes(RECOMMENDED_MAX_FILE_BYTES)} (split it, e.g. save_pretrained(max_shard_size=...))"
            )
    if pickles:
        problems.append(
            "refusing to publish pickles, found by their content (convert them to safetensors or remove them): "
            + ", ".join(pickles)
        )
    if problems:
        raise PublishError(f"{folder} cannot be published: " + "; ".join(problems))
    if trainer_state:
        notes.append(
            f"left out {', '.join(trainer_state)}: Trainer state pickles, for resuming training only "
            "(training_args.bin can hold tokens); the settings' JSON form, training_args.json "
            "(TrainingArguments.to_json_string(), tokens redacted), is published when the folder has it"
        )
    if checkpoints:
        notes.append(
            f"left out {', '.join(f'{name}/' for name in checkpoints)}: Trainer checkpoints "
            "(--include-checkpoints uploads them, without their state pickles)"
        )
    return UploadPlan(folder, files, tuple(notes))


def _weight_problems(files: dict[str, Path]) -> list[str]:
    from safetensors import safe_open

    if SAFETENSORS_FILE in files:
        shards = [SAFETENSORS_FILE]
    elif SAFETENSORS_INDEX in files:
        try:
            index = json.loads(files[SAFETENSORS_INDEX].read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            return [f"{SAFETENSORS_INDEX} is not a valid index ({error})"]
    else:
        return [f"no weights: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}"]
    problems = []
    for shard in shards:
        if shard not in files:
            problems.append(f"{shard}, listed in {SAFETENSORS_INDEX}, is missing")
            continue
        try:
            with safe_open(files[shard], framework="pt") as weights:
                weights.keys()
        except Exception as error:  # safetensors raises its own, untyped errors on corrupt files
            problems.append(f"{shard} is not a readable safetensors file ({error})")
    return problems


def _card_problems(readme: Path) -> list[str]:
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(readme)
    except Exception as error:  # YAML and model-index errors surface as various exception types
        return [f"README.md metadata is invalid: {error}"]
    missing = [key for key in REQUIRED_CARD_FIELDS if not getattr(card.data, key, None)]
    return [f"README.md metadata lacks {', '.join(missing)}"] if missing else []


def _loading_problems(path: Path, files: dict[str, Path]) -> list[str]:
    from transformers import AutoConfig, AutoImageProcessor

    try:
        # A model with its own code (config "auto_map") loads only with trust_remote_code; it is the
        # code being published, and the Hub will ask every user to trust it the same way.
        remote_code = "auto_map" in json.loads(files["config.json"].read_text(encoding="utf-8"))
    except (KeyError, OSError, ValueError, TypeError):
        remote_code = False  # the loader below reports what is wrong with config.json
    problems = []
    for name, loader in (("config.json", AutoConfig), ("preprocessor_config.json", AutoImageProcessor)):
        if name not in files:
            continue  # already reported as missing
        try:
            loader.from_pretrained(path, trust_remote_code=remote_code)
        except Exception as error:  # any failure to load is a reason to refuse the upload
            problems.append(f"{name} does not load with {loader.__name__}: {error}")
    return problems


def plan_upload(path: str | Path, *, include_checkpoints: bool = False) -> UploadPlan:
    """Check that ``path`` is a model directory fit for the Hub; return what a push of it uploads.

    Uploaded: the regular files under ``path`` (not ``.git``). A symlink whose target lies inside
    ``path`` is uploaded under its own name with its target's content; a link to a folder is not
    followed (that folder's files are uploaded once, under their own path). Left out, with a note:
    the Trainer's state pickles (:data:`TRAINER_STATE_FILES`, e.g. ``training_args.bin``) wherever they
    are, and the top-level ``checkpoint-*/`` folders unless ``include_checkpoints``.

    Refused, with every problem listed in one :class:`PublishError` and nothing loaded or uploaded
    first: symlinks leading out of ``path``, dangling or looping; anything not a regular file; pickles,
    found by content (:func:`usfmae_hf.publishing.pickles.find_pickle`) whatever their name; files
    over :data:`MAX_FILE_BYTES` (files over :data:`RECOMMENDED_MAX_FILE_BYTES` get a note). Then, also
    in one error: a missing ``config.json``, ``preprocessor_config.json``, ``README.md`` or safetensors
    weights (single file or a complete sharded index); weights safetensors cannot read; a config or
    image processor that ``AutoConfig``/``AutoImageProcessor`` cannot load; card metadata that does not
    parse or lacks ``license``, ``library_name`` or ``pipeline_tag``. A directory with its own model
    code (config ``auto_map``) is loaded with ``trust_remote_code=True``, i.e. that code runs.
    """
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a directory")
    plan = _select_files(folder, include_checkpoints)
    problems = [f"missing {name}" for name in REQUIRED_FILES if name not in plan.files]
    problems += _weight_problems(plan.files)
    if README in plan.files:
        problems += _card_problems(plan.files[README])
    problems += _loading_problems(folder, plan.files)
    if problems:
        raise PublishError(f"{folder} cannot be published: " + "; ".join(problems))
    return plan


def validate_model_dir(path: str | Path) -> Path:
    """Check that ``path`` is a model directory fit for the Hub (see :func:`plan_upload`); return it resolved."""
    return plan_upload(path).folder
