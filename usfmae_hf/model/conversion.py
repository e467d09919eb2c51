"""Convert original MAE / USF-MAE checkpoints to Hugging Face model directories, and back.

``convert_checkpoint`` reads a checkpoint safely (:mod:`usfmae_hf.model.checkpoints`), infers a
``ViTMAEConfig`` from tensor shapes, builds the transformers model around the *same* tensors,
checks it number-for-number against :class:`~usfmae_hf.model.reference_mae.ReferenceMAE` (timm blocks)
on identical images and masking noise, and only then writes ``config.json``, ``model.safetensors``
(legacy key names, readable by transformers 4.x and 5.x), ``preprocessor_config.json`` and a model
card, atomically. ``export_original`` writes the original layout back (``qkv`` merged).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, PretrainedConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel, ViTModel

from usfmae_hf.atomic import atomic_directory, atomic_file, ensure_writable_output
from usfmae_hf.errors import CheckpointError, VerificationError
from usfmae_hf.image.processor import build_image_processor
from usfmae_hf.model.checkpoints import (
    OriginalCheckpoint,
    infer_vitmae_config_kwargs,
    load_original_checkpoint,
    validate_mae_state_dict,
)
from usfmae_hf.model.directory import encoder_config, model_type
from usfmae_hf.model.keys import current_to_legacy, current_to_original, is_decoder_key, original_to_current
from usfmae_hf.model.loading import quiet_loading_report
from usfmae_hf.model.reference_mae import ReferenceMAE
from usfmae_hf.version import __version__

logger = logging.getLogger(__name__)

CONVERTER_VERSION = f"usfmae-hf {__version__}"
PROVENANCE_KEY = "usfmae_provenance"  # config attribute holding where the weights came from
DEFAULT_ATOL = 1e-5  # fp32 parity bound for encoder output, decoder prediction and loss
OutputFormat = Literal["vitmae", "vit"]


@dataclass
class ConversionResult:
    output_dir: Path
    layout: str
    config: PretrainedConfig
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # empty when verification was skipped


def convert_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    output_format: OutputFormat = "vitmae",
    norm_pix_loss: bool = False,
    mask_ratio: float = 0.75,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    overwrite: bool = False,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
) -> ConversionResult:
    """Convert an original-layout MAE checkpoint into a Hugging Face model directory.

    Args:
        checkpoint_path: ``.pt``/``.pth`` (bare state dict, ``{"model": ...}``, or encoder-only) or ``.safetensors``.
        output_dir: directory to create; it appears only once complete.
        output_format: ``"vitmae"`` (``ViTMAEForPreTraining``, or ``ViTMAEModel`` for encoder-only
            input) or ``"vit"`` (encoder-only ``ViTModel`` with an identity pooler, see :func:`identity_pooler`).
        norm_pix_loss: whether the model was trained on per-patch normalised pixels (recorded in the
            config; it changes the loss and how reconstructions are shown). USF-MAE: ``False``.
        mask_ratio: masking ratio recorded in the config (pretraining default 0.75).
        num_attention_heads / decoder_num_attention_heads: override the head counts, which cannot
            be read off tensor shapes (defaults: standard ViT presets, 16 for the decoder).
        overwrite: replace an existing ``output_dir``.
        verify: compare with the independent reference implementation before writing.
        atol: largest accepted absolute difference in verification.

    Raises:
        CheckpointError: unreadable, unsafe or non-MAE input.
        VerificationError: the converted model does not reproduce the reference numbers.
        OutputExistsError: ``output_dir`` exists and ``overwrite`` is false.
    """
    output_dir = Path(output_dir)
    if output_format not in ("vitmae", "vit"):
        raise ValueError(f"output_format must be 'vitmae' or 'vit', got {output_format!r}")
    if not 0.0 < float(mask_ratio) < 1.0:
        raise CheckpointError(f"mask ratio must be in (0, 1), got {mask_ratio}")
    ensure_writable_output(output_dir, overwrite)

    checkpoint = load_original_checkpoint(checkpoint_path)
    source_dtypes = sorted({str(v.dtype) for v in checkpoint.state_dict.values() if v.is_floating_point()})
    if source_dtypes != ["torch.float32"]:
        # fp16 / bf16 / fp64 releases: verify and save in fp32 (the reference check runs in fp32).
        checkpoint.state_dict = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint.state_dict.items()}
    arch = infer_vitmae_config_kwargs(
        checkpoint, num_attention_heads=num_attention_heads, decoder_num_attention_heads=decoder_num_attention_heads
    )
    provenance = {
        "source_file": checkpoint.path.name,
        "source_sha256": checkpoint.sha256,
        "layout": checkpoint.layout,
        "converter_version": CONVERTER_VERSION,
        "format": output_format,
        "source_dtype": ", ".join(dtype.removeprefix("torch.") for dtype in source_dtypes),
        **{f"source_{key}": value for key, value in checkpoint.extra.items()},
    }
    config = _build_config(arch, output_format, checkpoint.has_decoder, norm_pix_loss, float(mask_ratio), provenance)
    model, prefix = _build_model_on_tensors(config, checkpoint, output_format)

    diffs: dict[str, float] = {}
    if verify:
        diffs = verify_against_reference(model, checkpoint, config, atol=atol)
    if not checkpoint.has_decoder and output_format == "vitmae":
        logger.warning(
            "%s is encoder-only: wrote an encoder-only ViTMAEModel directory "
            "(no decoder, so no reconstruction or continued pretraining).",
            checkpoint.path.name,
        )

    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        config.save_pretrained(staging)
        state_dict = model.state_dict()
        if output_format == "vit":
            state_dict |= identity_pooler(config.hidden_size)
        save_legacy_safetensors(state_dict, staging / "model.safetensors", prefix=prefix)
        build_image_processor(config.image_size).save_pretrained(staging)
        _write_card(staging, config, provenance)
    return ConversionResult(output_dir, checkpoint.layout, config, diffs)


def _build_config(
    arch: dict, output_format: str, has_decoder: bool, norm_pix_loss: bool, mask_ratio: float, provenance: dict
) -> PretrainedConfig:
    if output_format == "vit":
        # pooler_act "linear" + identity_pooler(): pooler_output is the CLS token after the final norm
        return encoder_config(
            ViTMAEConfig(**arch), architectures=["ViTModel"], pooler_act="linear", **{PROVENANCE_KEY: provenance}
        )
    architecture = "ViTMAEForPreTraining" if has_decoder else "ViTMAEModel"
    return ViTMAEConfig(
        **arch,
        norm_pix_loss=norm_pix_loss,
        mask_ratio=mask_ratio,
        architectures=[architecture],
        **{PROVENANCE_KEY: provenance},
    )


def identity_pooler(hidden_size: int) -> dict[str, torch.Tensor]:
    """Weights of a ``ViTPooler`` that passes the CLS token through unchanged (with ``pooler_act="linear"``).

    ``AutoModel`` builds ``ViTModel`` with a pooler; without stored weights it would be random and
    differ between loads. MAE has no pooler, so the encoder-only directory stores this identity one:
    ``pooler_output`` is then the CLS token after the final LayerNorm, the same on every load.
    """
    return {
        "pooler.dense.weight": torch.eye(hidden_size),
        "pooler.dense.bias": torch.zeros(hidden_size),
    }


def _build_model_on_tensors(config: PretrainedConfig, checkpoint: OriginalCheckpoint, output_format: str):
    """Instantiate the transformers model on the meta device and assign the checkpoint's tensors.

    Nothing is randomly initialised or copied (the q/k/v projections are views of ``qkv``), which
    keeps conversion fast and its memory near the checkpoint size. ``strict`` loading proves that
    the mapped names and shapes are exactly the model's.
    """
    state_dict = checkpoint.state_dict
    if output_format == "vit":
        state_dict = {k: v for k, v in state_dict.items() if not is_decoder_key(k)}
        model_cls, prefix, kwargs = ViTModel, "", {"add_pooling_layer": False}
    elif checkpoint.has_decoder:
        model_cls, prefix, kwargs = ViTMAEForPreTraining, "vit.", {}
    else:
        model_cls, prefix, kwargs = ViTMAEModel, "", {}
    with torch.device("meta"):
        model = model_cls(config, **kwargs)
    try:
        model.load_state_dict(original_to_current(state_dict, prefix), strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{checkpoint.path}: weights do not fit the inferred architecture: {str(error).splitlines()[0]}"
        ) from None
    return model.eval(), ("vit." if model_cls is ViTMAEForPreTraining else prefix)


@torch.no_grad()
def verify_against_reference(
    model: torch.nn.Module,
    checkpoint: OriginalCheckpoint,
    config: PretrainedConfig,
    *,
    atol: float = DEFAULT_ATOL,
    batch_size: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Run ``model`` and the timm-based reference on the same images and masking noise.

    Compares the encoder output with masking (the pretraining path) and without it (the feature
    path, patches in spatial order), the decoder's pixel prediction and the loss. Returns the
    largest absolute difference of each; raises :class:`VerificationError` above ``atol``.
    """
    reference = _reference_on_tensors(checkpoint, config)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size, generator=generator)
    num_patches = (config.image_size // config.patch_size) ** 2
    noise = torch.rand(batch_size, num_patches, generator=generator)
    in_order = torch.arange(num_patches, dtype=torch.float32).expand(batch_size, -1)

    diffs: dict[str, float] = {}
    # The unmasked pass costs 4x a masked one at ratio 0.75: one image is enough there.
    ref_unmasked, _, _ = reference.forward_encoder(images[:1], 0.0, in_order[:1])
    if isinstance(model, ViTModel):
        diffs["encoder_unmasked"] = _max_diff(model(pixel_values=images[:1]).last_hidden_state, ref_unmasked)
    else:
        encoder = model.vit if isinstance(model, ViTMAEForPreTraining) else model
        diffs["encoder_unmasked"] = _max_diff(_unmasked_vitmae_features(encoder, images[:1]), ref_unmasked)
        ref = reference(images, mask_ratio=config.mask_ratio, noise=noise)
        diffs["encoder_masked"] = _max_diff(encoder(pixel_values=images, noise=noise).last_hidden_state, ref.latent)
        if isinstance(model, ViTMAEForPreTraining):
            out = model(pixel_values=images, noise=noise)
            diffs["decoder_pred"] = _max_diff(out.logits, ref.pred)
            diffs["loss"] = _max_diff(out.loss, ref.loss)
            diffs["mask"] = _max_diff(out.mask, ref.mask)
    failed = {name: value for name, value in diffs.items() if not value <= atol}
    if failed:
        details = ", ".join(f"{name} {value:.3g}" for name, value in failed.items())
        raise VerificationError(
            f"converted model differs from the reference implementation beyond {atol:g}: {details}. "
            "This is a conversion bug or an unsupported architecture variant; nothing was written."
        )
    logger.info("verification passed: %s", ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    return diffs


def _unmasked_vitmae_features(encoder: ViTMAEModel, images: torch.Tensor) -> torch.Tensor:
    """ViTMAEModel output for all patches in spatial order (it masks even at inference)."""
    saved_ratio = encoder.config.mask_ratio
    encoder.config.mask_ratio = 0.0
    try:
        num_patches = encoder.embeddings.patch_embeddings.num_patches
        noise = torch.arange(num_patches, dtype=torch.float32).expand(images.shape[0], -1)
        return encoder(pixel_values=images, noise=noise).last_hidden_state
    finally:
        encoder.config.mask_ratio = saved_ratio


def _reference_on_tensors(checkpoint: OriginalCheckpoint, config: PretrainedConfig) -> ReferenceMAE:
    with_decoder = checkpoint.has_decoder and config.model_type == "vit_mae"
    with torch.device("meta"):
        reference = ReferenceMAE.from_hf_config_kwargs(config.to_dict(), encoder_only=not with_decoder)
    state_dict = {k: v for k, v in checkpoint.state_dict.items() if with_decoder or not is_decoder_key(k)}
    reference.load_state_dict(state_dict, strict=True, assign=True)
    return reference.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


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
    """``save_pretrained`` replacement for (ViT)MAE models: config + legacy-named safetensors (+ processor)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(output_dir)
    prefix = "vit." if isinstance(model, ViTMAEForPreTraining) else ""
    state_dict = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    save_legacy_safetensors(state_dict, output_dir / "model.safetensors", prefix=prefix)
    if image_processor is not None:
        image_processor.save_pretrained(output_dir)
    return output_dir


def _write_card(directory: Path, config: PretrainedConfig, provenance: dict) -> None:
    from usfmae_hf.publishing.cards import render_model_card

    kind = "pretrained" if "ViTMAEForPreTraining" in (config.architectures or []) else "encoder"
    render_model_card(kind, config=config, provenance=provenance).save(directory / "README.md")


def export_original(model_dir: str | os.PathLike, output_file: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a converted directory back as an original MAE state dict (``qkv`` merged), atomically.

    Only weights the directory actually holds are exported: a directory without decoder weights
    gives an encoder-only file. Converting the result again reproduces the directory's tensors.
    """
    model_dir, output_file = Path(model_dir), Path(output_file)
    ensure_writable_output(output_file, overwrite)  # checked before the (slow) model load, too
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{model_dir}: no model.safetensors (is this a converted model directory?)")
    with safe_open(weights, framework="pt") as handle:
        has_decoder = any(key.startswith("decoder.") for key in handle.keys())
    model_type(model_dir)  # a clear error for anything but a vit_mae or vit directory
    config = AutoConfig.from_pretrained(model_dir)
    if isinstance(config, ViTMAEConfig) and has_decoder:
        model, prefix = ViTMAEForPreTraining.from_pretrained(model_dir), "vit."
    elif isinstance(config, ViTMAEConfig):
        model, prefix = ViTMAEModel.from_pretrained(model_dir), ""
    else:
        with quiet_loading_report():  # the identity pooler is not part of the original layout
            model, prefix = ViTModel.from_pretrained(model_dir, add_pooling_layer=False), ""
    state_dict = current_to_original(model.state_dict(), prefix=prefix)
    validate_mae_state_dict(state_dict, encoder_only=not has_decoder, source=str(model_dir))
    # torch.save on a path names the zip archive's root folder after the (temporary, random) file
    # name; through a file object the root is always "archive", so the bytes are the same every run.
    with atomic_file(output_file, overwrite=overwrite) as tmp, open(tmp, "wb") as handle:
        torch.save(state_dict, handle)
    return output_file
