"""Reading original MAE / USF-MAE checkpoints safely, and inferring their architecture.

Checkpoints are untrusted pickles. They are only ever opened with ``torch.load(weights_only=True)``
(or as safetensors), which refuses any pickle that would import and call arbitrary code. Every
failure becomes a :class:`~usfmae_hf.errors.CheckpointError` with a one-line message. The layout a
checkpoint must have (keys and shapes) is :mod:`usfmae_hf.model.mae_layout`'s; its
``validate_mae_state_dict`` and ``expected_keys`` are importable from here too.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from usfmae_hf.errors import CheckpointError
from usfmae_hf.failures import one_line
from usfmae_hf.model.keys import is_decoder_key
from usfmae_hf.model.mae_layout import count_blocks, expected_keys, grid_side, validate_mae_state_dict

__all__ = [
    "DECODER_HEADS",
    "ENCODER_HEADS_BY_WIDTH",
    "LAYOUT_ENCODER_ONLY",
    "LAYOUT_MAE_CHECKPOINT",
    "LAYOUT_STATE_DICT",
    "OriginalCheckpoint",
    "expected_keys",
    "infer_vitmae_config_kwargs",
    "load_original_checkpoint",
    "sha256_of_file",
    "validate_mae_state_dict",
]

# Layout names recorded in the provenance of converted models.
LAYOUT_STATE_DICT = "state_dict"  # torch.save(model.state_dict()), what USF-MAE saves
LAYOUT_MAE_CHECKPOINT = "mae_checkpoint"  # {"model": ..., "optimizer": ..., "epoch": ..., "args": ...}
LAYOUT_ENCODER_ONLY = "encoder_only"  # no decoder_* / mask_token, as Meta's "pretrain" releases

# Hidden size -> attention heads of the standard ViT sizes; heads cannot be read off shapes.
ENCODER_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DECODER_HEADS = 16  # every released MAE decoder uses 16 heads
# Wrappers some training frameworks add in front of every key.
_KEY_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class OriginalCheckpoint:
    """An original-layout MAE state dict with what was learned while reading it."""

    state_dict: dict[str, torch.Tensor]
    layout: str
    sha256: str
    path: Path
    extra: dict = field(default_factory=dict)  # e.g. the "epoch" of a training checkpoint

    @property
    def has_decoder(self) -> bool:
        return self.layout != LAYOUT_ENCODER_ONLY


def sha256_of_file(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def load_original_checkpoint(path: str | Path) -> OriginalCheckpoint:
    """Read an MAE checkpoint in any of the layouts in the wild and validate it.

    Accepts ``.pt``/``.pth`` pickles (bare state dict, or ``{"model": state_dict, ...}``) and
    ``.safetensors`` files; encoder-only files are recognised by the absence of decoder keys.
    Raises :class:`CheckpointError` for unsafe, truncated, corrupt or non-MAE files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)

    extra: dict = {}
    layout = LAYOUT_STATE_DICT
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        layout = LAYOUT_MAE_CHECKPOINT
        extra = {key: raw[key] for key in ("epoch",) if isinstance(raw.get(key), (int, float))}
        raw = raw["model"]
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{path}: not a state dict (found {type(raw).__name__})")
    non_tensors = [key for key, value in raw.items() if not isinstance(value, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(
            f"{path}: not a state dict: {len(non_tensors)} entries are not tensors, e.g. {non_tensors[0]!r}"
        )
    _check_tensors(raw, path)

    state_dict = {_strip_wrappers(key): value for key, value in raw.items()}
    if not any(is_decoder_key(key) for key in state_dict):
        layout = LAYOUT_ENCODER_ONLY
    validate_mae_state_dict(state_dict, encoder_only=layout == LAYOUT_ENCODER_ONLY, source=str(path))
    return OriginalCheckpoint(state_dict, layout, sha256_of_file(path), path, extra)


def _check_tensors(raw: dict, path: Path) -> None:
    """Refuse what no MAE state dict holds: keys that are not strings, sparse or non-float tensors."""
    for key, value in raw.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: not a state dict: key {key!r} is not a string")
        if value.layout != torch.strided:
            raise CheckpointError(f"{path}: {key} is a sparse tensor ({value.layout}); MAE weights are dense")
        if not value.is_floating_point():
            raise CheckpointError(
                f"{path}: {key} holds {value.dtype} values; MAE weights are floating point (fp32, fp16, bf16, fp64)"
            )


def _read_pickle(path: Path):
    try:
        # mmap keeps peak memory near the file size; Namespace is how MAE stores its "args".
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # torch warns (in lines mentioning weights_only) about protocol-4 pickles; the error below says it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # a sparse tensor is refused below, in one line: torch's note on checking it is noise
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as error:
        match = re.search(r"GLOBAL ([\w.]+)", str(error))
        culprit, readable = (match.group(1), True) if match else _inspect_pickle(path)
        if culprit is not None:
            raise CheckpointError(
                f"{path}: refused: the pickle would import and run code ({culprit}); nothing was executed. "
                "Only plain tensor checkpoints are accepted."
            ) from None
        if readable and _WEIGHTS_ONLY_FAILURE in str(error):  # e.g. protocol 4 opcodes the safe loader lacks
            raise CheckpointError(
                f"{path}: refused: the safe checkpoint loader cannot read this pickle ({_first_line(error)}); "
                "nothing was executed. Re-save the state dict with a current torch.save, or as safetensors."
            ) from None
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(error)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(error)})") from None


_WEIGHTS_ONLY_FAILURE = "Weights only load failed"
# Modules whose globals a plain tensor checkpoint legitimately names (torch's rebuild functions,
# storages, OrderedDict, MAE's argparse.Namespace); anything else in a refused pickle is code.
_DATA_MODULES = ("torch", "collections", "argparse", "numpy", "_codecs", "builtins")


def _first_line(error: BaseException) -> str:
    # torch's weights_only errors advise disabling weights_only, i.e. running the pickle: never passed on.
    return one_line(str(error)) or type(error).__name__


def _inspect_pickle(path: Path) -> tuple[str | None, bool]:
    """The first non-data global a refused pickle names, and whether its first pickle parses.

    Found by reading opcodes with :mod:`pickletools`: nothing is imported or executed.
    """
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith(".pkl")]
                streams = [archive.read(n) for n in names]
            results = [_scan_pickles(pickletools, stream, 1) for stream in streams]
            culprit = next((culprit for culprit, _ in results if culprit is not None), None)
            return culprit, bool(results) and all(readable for _, readable in results)
        # Legacy files are several pickles in a row: magic number, protocol, sys info, the object.
        return _scan_pickles(pickletools, path.read_bytes(), 4)
    except (OSError, ValueError, zipfile.BadZipFile, RuntimeError):
        return None, False


def _scan_pickles(pickletools, data: bytes, count: int) -> tuple[str | None, bool]:
    import io

    handle = io.BytesIO(data)
    for number in range(count):
        strings: list[str] = []  # string pushes, the operands of STACK_GLOBAL
        memo: dict[int, str] = {}  # memoized strings by memo index
        memo_count = 0
        last_string: str | None = None
        try:
            for opcode, arg, _position in pickletools.genops(handle):
                name, pushed, last_string = opcode.name, last_string, None
                culprit = None
                if name in ("GLOBAL", "INST"):
                    culprit = str(arg).replace(" ", ".")
                elif name == "STACK_GLOBAL" and len(strings) >= 2:
                    culprit = f"{strings[-2]}.{strings[-1]}"
                elif isinstance(arg, str) and ("UNICODE" in name or name.endswith("STRING")):
                    strings.append(arg)
                    last_string = arg
                elif name == "MEMOIZE":
                    if pushed is not None:
                        memo[memo_count] = pushed
                    memo_count += 1
                elif name in ("BINPUT", "LONG_BINPUT", "PUT") and pushed is not None:
                    memo[int(arg)] = pushed
                elif name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                    strings.append(memo[int(arg)])
                    last_string = memo[int(arg)]
                if culprit is not None and culprit.split(".")[0] not in _DATA_MODULES:
                    return culprit, True
        except Exception:  # not a pickle, or past the last one (raw storage bytes)
            return None, number > 0
    return None, True


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({_first_line(error)})") from None


def _is_zip(path: Path) -> bool:
    # torch.save writes zip archives since 1.6; older (legacy) pickles cannot be memory-mapped.
    return zipfile.is_zipfile(path)


def _strip_wrappers(key: str) -> str:
    for prefix in _KEY_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def infer_vitmae_config_kwargs(
    checkpoint: OriginalCheckpoint,
    *,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
) -> dict:
    """``ViTMAEConfig`` keyword arguments read off tensor shapes (heads from presets or overrides)."""
    sd = checkpoint.state_dict
    width, channels, patch, _ = sd["patch_embed.proj.weight"].shape
    side = grid_side(sd["pos_embed"].shape[1] - 1, str(checkpoint.path))
    heads = num_attention_heads or ENCODER_HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise CheckpointError(f"hidden size {width} has no standard head count; pass --num-attention-heads")
    if width % heads:
        raise CheckpointError(f"hidden size {width} is not divisible by {heads} attention heads")
    kwargs = dict(
        hidden_size=width,
        num_hidden_layers=count_blocks(sd, "blocks"),
        num_attention_heads=heads,
        intermediate_size=sd["blocks.0.mlp.fc1.weight"].shape[0],
        hidden_act="gelu",
        qkv_bias=True,
        layer_norm_eps=1e-6,
        image_size=side * patch,
        patch_size=patch,
        num_channels=channels,
    )
    if checkpoint.has_decoder:
        dec = sd["decoder_embed.weight"].shape[0]
        dec_heads = decoder_num_attention_heads or DECODER_HEADS
        if dec % dec_heads:
            raise CheckpointError(
                f"decoder width {dec} is not divisible by {dec_heads} heads; pass --decoder-num-attention-heads"
            )
        kwargs.update(
            decoder_hidden_size=dec,
            decoder_num_hidden_layers=count_blocks(sd, "decoder_blocks"),
            decoder_num_attention_heads=dec_heads,
            decoder_intermediate_size=sd["decoder_blocks.0.mlp.fc1.weight"].shape[0],
        )
    return kwargs
