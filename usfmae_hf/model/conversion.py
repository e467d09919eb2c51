"""Convert original MAE / USF-MAE checkpoints to Hugging Face model directories, and back.

``convert_checkpoint`` reads a checkpoint safely (:mod:`usfmae_hf.model.checkpoints`), infers a
``ViTMAEConfig`` from tensor shapes, builds the transformers model around the *same* tensors,
checks it number-for-number against :class:`~usfmae_hf.model.reference_mae.ReferenceMAE` (timm blocks)
on identical images and masking noise, and only then writes ``config.json``, ``model.safetensors``
(legacy key names, readable by transformers 4.x and 5.x), ``preprocessor_config.json`` and a model
card, atomically. ``export_original`` writes the original layout back (``qkv`` merged).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
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
from usfmae_hf.precision import DTYPES
from usfmae_hf.publishing.cards import OFFICIAL_LICENSE, OFFICIAL_RELEASES, PROVENANCE_KEY
from usfmae_hf.version import __version__

logger = logging.getLogger(__name__)

CONVERTER_VERSION = f"usfmae-hf {__version__}"
DEFAULT_ATOL = 1e-5  # fp32 parity bound for encoder output, decoder prediction and loss
OutputFormat = Literal["vitmae", "vit"]
# Precision of the written weights: the source's own ("keep") or one of usfmae_hf.precision.DTYPES.
STORAGE_DTYPES: tuple[str, ...] = ("keep", "fp32", "fp16", "bf16")
# What the bundled image processor feeds a model: RGB, a grey frame copied to three channels (as USF-MAE).
INPUT_CHANNELS = 3
# The names usfmae_hf.atomic gives its staging (".tmp") and replaced (".old") outputs beside NAME:
# ".NAME." + tempfile's 8 random characters + suffix.
_LEFTOVER_SUFFIX = re.compile(r"[a-z0-9_]{8}\.(tmp|old)")


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


def _write_card(directory: Path, config: PretrainedConfig, provenance: dict) -> None:
    from usfmae_hf.publishing.cards import render_model_card

    kind = "pretrained" if "ViTMAEForPreTraining" in (config.architectures or []) else "encoder"
    render_model_card(kind, config=config, provenance=provenance).save(directory / "README.md")


def export_original(
    model_dir: str | os.PathLike,
    output_file: str | os.PathLike,
    *,
    overwrite: bool = False,
    encoder_only: bool = False,
) -> Path:
    """Write a converted directory back as an original MAE state dict (``qkv`` merged), atomically.

    Only weights the directory actually holds are exported: a directory without decoder weights
    gives an encoder-only file. Converting the result again reproduces the directory's tensors.

    Args:
        model_dir: a ``vit_mae`` or ``vit`` directory (as ``usfmae convert`` writes).
        output_file: the ``.pth`` file to write.
        overwrite: replace an existing ``output_file``.
        encoder_only: leave out the decoder and mask token. The file then holds exactly the keys of
            timm's ``VisionTransformer`` (``vit_base_patch16_224`` for USF-MAE's ViT-B), which loads it
            with ``strict=True`` when built with ``num_classes=0``: its output is the CLS token after
            the final LayerNorm, the features :func:`usfmae_hf.inference.extract_features` gives.
    """
    model_dir, output_file = Path(model_dir), Path(output_file)
    recover_interrupted_output(output_file)
    ensure_writable_output(output_file, overwrite)  # checked before the (slow) model load, too
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{model_dir}: no model.safetensors (is this a converted model directory?)")
    with safe_open(weights, framework="pt") as handle:
        has_decoder = not encoder_only and any(key.startswith("decoder.") for key in handle.keys())
    model_type(model_dir)  # a clear error for anything but a vit_mae or vit directory
    config = AutoConfig.from_pretrained(model_dir)
    if isinstance(config, ViTMAEConfig) and has_decoder:
        model_cls, prefix, kwargs = ViTMAEForPreTraining, "vit.", {}
    elif isinstance(config, ViTMAEConfig):
        model_cls, prefix, kwargs = ViTMAEModel, "", {}
    else:
        model_cls, prefix, kwargs = ViTModel, "", {"add_pooling_layer": False}
    # Decoder weights left unused by ViTMAEModel and the identity pooler of a vit directory are expected
    # leftovers (neither is part of the exported layout); a missing weight is an error, not a random init.
    with quiet_loading_report():
        model, info = model_cls.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        raise CheckpointError(f"{model_dir}: weights missing: {', '.join(sorted(info['missing_keys'])[:5])}")
    state_dict = current_to_original(model.state_dict(), prefix=prefix)
    validate_mae_state_dict(state_dict, encoder_only=not has_decoder, source=str(model_dir))
    # torch.save on a path names the zip archive's root folder after the (temporary, random) file
    # name; through a file object the root is always "archive", so the bytes are the same every run.
    with atomic_file(output_file, overwrite=overwrite) as tmp, open(tmp, "wb") as handle:
        torch.save(state_dict, handle)
    return output_file
