"""Number-for-number verification of a converted model against the independent reference MAE.

:func:`verify_against_reference` runs a transformers model built on a checkpoint's tensors and
:class:`~usfmae_hf.model.reference_mae.ReferenceMAE` (timm blocks) on the same images and masking
noise; :func:`usfmae_hf.model.conversion.convert_checkpoint` writes nothing unless it passes.
"""

from __future__ import annotations

import logging

import torch
from transformers import PretrainedConfig, ViTMAEForPreTraining, ViTMAEModel, ViTModel

from usfmae_hf.errors import VerificationError
from usfmae_hf.model.checkpoints import OriginalCheckpoint
from usfmae_hf.model.keys import is_decoder_key
from usfmae_hf.model.reference_mae import ReferenceMAE

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-5  # fp32 parity bound for encoder output, decoder prediction and loss


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
