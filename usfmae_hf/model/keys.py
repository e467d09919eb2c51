"""Weight-name mappings between the original MAE layout and transformers' ViT/ViTMAE layouts.

Three naming schemes meet here:

* **original** - Meta's MAE code (and USF-MAE): ``blocks.N.attn.qkv``, ``decoder_blocks.N...``; the
  attention input projection is one fused ``qkv`` matrix whose rows are ordered ``[q | k | v]``.
* **current** - transformers >= 5.9 module names: ``layers.N.attention.q_proj``, ``mlp.fc1``.
* **legacy** - the names on the Hub (``encoder.layer.N.attention.attention.query``,
  ``intermediate.dense``), which every transformers version reads. We always *write* legacy names,
  because 5.x ``save_pretrained`` mangles the ViTMAE decoder's names (``decoder.decoder_encoder.layer.N``),
  which 4.x then silently re-initialises.

The ``prefix`` argument is ``"vit."`` for ``ViTMAEModel``/``ViTMAEForPreTraining`` checkpoints and
``""`` for an encoder-only ``ViTModel`` directory.
"""

from __future__ import annotations

import re

import torch

# Inner block names: original -> current. Legacy names are derived by ``CURRENT_TO_LEGACY_INNER``.
_BLOCK_INNER = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_QKV_CURRENT = ("attention.q_proj", "attention.k_proj", "attention.v_proj")

CURRENT_TO_LEGACY_INNER = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "layernorm_before": "layernorm_before",
    "layernorm_after": "layernorm_after",
}

# Top-level (non-block) names: original -> current, without the encoder prefix for encoder names.
_ENCODER_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_DECODER_TOP = {
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}

#: original-layout names: the encoder's and the decoder's weights outside blocks, and the modules of a block
ORIGINAL_ENCODER_TOP = tuple(_ENCODER_TOP)
ORIGINAL_DECODER_TOP = tuple(_DECODER_TOP)
ORIGINAL_BLOCK_MODULES = (*_BLOCK_INNER, "attn.qkv")

_ORIGINAL_BLOCK = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
_CURRENT_BLOCK = re.compile(r"^(layers|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$")


def is_decoder_key(original_name: str) -> bool:
    """Whether an original-layout key belongs to the MAE decoder (or its mask token)."""
    return original_name.startswith("decoder") or original_name == "mask_token"


def original_to_current(state_dict: dict[str, torch.Tensor], prefix: str = "vit.") -> dict[str, torch.Tensor]:
    """Map an original MAE state dict to transformers >= 5.9 names, splitting each fused ``qkv``.

    The split tensors are views of the input (no copy). Keys that are not part of a ViT-MAE raise
    ``KeyError`` naming them; :mod:`usfmae_hf.model.checkpoints` validates before calling this.
    """
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name in _ENCODER_TOP:
            converted[prefix + _ENCODER_TOP[name]] = tensor
            continue
        if name in _DECODER_TOP:
            converted[_DECODER_TOP[name]] = tensor
            continue
        match = _ORIGINAL_BLOCK.match(name)
        if match is None:
            raise KeyError(name)
        stack, index, inner, kind = match.groups()
        container = f"{prefix}layers" if stack == "blocks" else "decoder.decoder_layers"
        base = f"{container}.{index}"
        if inner == "attn.qkv":
            for current_inner, part in zip(_QKV_CURRENT, tensor.chunk(3, dim=0)):
                converted[f"{base}.{current_inner}.{kind}"] = part
        elif inner in _BLOCK_INNER:
            converted[f"{base}.{_BLOCK_INNER[inner]}.{kind}"] = tensor
        else:
            raise KeyError(name)
    return converted


def current_to_original(state_dict: dict[str, torch.Tensor], prefix: str = "vit.") -> dict[str, torch.Tensor]:
    """Inverse of :func:`original_to_current`: merge q/k/v back into ``qkv`` (rows ``[q | k | v]``).

    Keys of heads or poolers (anything outside the MAE encoder/decoder) are ignored.
    """
    encoder_top = {prefix + current: original for original, current in _ENCODER_TOP.items()}
    decoder_top = {current: original for original, current in _DECODER_TOP.items()}
    inner_to_original = {current: original for original, current in _BLOCK_INNER.items()}
    original: dict[str, torch.Tensor] = {}
    qkv_parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        if name in encoder_top:
            original[encoder_top[name]] = tensor
            continue
        if name in decoder_top:
            original[decoder_top[name]] = tensor
            continue
        match = _CURRENT_BLOCK.match(name.removeprefix(prefix))
        if match is None:
            continue
        container, index, inner, kind = match.groups()
        stack = "blocks" if container == "layers" else "decoder_blocks"
        base = f"{stack}.{index}"
        if inner in _QKV_CURRENT:
            qkv_parts.setdefault(f"{base}.attn.qkv.{kind}", {})[inner] = tensor
        elif inner in inner_to_original:
            original[f"{base}.{inner_to_original[inner]}.{kind}"] = tensor
    for name, parts in qkv_parts.items():
        original[name] = torch.cat([parts[part] for part in _QKV_CURRENT], dim=0)
    return original


def current_to_legacy(state_dict: dict[str, torch.Tensor], prefix: str = "vit.") -> dict[str, torch.Tensor]:
    """Rename transformers >= 5.9 keys to the legacy Hub names that 4.x and 5.x both load."""
    legacy: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        match = _CURRENT_BLOCK.match(name.removeprefix(prefix))
        if match is None:
            legacy[name] = tensor
            continue
        container, index, inner, kind = match.groups()
        if container == "layers":
            base = f"{prefix}encoder.layer.{index}"
        else:
            base = f"decoder.decoder_layers.{index}"
        legacy[f"{base}.{CURRENT_TO_LEGACY_INNER[inner]}.{kind}"] = tensor
    return legacy
