"""Attention maps of USF-MAE encoders: last-layer CLS attention per head, and attention rollout.

:func:`attention_maps` runs one image through the deterministic encoder of
:func:`~usfmae_hf.inference.features.load_encoder` (no masking, patch tokens in row-major order) with
``output_attentions=True``. That needs the eager attention implementation (SDPA, the default, returns
no attention weights), so :func:`eager_attention` switches the model to eager for that forward pass
only and restores its implementation afterwards. :func:`attention_rollout` is the rollout of Abnar &
Zuidema (2020), "Quantifying Attention Flow in Transformers"; :func:`save_attention_figure` and
:func:`save_attention_maps` write the results as a PNG and an ``.npz`` file.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedModel, ViTModel

from usfmae_hf.atomic import atomic_write_bytes
from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.inference.features import ImageLike, _batches, _place, load_encoder, processor_for
from usfmae_hf.inference.reconstruction import _to_uint8_images
from usfmae_hf.io import load_frames

HeadDisplay = Literal["all", "mean"]
HEAD_DISPLAYS: tuple[str, ...] = ("all", "mean")


@dataclass(frozen=True)
class AttentionMaps:
    """The attention of one image in an encoder (``T = 1 + grid_height * grid_width`` tokens, CLS first).

    Attributes:
        image: ``(H, W, 3)`` uint8, the preprocessed input un-normalised (what the model saw).
        attentions: ``(layers, heads, T, T)`` float32 softmax attention of every layer; each row
            (a query token's weights over all keys) sums to 1.
        rollout_matrix: ``(T, T)`` float32 attention rollout (see :func:`attention_rollout`); each row
            sums to 1.
        grid: ``(grid_height, grid_width)``, the patch grid.
    """

    image: np.ndarray
    attentions: np.ndarray
    rollout_matrix: np.ndarray
    grid: tuple[int, int]

    @property
    def heads(self) -> np.ndarray:
        """``(heads, grid_height, grid_width)``: the last layer's CLS -> patch attention of each head."""
        return self.attentions[-1, :, 0, 1:].reshape(-1, *self.grid)

    @property
    def head_mean(self) -> np.ndarray:
        """``(grid_height, grid_width)``: :attr:`heads` averaged over heads."""
        return self.heads.mean(axis=0)

    @property
    def rollout(self) -> np.ndarray:
        """``(grid_height, grid_width)``: the CLS row of :attr:`rollout_matrix`, patch columns only."""
        return self.rollout_matrix[0, 1:].reshape(self.grid)


@contextlib.contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Switch ``model`` to eager attention (which can return attention weights) inside the block.

    The model's previous ``attn_implementation`` (SDPA by default) is restored on exit, also after an
    exception, so every later forward pass runs as before.
    """
    saved = model.config._attn_implementation
    if saved == "eager":
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(saved)


def attention_rollout(attentions: np.ndarray, discard_ratio: float = 0.0) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) of ``(layers, heads, T, T)`` attention weights.

    For each layer, heads are averaged into ``A``; the residual connection is modelled as
    ``0.5 * A + 0.5 * I`` (the paper's choice), and each row is re-normalised to sum to 1 (a no-op
    up to rounding unless entries were discarded). The rollout multiplies these matrices through the
    layers, later layers on the left: ``R = A_L' @ ... @ A_1'``. ``R[i, j]`` is how much of token
    ``j``'s input reaches token ``i``'s output; row 0 is the CLS token's.

    Args:
        attentions: softmax attention weights, ``(layers, heads, T, T)``, token 0 being CLS.
        discard_ratio: not in the paper; like the option of common rollout code (e.g. jacobgil/vit-explain,
            which ranks the whole matrix at once rather than row by row): in each row of every
            head-averaged ``A``, the ``floor(discard_ratio * (T - 1))`` smallest entries of the patch
            columns (the CLS column is always kept) are set to 0 before the identity is added. ``0``
            (the default) is the plain rollout of the paper.

    Returns:
        ``(T, T)`` float64 rollout matrix whose rows sum to 1.
    """
    attentions = np.asarray(attentions, dtype=np.float64)
    if attentions.ndim != 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"attentions must have shape (layers, heads, T, T), got {attentions.shape}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    tokens = attentions.shape[-1]
    identity = np.eye(tokens)
    discard = int(discard_ratio * (tokens - 1))
    rollout = identity
    for layer in attentions.mean(axis=1):
        if discard:
            patches = layer[:, 1:]
            smallest = np.argsort(patches, axis=-1, kind="stable")[:, :discard]
            np.put_along_axis(patches, smallest, 0.0, axis=-1)
        residual = 0.5 * layer + 0.5 * identity
        residual /= residual.sum(axis=-1, keepdims=True)
        rollout = residual @ rollout
    return rollout


def _image_of(image: ImageLike, frame: int) -> Any:
    """The picture to encode: frame ``frame`` of a file, or the given PIL image / array itself."""
    if not isinstance(image, (str, os.PathLike)):
        return image
    frames = load_frames(image)
    try:
        for found in frames:
            if found.index == frame:
                return found.image
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()
    raise UnreadableImageError(f"{image}: has no frame {frame}")


@torch.inference_mode()
def attention_maps(
    model: ViTModel | str | os.PathLike,
    image: ImageLike,
    *,
    frame: int = 0,
    discard_ratio: float = 0.0,
    device: str | torch.device | None = None,
    processor: Any = None,
) -> AttentionMaps:
    """Per-layer, per-head attention of ``model`` on one image, and its attention rollout.

    The same image gives the same maps on every call (no masking, eval mode). Eager attention is used
    for this forward pass only (:func:`eager_attention`); the model keeps its implementation.

    Args:
        model: a ``ViTModel`` from :func:`~usfmae_hf.inference.features.load_encoder`, or the path of a
            converted directory (``vit_mae`` or ``vit`` format), loaded with it.
        image: a file any :func:`usfmae_hf.io.load_frames` reader accepts, a PIL image, or a uint8
            ``(H, W[, 3])`` array. Preprocessed with the model's USF-MAE image processor.
        frame: frame (cine, video) or slice (volume) index when ``image`` is a file.
        discard_ratio: see :func:`attention_rollout` (0: the paper's rollout).
        device: where to run (a path is loaded there; a model is moved there). Default: as it is / CPU.
        processor: image processor (default: the model's, see :func:`~usfmae_hf.inference.features.processor_for`).

    Raises:
        UsfmaeError: ``model`` is not a converted model directory.
        UnreadableImageError: the file cannot be read or has no frame ``frame``.
    """
    picture = _image_of(image, frame)  # before loading the model: a bad input fails fast
    if isinstance(model, (str, os.PathLike)):
        model = load_encoder(Path(model), device=device)
    elif isinstance(model, ViTModel):
        _place(model, device, None)
    else:
        raise TypeError(f"expected a ViTModel (see load_encoder) or a model directory, got {type(model).__name__}")
    processor = processor or processor_for(model)
    pixel_values = next(_batches(picture, 1, processor))
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    with eager_attention(model):
        outputs = model(pixel_values=pixel_values, output_attentions=True)
    if not outputs.attentions:
        raise UsfmaeError(f"{type(model).__name__} returned no attention weights with eager attention")
    attentions = torch.stack([layer[0] for layer in outputs.attentions]).float().cpu().numpy()
    patch_height, patch_width = model.embeddings.patch_embeddings.patch_size
    grid = (pixel_values.shape[-2] // patch_height, pixel_values.shape[-1] // patch_width)
    return AttentionMaps(
        image=_to_uint8_images(pixel_values)[0],
        attentions=attentions,
        rollout_matrix=attention_rollout(attentions, discard_ratio).astype(np.float32),
        grid=grid,
    )


def check_maps_path(output: str | os.PathLike) -> Path:
    """``output`` as a ``Path``; raises :class:`UsfmaeError` unless it ends in ``.npz``."""
    output = Path(output)
    if output.suffix != ".npz":
        raise UsfmaeError(f"{output}: the raw maps are written as .npz; give a file name ending in .npz")
    return output


def save_attention_maps(maps: AttentionMaps, output: str | os.PathLike) -> Path:
    """Write ``maps`` as an ``.npz`` file (atomically).

    Arrays: ``image``, ``attentions``, ``rollout_matrix`` (as in :class:`AttentionMaps`), and the derived
    ``heads`` ``(heads, gh, gw)``, ``head_mean`` and ``rollout`` ``(gh, gw)``.
    """
    output = check_maps_path(output)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        image=maps.image,
        attentions=maps.attentions,
        rollout_matrix=maps.rollout_matrix,
        heads=maps.heads,
        head_mean=maps.head_mean,
        rollout=maps.rollout,
    )
    atomic_write_bytes(output, buffer.getvalue())
    return output


def save_attention_figure(
    maps: AttentionMaps, output: str | os.PathLike, heads: HeadDisplay = "all", columns: int = 4
) -> Path:
    """Write a PNG: the scan, its last-layer CLS attention overlays and the rollout overlay.

    Args:
        maps: from :func:`attention_maps`.
        output: the PNG file (written atomically).
        heads: ``"all"``: one overlay per head of the last layer; ``"mean"``: one overlay of their mean.
        columns: panels per row.

    Each overlay is scaled to its own [min, max] for display and drawn bilinearly over the scan.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the user's matplotlib backend alone

    if heads not in HEAD_DISPLAYS:
        raise ValueError(f"heads must be one of {HEAD_DISPLAYS}, got {heads!r}")
    overlays = (
        [(f"last layer, head {index}", grid) for index, grid in enumerate(maps.heads)]
        if heads == "all"
        else [("last layer, mean of heads", maps.head_mean)]
    )
    overlays.append(("attention rollout", maps.rollout))
    panels = 1 + len(overlays)
    columns = min(columns, panels)
    rows = -(-panels // columns)
    figure = Figure(figsize=(3 * columns, 3.3 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    height, width = maps.image.shape[:2]
    axes[0].imshow(maps.image)
    axes[0].set_title("input")
    for axis, (title, grid) in zip(axes[1:], overlays):
        span = float(grid.max() - grid.min())
        scaled = (grid - grid.min()) / span if span > 0 else np.zeros_like(grid)
        axis.imshow(maps.image)
        axis.imshow(
            scaled, cmap="inferno", alpha=0.6, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="bilinear"
        )
        axis.set_title(title, fontsize=9)
    for axis in axes:
        axis.set_axis_off()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    output = Path(output)
    atomic_write_bytes(output, buffer.getvalue())
    return output
