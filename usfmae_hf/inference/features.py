"""Deterministic inference with converted USF-MAE models: encoder features and MAE reconstructions.

``ViTMAEModel`` is a poor feature extractor: it masks at inference and, even with ``mask_ratio=0``,
returns the patch tokens shuffled (NOTES section 2). :func:`load_encoder` therefore loads the
encoder weights of either converted flavour (a ``vit_mae`` directory or a ``--format vit`` one) into
a plain ``ViTModel``: no masking, no shuffling, patch tokens in row-major spatial order, and the
same numbers on every call.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTModel

from usfmae_hf.atomic import atomic_write_bytes, atomic_write_text
from usfmae_hf.errors import OutputExistsError, UnreadableImageError, UsfmaeError
from usfmae_hf.image.processor import IMAGENET_MEAN, IMAGENET_STD, build_image_processor, load_image_processor
from usfmae_hf.io import expand_inputs, load_frames, load_image
from usfmae_hf.model.loading import quiet_loading_report

Pooling = Literal["cls", "mean", "patches"]
ImageLike = Image.Image | np.ndarray | str | os.PathLike
POOLINGS: tuple[str, ...] = ("cls", "mean", "patches")

# ViTMAEConfig fields that describe the encoder, i.e. what a ViTConfig needs to hold the same weights.
_ENCODER_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
)


def _place(model: torch.nn.Module, device: str | torch.device | None, dtype: torch.dtype | None) -> torch.nn.Module:
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def load_encoder(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> ViTModel:
    """Load the encoder of a converted USF-MAE directory as a ``ViTModel`` in eval mode.

    Args:
        path: a ``vit_mae`` directory (``ViTMAEForPreTraining`` weights; the decoder is not loaded) or
            an encoder-only ``vit`` directory written by ``usfmae convert --format vit``.
        device: where to put the model (default: CPU).
        dtype: parameter dtype (default: as stored, float32).

    Raises:
        UsfmaeError: ``path`` is not a converted ViT/ViTMAE directory or lacks encoder weights.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsfmaeError(f"{path}: not a model directory (no config.json)")
    if _model_type(path) == "vit":
        config = ViTConfig.from_pretrained(path)
    else:
        mae_config = ViTMAEConfig.from_pretrained(path)
        config = ViTConfig(**{name: getattr(mae_config, name) for name in _ENCODER_FIELDS})
    config._name_or_path = str(path)
    # The decoder weights of a vit_mae directory are expected leftovers: keep the load report quiet
    # and check the one thing that matters, that no encoder weight is missing.
    with quiet_loading_report():
        model, info = ViTModel.from_pretrained(path, config=config, add_pooling_layer=False, output_loading_info=True)
    if info["missing_keys"]:
        raise UsfmaeError(f"{path}: encoder weights missing: {', '.join(sorted(info['missing_keys'])[:5])}")
    return _place(model, device, dtype)


def _model_type(path: Path) -> str:
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in ("vit", "vit_mae"):
        raise UsfmaeError(f"{path}: model_type {model_type!r} is neither 'vit_mae' nor 'vit'")
    return model_type


def processor_for(model: torch.nn.Module):
    """The exact USF-MAE image processor of ``model``: the one saved beside it, else the default one."""
    source = getattr(model.config, "_name_or_path", "")
    if source and (Path(source) / "preprocessor_config.json").is_file():
        return load_image_processor(source)
    return build_image_processor(model.config.image_size)


def _as_image(item: ImageLike) -> Image.Image | np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    if isinstance(item, (Image.Image, np.ndarray)):
        return item
    raise TypeError(f"expected a PIL image, a numpy array or a file path, got {type(item).__name__}")


def _batches(
    images: ImageLike | Sequence[ImageLike] | torch.Tensor, batch_size: int, processor: Any
) -> Iterator[torch.Tensor]:
    """Yield ``pixel_values`` batches; a 4-D float tensor is taken as already preprocessed."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError("a tensor input must be preprocessed pixel_values of shape (batch, 3, height, width)")
        yield from images.split(batch_size)
        return
    if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim < 4):
        images = [images]
    batch: list[Image.Image | np.ndarray] = []
    for item in images:
        batch.append(_as_image(item))
        if len(batch) == batch_size:
            yield processor(batch, return_tensors="pt")["pixel_values"]
            batch = []
    if batch:
        yield processor(batch, return_tensors="pt")["pixel_values"]


def pool_tokens(hidden_states: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool the encoder's final (layer-normed) tokens: CLS token, mean of patch tokens, or all patch tokens."""
    if pooling == "cls":
        return hidden_states[:, 0]
    if pooling == "mean":
        return hidden_states[:, 1:].mean(dim=1)
    if pooling == "patches":
        return hidden_states[:, 1:]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


@torch.inference_mode()
def extract_features(
    encoder: ViTModel,
    images: ImageLike | Sequence[ImageLike] | Iterable[ImageLike] | torch.Tensor,
    pooling: Pooling = "cls",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    processor: Any = None,
) -> torch.Tensor:
    """Encode images with a USF-MAE encoder; the same inputs give the same features on every call.

    Args:
        encoder: a model from :func:`load_encoder` (any ``ViTModel`` works).
        images: one or several PIL images, uint8 ``(H, W[, C])`` arrays (or one ``(N, H, W, C)``
            array) or file paths (first frame of each file), or a float tensor of preprocessed
            ``pixel_values`` ``(B, 3, H, W)``, used as is.
        pooling: ``"cls"`` -> ``(N, D)`` CLS tokens; ``"mean"`` -> ``(N, D)`` mean of the patch tokens;
            ``"patches"`` -> ``(N, L, D)`` patch tokens in row-major spatial order. All after the
            encoder's final LayerNorm.
        batch_size: images per forward pass.
        device, dtype: move the encoder there first (default: leave it where it is).
        processor: image processor (default: the one saved beside the encoder, see :func:`processor_for`).

    Returns:
        float32 CPU tensor, one row per image, in input order.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    _place(encoder, device, dtype)
    processor = processor or processor_for(encoder)
    parameter = next(encoder.parameters())
    outputs = []
    for pixel_values in _batches(images, batch_size, processor):
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        hidden_states = encoder(pixel_values=pixel_values).last_hidden_state
        outputs.append(pool_tokens(hidden_states, pooling).float().cpu())
    if not outputs:
        raise ValueError("no images given")
    return torch.cat(outputs)


@dataclass(frozen=True)
class Reconstruction:
    """MAE reconstructions in pixel space: uint8 ``(B, H, W, 3)`` images and the ``(B, H, W)`` mask.

    Attributes:
        original: the preprocessed inputs, un-normalised (what the model saw).
        masked: the inputs with masked patches greyed out.
        reconstruction: the decoder's prediction for every patch.
        pasted: ``reconstruction`` on masked patches, ``original`` on visible ones.
        mask: True where a patch was masked.
    """

    original: np.ndarray
    masked: np.ndarray
    reconstruction: np.ndarray
    pasted: np.ndarray
    mask: np.ndarray


def _to_uint8_images(pixel_values: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _unnormalise_patches(model: ViTMAEForPreTraining, pixel_values: torch.Tensor, logits: torch.Tensor, mask):
    """Undo ``norm_pix_loss`` with the visible patches' statistics (per image), as the MAE demo does.

    Each target patch was normalised by its own mean and variance, which are unknown for masked
    patches; the mean over visible patches of those per-patch statistics stands in for them.
    """
    target = model.patchify(pixel_values)
    visible = (1 - mask).unsqueeze(-1)
    count = visible.sum(dim=1, keepdim=True)
    patch_mean = target.mean(dim=-1, keepdim=True)
    patch_std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    mean = (patch_mean * visible).sum(dim=1, keepdim=True) / count
    std = (patch_std * visible).sum(dim=1, keepdim=True) / count
    return logits * std + mean


@torch.inference_mode()
def reconstruct(
    model: ViTMAEForPreTraining | str | os.PathLike,
    images: ImageLike | Sequence[ImageLike] | torch.Tensor,
    mask_ratio: float = 0.75,
    seed: int = 0,
    output: str | os.PathLike | None = None,
    processor: Any = None,
) -> Reconstruction:
    """Mask ``mask_ratio`` of each image's patches (random, reproducible by ``seed``) and reconstruct them.

    Args:
        model: a ``ViTMAEForPreTraining`` or the path of a converted ``vit_mae`` directory.
        images: as for :func:`extract_features`.
        mask_ratio: fraction of patches hidden from the encoder, in ``[0, 1)``.
        seed: seed of the masking noise; the same seed masks the same patches.
        output: if given, write a PNG grid (one row per image: original, masked, reconstruction,
            reconstruction with the visible patches pasted back) there.
        processor: image processor (default: the model's, see :func:`processor_for`).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not isinstance(model, ViTMAEForPreTraining):
        model = _load_pretraining_model(Path(model))
    model.eval()
    processor = processor or processor_for(model)
    pixel_values = torch.cat(list(_batches(images, 64, processor)))
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    num_patches = model.vit.embeddings.patch_embeddings.num_patches
    noise = torch.rand(pixel_values.shape[0], num_patches, generator=torch.Generator().manual_seed(seed))
    saved_ratio = model.config.mask_ratio
    model.config.mask_ratio = float(mask_ratio)
    try:
        outputs = model(pixel_values=pixel_values, noise=noise.to(parameter.device))
    finally:
        model.config.mask_ratio = saved_ratio
    logits, mask = outputs.logits.float(), outputs.mask.float()
    pixel_values = pixel_values.float()
    if model.config.norm_pix_loss:
        logits = _unnormalise_patches(model, pixel_values, logits, mask)
    patch_mask = mask.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    image_mask = model.unpatchify(patch_mask)
    reconstructed = model.unpatchify(logits)
    grey = torch.zeros_like(pixel_values)  # 0 after normalisation = ImageNet mean grey
    result = Reconstruction(
        original=_to_uint8_images(pixel_values),
        masked=_to_uint8_images(torch.where(image_mask.bool(), grey, pixel_values)),
        reconstruction=_to_uint8_images(reconstructed),
        pasted=_to_uint8_images(torch.where(image_mask.bool(), reconstructed, pixel_values)),
        mask=image_mask[:, 0].bool().cpu().numpy(),
    )
    if output is not None:
        save_reconstruction_grid(result, output)
    return result


def _load_pretraining_model(path: Path) -> ViTMAEForPreTraining:
    if _model_type(path) != "vit_mae":
        raise UsfmaeError(f"{path}: reconstruction needs the MAE decoder; convert with --format vitmae")
    return ViTMAEForPreTraining.from_pretrained(path)


def save_reconstruction_grid(result: Reconstruction, output: str | os.PathLike) -> Path:
    """Write ``result`` as a PNG grid (rows: images; columns: original, masked, reconstruction, pasted)."""
    from matplotlib.figure import Figure  # no pyplot: leaves the user's matplotlib backend alone

    columns = ("original", "masked", "reconstruction", "reconstruction + visible")
    rows = len(result.original)
    figure = Figure(figsize=(12, 3 * rows))
    axes = figure.subplots(rows, 4, squeeze=False)
    for row in range(rows):
        panels = (result.original, result.masked, result.reconstruction, result.pasted)
        for column, (title, images) in enumerate(zip(columns, panels)):
            axes[row, column].imshow(images[row])
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    output = Path(output)
    atomic_write_bytes(output, buffer.getvalue())
    return output


# --- batch feature files (``usfmae features``) ---------------------------------------------------


@dataclass(frozen=True)
class FeatureRun:
    """What :func:`write_features` did.

    Attributes:
        output: the feature file written.
        rows: frames in it (one row per frame).
        files: input files that contributed rows.
        resumed_files: of those, files whose features came from an interrupted earlier run.
        skipped: one ``"path: reason"`` line per unreadable input file.
    """

    output: Path
    rows: int
    files: int
    resumed_files: int
    skipped: list[str]


class _Shards:
    """Feature rows of completed input files, saved in ``<output>.partial/`` so a rerun can resume.

    A shard is written only between input files and holds whole files, so every file it names is
    complete; a rerun with the same settings skips those files.
    """

    def __init__(self, directory: Path, settings: dict[str, Any]) -> None:
        self.directory = directory
        settings_file = directory / "settings.json"
        if settings_file.is_file():
            previous = json.loads(settings_file.read_text())
            if previous != settings:
                raise UsfmaeError(
                    f"{directory} holds an interrupted run with other settings ({previous}); "
                    "rerun with those settings or delete it"
                )
        else:
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(settings_file, json.dumps(settings, sort_keys=True))
        self.paths = sorted(directory.glob("shard-*.npz"))
        self.done: set[str] = set()
        for shard in self.paths:
            with np.load(shard) as data:
                self.done.update(data["paths"].tolist())

    def write(self, paths: list[str], frames: list[int], features: list[torch.Tensor]) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            paths=np.array(paths),
            frames=np.array(frames, dtype=np.int64),
            features=torch.stack(features).numpy(),
        )
        shard = self.directory / f"shard-{len(self.paths):06d}.npz"
        atomic_write_bytes(shard, buffer.getvalue())
        self.paths.append(shard)
        self.done.update(paths)

    def rows(self, order: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """All rows of files in ``order``, sorted by that order and then by frame index."""
        rank = {path: position for position, path in enumerate(order)}
        paths, frames, features = [], [], []
        for shard in self.paths:
            with np.load(shard) as data:
                keep = np.array([p in rank for p in data["paths"].tolist()], dtype=bool)
                paths.extend(data["paths"][keep].tolist())
                frames.append(data["frames"][keep])
                features.append(data["features"][keep])
        if not paths:
            return [], np.zeros(0, np.int64), np.zeros((0,), np.float32)
        frames_array = np.concatenate(frames)
        order_index = sorted(range(len(paths)), key=lambda i: (rank[paths[i]], frames_array[i]))
        return [paths[i] for i in order_index], frames_array[order_index], np.concatenate(features)[order_index]


def _write_feature_file(output: Path, paths: list[str], frames: np.ndarray, features: np.ndarray, meta: dict) -> None:
    """Write ``.parquet`` (columns path, frame, features) or ``.npy`` (+ ``.csv`` of path, frame per row)."""
    if output.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, features.astype(np.float32))
        rows = "path,frame\n" + "".join(f'"{p}",{f}\n' for p, f in zip(paths, frames.tolist()))
        atomic_write_text(output.with_suffix(".csv"), rows)
        atomic_write_bytes(output, buffer.getvalue())
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array(features.astype(np.float32).reshape(-1))
    for size in reversed(features.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    table = pa.table(
        {"path": pa.array(paths, pa.string()), "frame": pa.array(frames, pa.int32()), "features": values},
    ).replace_schema_metadata({"usfmae": json.dumps(meta)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(output, buffer.getvalue())


def write_features(
    inputs: Sequence[str | os.PathLike],
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    pooling: Pooling = "cls",
    batch_size: int = 32,
    frame_stride: int = 1,
    slice_stride: int = 1,
    axis: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_skip: Any = None,
    checkpoint_rows: int = 1024,
) -> FeatureRun:
    """Extract features of every frame of every input file into one ``.parquet`` or ``.npy`` file.

    Inputs are expanded by :func:`usfmae_hf.io.expand_inputs` (files, folders, globs; cines, volumes
    and videos give one row per kept frame). Unreadable files are reported through ``on_skip(message)``
    (default: a warning) and skipped. Progress is saved in ``<output>.partial/`` whenever at least
    ``checkpoint_rows`` rows of whole files are pending, so rerunning the same command after an interruption resumes;
    the output is written atomically at the end and the partial directory removed.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is false.
        UsfmaeError: no frame could be read from the inputs, or a partial run has other settings.
    """
    output = Path(output)
    if output.suffix not in (".parquet", ".npy"):
        raise UsfmaeError(f"{output}: the output must end in .parquet or .npy")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists (pass --overwrite to replace it)")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    report = on_skip or (lambda message: warnings.warn(f"skipped {message}", stacklevel=2))
    files = [str(path) for path in expand_inputs(inputs)]
    settings = {
        "model": str(Path(model).resolve()),
        "pooling": pooling,
        "frame_stride": frame_stride,
        "slice_stride": slice_stride,
        "axis": axis,
    }
    partial = output.with_name(output.name + ".partial")
    shards = _Shards(partial, settings)
    resumed = [path for path in files if path in shards.done]
    encoder = load_encoder(model, device=device, dtype=dtype)
    processor = processor_for(encoder)

    queue: list[tuple[str, int, np.ndarray]] = []  # frames waiting for a forward pass
    rows: list[tuple[str, int, torch.Tensor]] = []  # computed, not yet in a shard
    skipped: list[str] = []

    def run_queue() -> None:
        if queue:
            images = [image for _, _, image in queue]
            features = extract_features(encoder, images, pooling, len(queue), processor=processor)
            rows.extend((path, index, row) for (path, index, _), row in zip(queue, features))
            queue.clear()

    def write_shard() -> None:
        run_queue()
        if rows:
            shards.write([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
            rows.clear()

    bar = tqdm(files, desc="features", unit="file", disable=not progress)
    for path in bar:
        if path in shards.done:
            continue
        try:
            count = 0
            for frame in load_frames(path, frame_stride=frame_stride, slice_stride=slice_stride, axis=axis):
                queue.append((path, frame.index, frame.image))
                count += 1
                if len(queue) >= batch_size:
                    run_queue()
            if count == 0:
                raise UnreadableImageError(f"{path}: contains no frames")
        except UnreadableImageError as error:
            queue[:] = [item for item in queue if item[0] != path]
            rows[:] = [item for item in rows if item[0] != path]
            skipped.append(str(error))
            report(str(error))
            continue
        if len(rows) + len(queue) >= checkpoint_rows:
            write_shard()
    write_shard()
    bar.close()

    paths, frames, features = shards.rows(files)
    if not paths:
        shutil.rmtree(partial, ignore_errors=True)
        raise UsfmaeError(f"no frame could be read from {len(files)} input file(s)")
    meta = {**settings, "shape": list(features.shape), "encoder": "usfmae_hf.inference.features.load_encoder"}
    _write_feature_file(output, paths, frames, features, meta)
    shutil.rmtree(partial, ignore_errors=True)
    return FeatureRun(output, len(paths), len(set(paths)), len(resumed), skipped)
