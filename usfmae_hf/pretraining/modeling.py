"""Model, optimizer, step plan and learning-rate schedule for MAE pretraining.

A model either continues from a converted directory or starts from a config. A ``ViTMAEForPreTraining``
built from a config starts with all-zero position embeddings and tokens (transformers skips its
sin-cos init in that case), so :func:`initialize_like_mae` re-initialises every weight the way
Meta's MAE code does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.model.parameters import is_no_decay


def mae_sincos_position_table(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, ``(1 + grid_size**2, embed_dim)`` float64, zero row for CLS.

    transformers' table is ``[sin_h | cos_h | sin_w | cos_w]``; MAE's ``get_2d_sincos_pos_embed`` (and
    every MAE checkpoint) has the column half first, so the two halves are swapped, as
    ``ViTMAEEmbeddings.initialize_weights`` does.
    """
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {embed_dim}")
    table = build_2d_sinusoidal_position_embedding(
        height=grid_size, width=grid_size, embed_dim=embed_dim, cls_token=True, dtype=torch.float64
    )
    half = embed_dim // 2
    return torch.cat([table[:, half:], table[:, :half]], dim=1)


@torch.no_grad()
def initialize_like_mae(model: ViTMAEForPreTraining) -> None:
    """Initialise every weight of ``model`` as MAE's ``initialize_weights`` does.

    Sin-cos position embeddings (encoder and decoder), ``normal(0.02)`` CLS and mask tokens, Xavier
    uniform for linear layers and the flattened patch projection, zero biases, unit LayerNorms. The
    separate q/k/v projections are drawn with the bound of MAE's fused ``qkv`` matrix.
    """
    config = model.config
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.modules():  # after the loop above, which also visits the q/k/v layers
        if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj")):
            fused = torch.cat([module.q_proj.weight, module.k_proj.weight, module.v_proj.weight])
            nn.init.xavier_uniform_(fused)
            for part, projection in zip(fused.chunk(3), (module.q_proj, module.k_proj, module.v_proj)):
                projection.weight.copy_(part)
    embeddings = model.vit.embeddings
    projection = embeddings.patch_embeddings.projection
    nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
    nn.init.zeros_(projection.bias)
    grid_size = config.image_size // config.patch_size
    embeddings.position_embeddings.copy_(mae_sincos_position_table(config.hidden_size, grid_size)[None])
    model.decoder.decoder_pos_embed.copy_(mae_sincos_position_table(config.decoder_hidden_size, grid_size)[None])
    nn.init.normal_(embeddings.cls_token, std=config.initializer_range)
    nn.init.normal_(model.decoder.mask_token, std=config.initializer_range)


def build_model(
    *,
    model_name_or_path: str | os.PathLike | None,
    config_name: str | os.PathLike | None,
    mask_ratio: float | None = None,
    norm_pix_loss: bool | None = None,
) -> ViTMAEForPreTraining:
    """Continue from a converted model directory, or build a fresh MAE from a config file or folder.

    ``mask_ratio`` and ``norm_pix_loss``, when given, override the config and are recorded in it. Weights are
    loaded in fp32 whatever the directory stores (transformers 5 would keep a bf16 or fp16 directory's dtype,
    and the run would keep its master weights in it); autocast chooses the compute precision. The fixed
    sin-cos position tables stay frozen (:func:`freeze_as_defined`).
    """
    if (model_name_or_path is None) == (config_name is None):
        raise UsfmaeError("give exactly one of --model_name_or_path (continue) or --config_name (from scratch)")
    overrides = {}
    if mask_ratio is not None:
        if not 0.0 < mask_ratio < 1.0:
            raise UsfmaeError(f"--mask_ratio must be in (0, 1), got {mask_ratio}")
        overrides["mask_ratio"] = float(mask_ratio)
    if norm_pix_loss is not None:
        overrides["norm_pix_loss"] = bool(norm_pix_loss)
    if model_name_or_path is not None:
        config = ViTMAEConfig.from_pretrained(model_name_or_path, **overrides)
        if "decoder" not in _weight_names(model_name_or_path):
            raise UsfmaeError(f"{model_name_or_path}: has no decoder weights; pretraining needs a full ViTMAE model")
        model = ViTMAEForPreTraining.from_pretrained(model_name_or_path, config=config, dtype=torch.float32)
        freeze_as_defined(model)
        return model
    path = Path(config_name)
    if not path.exists():
        raise UsfmaeError(f"{path}: no such config file or folder")
    config = ViTMAEConfig.from_pretrained(path) if path.is_dir() else ViTMAEConfig.from_json_file(path)
    for key, value in overrides.items():
        setattr(config, key, value)
    config.architectures = ["ViTMAEForPreTraining"]
    model = ViTMAEForPreTraining(config)
    initialize_like_mae(model)
    return model


def freeze_as_defined(model: nn.Module) -> None:
    """Give every parameter of a loaded model the ``requires_grad`` its class defines.

    transformers 5's ``from_pretrained`` (seen on 5.24) returns every parameter trainable, ViTMAE's fixed
    sin-cos position tables included (``requires_grad=False`` in the class, as ``pos_embed`` in MAE's
    code): AdamW would then move them, by their gradients and, under USF-MAE's decay on everything, by decay.
    """
    with torch.device("meta"):  # the class's parameters without memory or initialisation cost
        defined = dict(type(model)(model.config).named_parameters())
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(defined[name].requires_grad)


def _weight_names(model_dir: str | os.PathLike) -> str:
    """All weight names of a model directory joined in one string (for a cheap "decoder" check)."""
    from safetensors import safe_open

    weights = Path(model_dir) / "model.safetensors"
    if not weights.is_file():
        raise UsfmaeError(f"{model_dir}: no model.safetensors (is this a converted model directory?)")
    with safe_open(weights, framework="pt") as handle:
        return " ".join(handle.keys())


def parameter_groups(model: nn.Module, weight_decay: float, *, decay_all: bool = False) -> list[dict]:
    """AdamW parameter groups of the trained parameters (frozen ones left out: they never get a gradient).

    MAE (``decay_all`` false): ``weight_decay`` on weight matrices only; biases, norm weights (all 1-D
    tensors), position embeddings and CLS / mask tokens get none (:func:`usfmae_hf.model.parameters.is_no_decay`).
    USF-MAE (``decay_all``): one group, ``weight_decay`` on all of them, as ``AdamW(model.parameters())``.
    """
    trained = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    if decay_all:
        return [{"params": [parameter for _, parameter in trained], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, parameter in trained:
        (no_decay if is_no_decay(name, parameter) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    fused: bool,
    decay_all: bool = False,
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; ``fused`` selects torch's one-kernel implementation.

    On CPU torch otherwise runs its per-tensor loop, which read and wrote each of ViT-B's 112 M parameters
    and moments in eight separate passes: the optimizer step took a third of a training step.
    """
    return torch.optim.AdamW(
        parameter_groups(model, weight_decay, decay_all=decay_all),
        lr=lr,
        betas=betas,
        eps=eps,
        **({"fused": True} if fused else {}),
    )


def fused_adamw_supported(device: torch.device, distributed_type: str) -> bool:
    """Whether the fused AdamW kernel applies: plain or DDP training of fp32 weights on a CPU or CUDA device.

    FSDP and DeepSpeed hand the optimizer sharded or flattened parameters; they keep torch's default.
    """
    return device.type in ("cpu", "cuda") and distributed_type in ("NO", "MULTI_CPU", "MULTI_GPU")


def scaled_learning_rate(base_learning_rate: float, batch_size: int) -> float:
    """The linear scaling rule ``lr = blr * batch_size / 256``: MAE's with the effective batch, USF-MAE's with 128."""
    return base_learning_rate * batch_size / 256


def peak_learning_rate(learning_rate: float | None, base_learning_rate: float, batch_size: int) -> float:
    """``learning_rate`` if given, else the linear scaling rule on ``base_learning_rate`` and ``batch_size``."""
    if learning_rate is not None:
        return learning_rate
    return scaled_learning_rate(base_learning_rate, batch_size)


@dataclass(frozen=True)
class Plan:
    """The numbers a run's schedule is fixed by."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    effective_batch_size: int


def make_plan(
    *,
    max_steps: int | None,
    num_train_epochs: float,
    micro_batches_per_epoch: int,
    gradient_accumulation_steps: int,
    warmup_steps: int | None,
    warmup_ratio: float,
    peak_lr: float,
    min_lr: float,
    effective_batch_size: int,
    warmup_rounding: Callable[[float], int] = round,
) -> Plan:
    """Total and warmup optimizer steps (``max_steps``, else epochs x optimizer steps per epoch).

    ``warmup_rounding`` turns ``warmup_ratio * total`` into steps (``math.floor`` for USF-MAE's ``int()``).
    """
    if max_steps is not None:
        total = max_steps
    else:
        steps_per_epoch = math.ceil(micro_batches_per_epoch / gradient_accumulation_steps)
        total = max(1, math.ceil(num_train_epochs * steps_per_epoch))
    warmup = warmup_steps if warmup_steps is not None else warmup_rounding(warmup_ratio * total)
    return Plan(
        total_steps=total,
        warmup_steps=min(warmup, total),
        peak_lr=peak_lr,
        min_lr=min_lr,
        effective_batch_size=effective_batch_size,
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, minimum: float, warmup_steps: int, total_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step schedule: linear warmup from 0 to the optimizer's lr, then cosine to ``minimum``.

    transformers' ``cosine_with_min_lr`` schedule; stepped once per optimizer step, its value at step
    ``s`` (updates already taken) is MAE's per-iteration ``adjust_learning_rate`` at fractional epoch
    ``s / steps_per_epoch`` when warmup is ``warmup_epochs * steps_per_epoch`` steps. Every parameter
    group's lr is multiplied by the same factor, and ``minimum`` is an absolute floor for the
    optimizer's default lr. ``start_step`` positions a resumed run's schedule: the schedule is a
    function of the step alone, so no scheduler state needs to be saved or loaded.
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    peak = optimizer.defaults["lr"]
    if peak <= 0:
        raise UsfmaeError(f"the peak learning rate must be positive, got {peak}")
    for group in optimizer.param_groups:  # the schedule scales from the peak, whatever a loaded state holds
        group["initial_lr"] = peak
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        min_lr=minimum,
        last_epoch=start_step - 1,
    )
