"""Writing (ViT)MAE weights under the legacy Hub names, and cleaning up after an interrupted atomic write.

transformers 5.x's ``save_pretrained`` renames ViTMAE decoder weights in a way 4.x silently ignores,
so every directory this package writes stores the legacy names (:func:`save_legacy_safetensors`).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import ViTMAEForPreTraining, ViTMAEModel, ViTModel

from usfmae_hf.model.keys import current_to_legacy

logger = logging.getLogger(__name__)

# The names usfmae_hf.atomic gives its staging (".tmp") and replaced (".old") outputs beside NAME:
# ".NAME." + tempfile's 8 random characters + suffix.
_LEFTOVER_SUFFIX = re.compile(r"[a-z0-9_]{8}\.(tmp|old)")


def recover_interrupted_output(output: str | os.PathLike) -> None:
    """Clean up what an earlier run, killed while writing ``output`` atomically, left beside it.

    :func:`~usfmae_hf.atomic.atomic_directory` builds the new output in ``.NAME.XXXXXXXX.tmp`` and, to
    replace an old one, renames it to ``.NAME.XXXXXXXX.old``, renames the new one into place and deletes
    the old; :func:`~usfmae_hf.atomic.atomic_file` writes ``.NAME.XXXXXXXX.tmp``. A run killed between the
    two renames leaves no ``output``: the old one is renamed back, so ``output`` holds the old or the new
    version. Then these leftovers, and only files and folders named so, are deleted. Two runs writing the
    same output at once are not supported: the second would delete the first one's staging.
    """
    output = Path(output)
    prefix = f".{output.name}."
    if not output.parent.is_dir():
        return
    leftovers = [
        path
        for path in output.parent.iterdir()
        if path.name.startswith(prefix) and _LEFTOVER_SUFFIX.fullmatch(path.name.removeprefix(prefix))
    ]
    backups = [path for path in leftovers if path.suffix == ".old" and path.is_dir()]
    if backups and not os.path.lexists(output):
        restored = max(backups, key=lambda path: path.stat().st_mtime)
        restored.rename(output)
        leftovers.remove(restored)
        logger.warning("restored %s from %s, left by a run killed while replacing it", output, restored.name)
    for path in leftovers:
        logger.info("removing %s, left by an interrupted run", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def save_legacy_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, *, prefix: str = "vit."
) -> None:
    """Save a ViT/ViTMAE state dict (current 5.x names) under the legacy Hub names.

    Use this instead of ``save_pretrained`` for ViTMAE weights: 5.x's reverse renaming writes
    decoder names that transformers 4.x silently ignores (its decoder would be re-initialised).
    """
    legacy = current_to_legacy(state_dict, prefix=prefix)
    # safetensors refuses tensors that share storage; q/k/v split from one qkv matrix do.
    seen_storages: set[int] = set()
    tensors = {}
    for name, tensor in legacy.items():
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:
            tensor = tensor.clone()
        else:
            seen_storages.add(storage)
        tensors[name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt"})


def save_vitmae_pretrained(
    model: ViTMAEForPreTraining | ViTMAEModel | ViTModel, output_dir: str | os.PathLike, *, image_processor=None
) -> Path:
    """``save_pretrained`` replacement for (ViT)MAE models: config + legacy-named safetensors (+ processor).

    The config's ``dtype`` is that of the weights written (a config inherited from an fp16 directory would
    otherwise make ``from_pretrained`` load fp32 weights in fp16).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.dtype = next(model.parameters()).dtype
    config.save_pretrained(output_dir)
    prefix = "vit." if isinstance(model, ViTMAEForPreTraining) else ""
    state_dict = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    save_legacy_safetensors(state_dict, output_dir / "model.safetensors", prefix=prefix)
    if image_processor is not None:
        image_processor.save_pretrained(output_dir)
    return output_dir
