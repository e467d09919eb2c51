"""Convert original MAE / USF-MAE checkpoints to Hugging Face model directories, and back.

``convert_checkpoint`` reads a checkpoint safely (:mod:`usfmae_hf.model.checkpoints`), infers a
``ViTMAEConfig`` from tensor shapes, builds the transformers model around the *same* tensors,
checks it number-for-number against :class:`~usfmae_hf.model.reference_mae.ReferenceMAE` (timm blocks)
on identical images and masking noise, and only then writes ``config.json``, ``model.safetensors``
(legacy key names, readable by transformers 4.x and 5.x), ``preprocessor_config.json`` and a model
card, atomically. The checks (:mod:`usfmae_hf.model.verification`), the legacy-named weight files
(:mod:`usfmae_hf.model.saving`) and the way back to the original layout, ``export_original``
(:mod:`usfmae_hf.model.export`, ``qkv`` merged), live beside it; this module re-exports them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import PretrainedConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel, ViTModel

from usfmae_hf.atomic import atomic_directory, ensure_writable_output
from usfmae_hf.errors import CheckpointError
from usfmae_hf.failures import one_line
from usfmae_hf.image.processor import build_image_processor
from usfmae_hf.model.checkpoints import OriginalCheckpoint, infer_vitmae_config_kwargs, load_original_checkpoint
from usfmae_hf.model.directory import encoder_config
from usfmae_hf.model.export import export_original
from usfmae_hf.model.keys import is_decoder_key, original_to_current
from usfmae_hf.model.saving import recover_interrupted_output, save_legacy_safetensors, save_vitmae_pretrained
from usfmae_hf.model.verification import DEFAULT_ATOL, verify_against_reference
from usfmae_hf.precision import DTYPES
from usfmae_hf.publishing.cards import OFFICIAL_LICENSE, OFFICIAL_RELEASES, PROVENANCE_KEY
from usfmae_hf.version import __version__

__all__ = [
    "CONVERTER_VERSION",
    "DEFAULT_ATOL",
    "INPUT_CHANNELS",
    "STORAGE_DTYPES",
    "ConversionResult",
    "OutputFormat",
    "convert_checkpoint",
    "export_original",
    "identity_pooler",
    "recover_interrupted_output",
    "save_legacy_safetensors",
    "save_vitmae_pretrained",
    "verify_against_reference",
]

logger = logging.getLogger(__name__)

CONVERTER_VERSION = f"usfmae-hf {__version__}"
OutputFormat = Literal["vitmae", "vit"]
# Precision of the written weights: the source's own ("keep") or one of usfmae_hf.precision.DTYPES.
STORAGE_DTYPES: tuple[str, ...] = ("keep", "fp32", "fp16", "bf16")
# What the bundled image processor feeds a model: RGB, a grey frame copied to three channels (as USF-MAE).
INPUT_CHANNELS = 3


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
    declared_source: str | None = None,
    license: str | None = None,  # noqa: A002 - the Hub metadata field's name
    dtype: str = "fp32",
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
        declared_source: an id of :data:`~usfmae_hf.publishing.cards.OFFICIAL_RELEASES`: the user
            declares the file to be that official USF-MAE release. Recorded in the provenance; only
            then does the model card state what the paper says about the official checkpoints.
        license: Hub license id of the weights (default: the official releases' license for a
            declared release, else ``"unknown"`` on the card).
        dtype: precision of the written weights (config ``dtype``, which ``from_pretrained`` loads them
            in): ``"fp32"`` (default), ``"fp16"``, ``"bf16"``, or ``"keep"`` the source's (one floating
            dtype; fp16 / bf16 sources are then written bit for bit). Verification always runs in fp32.

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
    if declared_source is not None and declared_source not in OFFICIAL_RELEASES:
        raise CheckpointError(
            f"unknown official release {declared_source!r}; expected one of {', '.join(OFFICIAL_RELEASES)}"
        )
    recover_interrupted_output(output_dir)
    ensure_writable_output(output_dir, overwrite)

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")

    checkpoint = load_original_checkpoint(checkpoint_path)
    source_dtypes = sorted({str(v.dtype) for v in checkpoint.state_dict.values() if v.is_floating_point()})
    stored_dtype = _stored_dtype(dtype, source_dtypes, checkpoint.path)
    if source_dtypes != ["torch.float32"]:
        # fp16 / bf16 / fp64 releases: the reference check runs in fp32 (fp16 and bf16 widen exactly).
        checkpoint.state_dict = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint.state_dict.items()}
    arch = infer_vitmae_config_kwargs(
        checkpoint, num_attention_heads=num_attention_heads, decoder_num_attention_heads=decoder_num_attention_heads
    )
    if arch["num_channels"] != INPUT_CHANNELS:
        raise CheckpointError(
            f"{checkpoint.path}: the patch embedding takes {arch['num_channels']}-channel input, but usfmae-hf models "
            f"take {INPUT_CHANNELS}-channel RGB (grey frames copied to 3 channels, as in USF-MAE); not converted"
        )
    provenance = _provenance(checkpoint, output_format, source_dtypes, declared_source, license)
    provenance["dtype"] = str(stored_dtype).removeprefix("torch.")
    config = _build_config(arch, output_format, checkpoint.has_decoder, norm_pix_loss, float(mask_ratio), provenance)
    model, prefix = _build_model_on_tensors(config, checkpoint, output_format)

    diffs: dict[str, float] = {}
    if verify:
        diffs = verify_against_reference(model, checkpoint, config, atol=atol)
        provenance.update(verification="passed", verification_max_abs_diff=max(diffs.values()))
    else:
        provenance["verification"] = "skipped (--no-verify)"
    setattr(config, PROVENANCE_KEY, provenance)  # now with the verification's outcome
    config.dtype = stored_dtype
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
        state_dict = {key: value.to(stored_dtype) for key, value in state_dict.items()}
        save_legacy_safetensors(state_dict, staging / "model.safetensors", prefix=prefix)
        build_image_processor(config.image_size).save_pretrained(staging)
        _write_card(staging, config, provenance)
    return ConversionResult(output_dir, checkpoint.layout, config, diffs)


def _stored_dtype(choice: str, source_dtypes: list[str], source: Path) -> torch.dtype:
    """The dtype ``--dtype choice`` writes; ``keep`` needs a source with one floating dtype."""
    if choice != "keep":
        return DTYPES[choice]
    if len(source_dtypes) != 1:
        found = ", ".join(name.removeprefix("torch.") for name in source_dtypes) or "none"
        raise CheckpointError(
            f"{source}: --dtype keep needs one floating dtype in the checkpoint, found {found}; "
            "pass --dtype fp32, fp16 or bf16"
        )
    return getattr(torch, source_dtypes[0].removeprefix("torch."))


def _provenance(
    checkpoint: OriginalCheckpoint,
    output_format: str,
    source_dtypes: list[str],
    declared_source: str | None,
    license: str | None,  # noqa: A002
) -> dict:
    """What the converted directory records about its source (config ``usfmae_provenance``, model card)."""
    provenance = {
        "source_file": checkpoint.path.name,
        "source_sha256": checkpoint.sha256,
        "layout": checkpoint.layout,
        "converter_version": CONVERTER_VERSION,
        "format": output_format,
        "source_dtype": ", ".join(dtype.removeprefix("torch.") for dtype in source_dtypes),
        **{f"source_{key}": value for key, value in checkpoint.extra.items()},
    }
    if declared_source is not None:
        provenance["declared_source"] = declared_source
    license = license or (OFFICIAL_LICENSE if declared_source else None)
    if license:
        provenance["license"] = license
    return provenance


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
            f"{checkpoint.path}: weights do not fit the inferred architecture: {one_line(str(error))}"
        ) from None
    return model.eval(), ("vit." if model_cls is ViTMAEForPreTraining else prefix)


def _write_card(directory: Path, config: PretrainedConfig, provenance: dict) -> None:
    from usfmae_hf.publishing.cards import render_model_card

    kind = "pretrained" if "ViTMAEForPreTraining" in (config.architectures or []) else "encoder"
    render_model_card(kind, config=config, provenance=provenance).save(directory / "README.md")
