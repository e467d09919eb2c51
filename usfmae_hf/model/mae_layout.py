"""The original MAE state-dict layout: every key an MAE of given depths has, and the shape of each.

:func:`validate_mae_state_dict` checks a state dict against it (one readable error naming the first
difference); :mod:`usfmae_hf.model.checkpoints` runs it on every checkpoint it reads, and
:mod:`usfmae_hf.model.export` on every state dict it writes.
"""

from __future__ import annotations

import math
import re

import torch

from usfmae_hf.errors import CheckpointError
from usfmae_hf.model.keys import ORIGINAL_BLOCK_MODULES, ORIGINAL_DECODER_TOP, ORIGINAL_ENCODER_TOP

_BLOCK_INNER_SUFFIXES = tuple(f"{module}.{kind}" for module in ORIGINAL_BLOCK_MODULES for kind in ("weight", "bias"))
_BLOCK_INDEX = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.")


def count_blocks(state_dict: dict[str, torch.Tensor], stack: str) -> int:
    """How many blocks the ``stack`` (``"blocks"`` or ``"decoder_blocks"``) has; their indices must be 0..N-1."""
    indices = {int(m.group(2)) for key in state_dict if (m := _BLOCK_INDEX.match(key)) and m.group(1) == stack}
    if indices and indices != set(range(max(indices) + 1)):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise CheckpointError(f"{stack}: block indices are not contiguous (missing {missing})")
    return len(indices)


def expected_keys(depth: int, decoder_depth: int | None) -> set[str]:
    """The full original-layout key set of an MAE with these depths (``None``: encoder only)."""
    keys = set(ORIGINAL_ENCODER_TOP) | {f"blocks.{i}.{s}" for i in range(depth) for s in _BLOCK_INNER_SUFFIXES}
    if decoder_depth is not None:
        keys |= set(ORIGINAL_DECODER_TOP) | {
            f"decoder_blocks.{i}.{s}" for i in range(decoder_depth) for s in _BLOCK_INNER_SUFFIXES
        }
    return keys


def validate_mae_state_dict(
    state_dict: dict[str, torch.Tensor], *, encoder_only: bool, source: str = "checkpoint"
) -> None:
    """Check keys and shapes of an original-layout MAE state dict; raise one readable error."""
    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        sample = ", ".join(sorted(state_dict)[:3])
        raise CheckpointError(
            f"{source}: not an MAE/ViT checkpoint (no patch_embed.proj.weight / pos_embed; keys start {sample})"
        )
    try:
        depth = count_blocks(state_dict, "blocks")
        decoder_depth = None if encoder_only else count_blocks(state_dict, "decoder_blocks")
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    if depth == 0:
        raise CheckpointError(f"{source}: no encoder blocks (no blocks.N.* keys): not an MAE/ViT encoder")
    if decoder_depth == 0:
        raise CheckpointError(
            f"{source}: no decoder blocks (no decoder_blocks.N.* keys) beside its decoder weights; an encoder-only "
            "checkpoint has no decoder_* keys and no mask_token at all"
        )
    expected = expected_keys(depth, decoder_depth)
    missing = sorted(expected - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected)
    if missing:
        raise CheckpointError(f"{source}: missing keys: {_short_list(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys: {_short_list(unexpected)}")
    _check_shapes(state_dict, depth, decoder_depth, source)


def _short_list(names: list[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_shapes(state_dict: dict[str, torch.Tensor], depth: int, decoder_depth: int | None, source: str) -> None:
    patch_weight = state_dict["patch_embed.proj.weight"]
    if patch_weight.ndim != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
        raise CheckpointError(
            f"{source}: patch_embed.proj.weight has shape {tuple(patch_weight.shape)}, expected (D, C, P, P)"
        )
    width = patch_weight.shape[0]
    mlp = state_dict["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * width
    expected = {
        "cls_token": (1, 1, width),
        "patch_embed.proj.bias": (width,),
        "norm.weight": (width,),
        "norm.bias": (width,),
    }
    pos = state_dict["pos_embed"]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width:
        raise CheckpointError(f"{source}: pos_embed has shape {tuple(pos.shape)}, expected (1, N+1, {width})")
    grid_side(pos.shape[1] - 1, source)
    expected.update(_block_shapes("blocks", depth, width, mlp))
    if decoder_depth is not None:
        dec = state_dict["decoder_embed.weight"].shape[0]
        dec_mlp = state_dict["decoder_blocks.0.mlp.fc1.weight"].shape[0] if decoder_depth else 4 * dec
        pixels = patch_weight.shape[1] * patch_weight.shape[2] * patch_weight.shape[3]
        expected.update(
            {
                "mask_token": (1, 1, dec),
                "decoder_pos_embed": (1, pos.shape[1], dec),
                "decoder_embed.weight": (dec, width),
                "decoder_embed.bias": (dec,),
                "decoder_norm.weight": (dec,),
                "decoder_norm.bias": (dec,),
                "decoder_pred.weight": (pixels, dec),
                "decoder_pred.bias": (pixels,),
            }
        )
        expected.update(_block_shapes("decoder_blocks", decoder_depth, dec, dec_mlp))
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(state_dict[name].shape)}, expected {shape}")


def _block_shapes(stack: str, depth: int, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i in range(depth):
        base = f"{stack}.{i}"
        shapes.update(
            {
                f"{base}.norm1.weight": (width,),
                f"{base}.norm1.bias": (width,),
                f"{base}.attn.qkv.weight": (3 * width, width),
                f"{base}.attn.qkv.bias": (3 * width,),
                f"{base}.attn.proj.weight": (width, width),
                f"{base}.attn.proj.bias": (width,),
                f"{base}.norm2.weight": (width,),
                f"{base}.norm2.bias": (width,),
                f"{base}.mlp.fc1.weight": (mlp, width),
                f"{base}.mlp.fc1.bias": (mlp,),
                f"{base}.mlp.fc2.weight": (width, mlp),
                f"{base}.mlp.fc2.bias": (width,),
            }
        )
    return shapes


def grid_side(num_patches: int, source: str) -> int:
    """The side of the square patch grid with ``num_patches`` positions; an error naming ``source`` if none."""
    side = math.isqrt(num_patches)
    if side * side != num_patches or side == 0:
        raise CheckpointError(f"{source}: pos_embed holds {num_patches} patch positions, not a square grid")
    return side
