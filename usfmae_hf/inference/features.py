"""Deterministic encoder features from converted USF-MAE models.

``ViTMAEModel`` is a poor feature extractor: it masks at inference and, even with ``mask_ratio=0``,
returns the patch tokens shuffled, because its embeddings always run random masking, which reorders
the kept tokens by random noise. :func:`load_encoder` therefore loads the encoder weights of either
converted flavour (a ``vit_mae`` directory or a ``--format vit`` one) into a plain ``ViTModel``: no
masking, no shuffling, patch tokens in row-major spatial order, and the same numbers on every call.

:func:`extract_features` runs the encoder through :class:`_FastViT`, an inference-only forward pass over the
``ViTModel``'s own weights that does the same arithmetic with fewer memory passes: the q/k/v projections (one
matrix product over their stacked weights) and the MLP's 3072-wide activation go into work buffers reused from
batch to batch (a fresh 39 MB tensor costs a page-faulted allocation every time), GELU runs in place, the
residual adds accumulate inside the matrix products, and with ``pooling="cls"`` the last block runs for the CLS
token only (the other tokens' last-block outputs are never read). In bfloat16 on an x86 CPU with oneDNN bf16
support (AMX, AVX-512 BF16), and in float32 on an AMD CPU with AVX-512 (where oneDNN's matrix products beat
MKL's), the linear layers use oneDNN with pre-packed weights and GELU and residual adds fused into the
matrix products. In bfloat16 or float16 the residual stream, the final LayerNorm and the output stay float32
(the stock forward of a bf16 encoder rounds them all; the residual adds are then not fused). Measured against
fp32 on the real pydicom-data frames, each feature's bf16 error relative to how much that feature varies
between frames (what a linear probe on standardised features sees; a cosine to fp32 of 0.99998 hides it)
halves: ViT-B/16 (random weights, mean pooling) from 0.114 to 0.040 (median over features), a small MAE
pretrained by the quickstart (CLS) from 0.137 to 0.062; it costs 5-8% of the bf16 speed (AMD EPYC with
AVX-512 BF16, 2 threads). ``fast=False`` runs the stock ``ViTModel`` forward; in fp32 both agree within float
rounding (ViT-B/16: max abs difference about 5e-6). Any ``ViTModel`` that is not the plain one (other
activation, patched or hooked modules, e.g. LoRA; autocast) takes the stock forward. ``torch.compile``
(inductor, also with freezing or max-autotune) was no faster than this on CPU and took 2 to 4.5 minutes to
compile ViT-B on 2 cores; ONNX Runtime 1.32 (CPU, 2 threads, with its transformer fusions) ran the exported
``ViTModel`` at 0.85x timm's fp32 ``forward_features``, where this ran at 1.08x in the same rounds.

The private helpers here (:func:`_place`, :func:`_batches`) are shared with
:mod:`usfmae_hf.inference.reconstruction` and :mod:`usfmae_hf.inference.feature_files`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, ViTMAEConfig, ViTModel
from transformers.activations import GELUActivation
from transformers.models.vit.modeling_vit import ViTAttention, ViTEmbeddings, ViTLayer, ViTMLP, ViTPatchEmbeddings

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.image.processor import build_image_processor, load_image_processor
from usfmae_hf.io import load_image
from usfmae_hf.model.directory import encoder_config, model_type
from usfmae_hf.model.loading import quiet_loading_report
from usfmae_hf.precision import cpu_flags, cpu_vendor, resolve_dtype

Pooling = Literal["cls", "mean", "patches"]
ImageLike = Image.Image | np.ndarray | str | os.PathLike
POOLINGS: tuple[str, ...] = ("cls", "mean", "patches")


def _place(
    model: torch.nn.Module, device: str | torch.device | None, dtype: torch.dtype | str | None
) -> torch.nn.Module:
    """Move ``model`` to ``device`` and ``dtype`` (a name such as ``"auto"`` is resolved for that device)."""
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device or next(model.parameters()).device)
    if device is not None or dtype is not None:
        # Also when called under inference mode (extract_features): the weights stay ordinary tensors, which
        # can be trained later and whose in-place changes the fused forward can see.
        with torch.inference_mode(False):
            model.to(device=device, dtype=dtype)
    return model.eval()


def load_encoder(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> ViTModel:
    """Load the encoder of a converted USF-MAE directory as a ``ViTModel`` in eval mode.

    Args:
        path: a ``vit_mae`` directory (``ViTMAEForPreTraining`` weights; the decoder is not loaded) or
            an encoder-only ``vit`` directory written by ``usfmae convert --format vit``.
        device: where to put the model (default: CPU).
        dtype: parameter dtype (default: as stored, float32): a torch dtype or a precision name
            (``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``; see :mod:`usfmae_hf.precision`).

    Raises:
        UsfmaeError: ``path`` is not a converted ViT/ViTMAE directory or lacks encoder weights.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UsfmaeError(f"{path}: not a model directory (no config.json)")
    model_type(path)  # a clear error for anything but a vit_mae or vit directory
    config = AutoConfig.from_pretrained(path)
    if isinstance(config, ViTMAEConfig):
        config = encoder_config(config)
    config._name_or_path = str(path)
    # The decoder weights of a vit_mae directory are expected leftovers: keep the load report quiet
    # and check the one thing that matters, that no encoder weight is missing.
    with quiet_loading_report():
        model, info = ViTModel.from_pretrained(path, config=config, add_pooling_layer=False, output_loading_info=True)
    if info["missing_keys"]:
        raise UsfmaeError(f"{path}: encoder weights missing: {', '.join(sorted(info['missing_keys'])[:5])}")
    return _place(model, device, dtype)


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


# Module types the fast path reproduces exactly; anything else in the encoder takes the stock forward.
_PLAIN_MODULES = (
    ViTEmbeddings,
    ViTPatchEmbeddings,
    ViTLayer,
    ViTAttention,
    ViTMLP,
    GELUActivation,
    torch.nn.Linear,
    torch.nn.LayerNorm,
    torch.nn.Dropout,
    torch.nn.Conv2d,
    torch.nn.ModuleList,
)


def fast_path_blocker(encoder: torch.nn.Module) -> str | None:
    """Why :func:`extract_features` must run ``encoder``'s stock forward, or ``None`` if the fast one applies."""
    if type(encoder) is not ViTModel:
        return f"{type(encoder).__name__} is not a plain ViTModel"
    if encoder.training:
        return "the encoder is in training mode"
    if torch.is_autocast_enabled(encoder.layernorm.weight.device.type):
        return "autocast is on (its casts are the stock forward's)"
    if encoder.config.hidden_act != "gelu":
        return f"activation {encoder.config.hidden_act!r} is not 'gelu'"
    global_hooks = torch.nn.modules.module._global_forward_hooks, torch.nn.modules.module._global_forward_pre_hooks
    if any(global_hooks):
        return "global module hooks are registered"
    modules = [encoder.layernorm, *encoder.layers.modules()]
    for module in modules:
        if type(module) not in _PLAIN_MODULES:
            return f"{type(module).__name__} in the encoder layers"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"a hook on {type(module).__name__}"
    if any(layer.mlp.activation_fn.act is not torch.nn.functional.gelu for layer in encoder.layers):
        return "GELU is not torch's exact GELU"
    return None


def _onednn_linear(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the linear layers run on oneDNN with pre-packed weights here rather than on ``torch.mm``.

    bf16 where oneDNN runs it natively (x86 CPUs with AMX or AVX-512 BF16). fp32 on AMD CPUs with AVX-512,
    where oneDNN's GEMMs beat the MKL ones ``torch.mm`` calls: measured on an AMD EPYC (2 threads), 8-25% per
    ViT-B GEMM and 1.10x for the whole forward. Other CPUs keep MKL for fp32 (on an Intel Xeon it ran the
    fused forward at 1.08-1.24x timm; oneDNN fp32 was not measured there).
    """
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        amd_avx512 = cpu_vendor() == "AuthenticAMD" and "avx512f" in (cpu_flags() or ())
        return amd_avx512 and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    try:  # private oneDNN ops (the ones inductor uses); absent or failing in some builds: take the plain ops
        return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def linear_backend(encoder: ViTModel) -> str:
    """What runs the fused forward's linear layers for ``encoder`` as it is placed now: ``"oneDNN, pre-packed
    weights"`` or ``"torch.mm"`` (MKL on x86 builds); benchmarks print it beside their figures."""
    weight = encoder.layernorm.weight
    return "oneDNN, pre-packed weights" if _onednn_linear(weight.device, weight.dtype) else "torch.mm"


_Weights = tuple[torch.Tensor, torch.Tensor | None]  # (weight, transposed or packed; bias)
_Norm = tuple[tuple[int, ...], torch.Tensor, torch.Tensor, float]  # layer_norm's arguments after the input
_Layer = tuple[list[_Weights], list[_Norm]]  # (qkv, o, fc1, fc2), (norm before, norm after)


class _FastViT:
    """The encoder blocks and final LayerNorm of a plain ``ViTModel``, for inference (see the module docstring).

    Holds only tensors (views of the encoder's parameters or, on the oneDNN path, packed copies), so caching
    one per encoder in a weak dictionary does not keep the encoder alive; it goes with the encoder, and is
    rebuilt on the next call after the encoder's weights moved or changed (until then it holds the old ones).
    Work buffers (about 140 MB for ViT-B at batch 32) are per thread, so threads may share an encoder.
    """

    def __init__(self, encoder: ViTModel):
        weight = encoder.layernorm.weight
        self.packed = _onednn_linear(weight.device, weight.dtype)
        # A bf16 or fp16 encoder keeps its residual stream, the final LayerNorm and the output in fp32: the
        # matrix products, attention and the blocks' LayerNorms (of the rounded residual) run in the reduced one.
        self.compute_dtype = weight.dtype
        self.residual_dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        # Views of the parameters this was built from: they keep those storages alive, so a changed key
        # (storage address, in-place version) reliably means the encoder's weights moved or changed.
        self.sources = [p.detach() for p in _weight_parameters(encoder)]
        self.key = _weights_key(self.sources)
        self.heads = encoder.config.num_attention_heads
        self.layers: list[_Layer] = []
        for layer in encoder.layers:
            attention, mlp = layer.attention, layer.mlp
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            qkv = self._weights(*self._stacked(projections))
            weights = [
                qkv,
                *(self._weights(linear.weight, linear.bias) for linear in (attention.o_proj, mlp.fc1, mlp.fc2)),
            ]
            norms = (layer.layernorm_before, layer.layernorm_after)
            self.layers.append((weights, [self._norm(n) for n in norms]))
        self.final_norm = self._norm(encoder.layernorm, self.residual_dtype)
        self.local = threading.local()

    @staticmethod
    def _stacked(linears: Sequence[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One weight and bias for the q, k and v projections: a single wider matrix product instead of three."""
        weight = torch.cat([linear.weight.detach() for linear in linears])
        if all(linear.bias is None for linear in linears):
            return weight, None
        biases = [torch.zeros_like(lin.weight[:, 0]) if lin.bias is None else lin.bias.detach() for lin in linears]
        return weight, torch.cat(biases)

    def _weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> _Weights:
        weight, bias = weight.detach(), None if bias is None else bias.detach()
        if self.packed:
            return torch.ops.mkldnn._reorder_linear_weight(weight), bias
        return weight.t(), bias

    @staticmethod
    def _norm(norm: torch.nn.LayerNorm, dtype: torch.dtype | None = None) -> _Norm:
        weight, bias = (parameter.detach().to(dtype) for parameter in (norm.weight, norm.bias))
        return tuple(norm.normalized_shape), weight, bias, norm.eps

    def _buffer(self, name: str, rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
        flat = getattr(self.local, name, None)
        if flat is None or flat.numel() < rows * columns or flat.dtype != like.dtype or flat.device != like.device:
            flat = torch.empty(rows * columns, dtype=like.dtype, device=like.device)
            setattr(self.local, name, flat)
        return flat[: rows * columns].view(rows, columns)

    def _linear(
        self, x: torch.Tensor, weights: _Weights, out: torch.Tensor | None = None, gelu: bool = False
    ) -> torch.Tensor:
        weight, bias = weights
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")
        out = torch.mm(x, weight, out=out) if bias is None else torch.addmm(bias, x, weight, out=out)
        return torch.ops.aten.gelu_(out) if gelu else out

    def _linear_add(self, x: torch.Tensor, weights: _Weights, residual: torch.Tensor) -> torch.Tensor:
        """``residual + linear(x)``; overwrites ``residual``, except on oneDNN when both have one precision."""
        if residual.dtype != x.dtype:  # an fp32 residual stream
            rows, width = residual.shape
            return residual.add_(
                self._linear(x, weights, out=None if self.packed else self._buffer("add", rows, width, x))
            )
        weight, bias = weights
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        residual.addmm_(x, weight)
        return residual if bias is None else residual.add_(bias)

    def _block(self, hidden: torch.Tensor, layer: _Layer, batch: int, cls_only: bool) -> torch.Tensor:
        (qkv, o, fc1, fc2), (norm_before, norm_after) = layer
        rows, width = hidden.shape
        tokens, heads = rows // batch, self.heads
        normed = torch.nn.functional.layer_norm(hidden.to(self.compute_dtype), *norm_before)
        projected = self._linear(normed, qkv, out=None if self.packed else self._buffer("qkv", rows, 3 * width, normed))
        queries, keys, values = projected.view(batch, tokens, 3 * width).split(width, dim=-1)
        if cls_only:  # the queries, and everything after attention, of the CLS token only
            hidden = hidden.view(batch, tokens, width)[:, 0].clone()
            queries = queries[:, :1]

        def split(states):  # (batch, count, width) -> (batch, heads, count, head width)
            return states.unflatten(-1, (heads, width // heads)).transpose(1, 2)

        attended = torch.nn.functional.scaled_dot_product_attention(split(queries), split(keys), split(values))
        hidden = self._linear_add(attended.transpose(1, 2).reshape(-1, width), o, hidden)
        normed = torch.nn.functional.layer_norm(hidden.to(self.compute_dtype), *norm_after)
        out = None if self.packed else self._buffer("mlp", len(normed), fc1[0].shape[1], normed)
        return self._linear_add(self._linear(normed, fc1, out=out, gelu=True), fc2, hidden)

    def __call__(self, embeddings: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """The final hidden states ``(batch, tokens, width)`` (``tokens`` is 1, the CLS token, if ``cls_only``), in
        :attr:`residual_dtype`."""
        batch, tokens, width = embeddings.shape
        hidden = embeddings.reshape(batch * tokens, width).to(self.residual_dtype)
        for index, layer in enumerate(self.layers):
            hidden = self._block(hidden, layer, batch, cls_only and index == len(self.layers) - 1)
        return torch.nn.functional.layer_norm(hidden, *self.final_norm).view(batch, -1, width)


_FAST: weakref.WeakKeyDictionary[ViTModel, _FastViT] = weakref.WeakKeyDictionary()


def _weight_parameters(encoder: ViTModel) -> list[torch.Tensor]:
    return [*encoder.layers.parameters(), *encoder.layernorm.parameters()]


def _weights_key(parameters: Iterable[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    # Inference tensors have no version counter (and can only change in place under inference mode).
    return tuple((p.data_ptr(), -1 if p.is_inference() else p._version) for p in parameters)


def _fast_vit(encoder: ViTModel) -> _FastViT:
    """The cached :class:`_FastViT` of ``encoder``, rebuilt when its weights moved (device, dtype) or changed."""
    fast = _FAST.get(encoder)
    if fast is None or fast.key != _weights_key(_weight_parameters(encoder)):
        fast = _FAST[encoder] = _FastViT(encoder)
    return fast


@torch.inference_mode()
def extract_features(
    encoder: ViTModel,
    images: ImageLike | Sequence[ImageLike] | Iterable[ImageLike] | torch.Tensor,
    pooling: Pooling = "cls",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    processor: Any = None,
    fast: bool = True,
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
        device, dtype: move the encoder there first (default: leave it where it is); ``dtype`` may be a
            precision name such as ``"auto"`` (see :mod:`usfmae_hf.precision`).
        processor: image processor (default: the one saved beside the encoder, see :func:`processor_for`).
        fast: run the encoder through the fused inference forward (see the module docstring; a plain
            ``ViTModel`` only, others always take the stock forward); ``False``: the stock ``ViTModel`` forward.

    Returns:
        float32 CPU tensor, one row per image, in input order.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    _place(encoder, device, dtype)
    processor = processor or processor_for(encoder)
    parameter = next(encoder.parameters())
    forward = _fast_vit(encoder) if fast and fast_path_blocker(encoder) is None else None
    outputs = []
    for pixel_values in _batches(images, batch_size, processor):
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        if forward is None:
            hidden_states = encoder(pixel_values=pixel_values).last_hidden_state
        else:
            hidden_states = forward(encoder.embeddings(pixel_values), cls_only=pooling == "cls")
        outputs.append(pool_tokens(hidden_states, pooling).float().cpu())
    if not outputs:
        raise ValueError("no images given")
    return torch.cat(outputs)
