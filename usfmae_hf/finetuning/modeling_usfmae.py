"""USF-MAE classifier with the MAE fine-tuning head: mean of patch tokens -> ``fc_norm`` -> linear.

This file is copied into every saved ``mean``-head model directory (Hub custom code), so it must
import nothing but torch and transformers: ``AutoModelForImageClassification.from_pretrained(dir,
trust_remote_code=True)`` then works where ``usfmae_hf`` is not installed.

Differences from ``ViTForImageClassification`` (as in the original MAE ``models_vit.py`` with
``global_pool=True``): the encoder's final LayerNorm is dropped, the CLS token is excluded from the
pooled mean, a LayerNorm ``fc_norm`` follows the pooling, the head is initialised trunc-normal with
std 2e-5, and residual branches use stochastic depth (drop-path) during training.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import ViTConfig
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTLayer, ViTModel, ViTPreTrainedModel

try:  # transformers 5.x: initialisers that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x: it only initialises missing weights, plain torch is enough
    from torch.nn import init

# transformers 5.x configs are strict dataclasses (huggingface_hub is a transformers dependency);
# 4.x configs are plain classes whose extra fields come through ``__init__``.
_DATACLASS_CONFIG = dataclasses.is_dataclass(ViTConfig)


class UsfmaeClassifierConfig(ViTConfig):
    """``ViTConfig`` plus the MAE head options.

    drop_path_rate: maximum stochastic-depth rate, increased linearly over the blocks (MAE: 0.1).
    head_init_std: std of the trunc-normal initialisation of the linear head (MAE: 2e-5).
    """

    model_type = "usfmae_classifier"

    drop_path_rate: float = 0.0
    head_init_std: float = 2e-5

    if not _DATACLASS_CONFIG:

        def __init__(self, drop_path_rate: float = 0.0, head_init_std: float = 2e-5, **kwargs) -> None:
            super().__init__(**kwargs)
            self.drop_path_rate = drop_path_rate
            self.head_init_std = head_init_std


if _DATACLASS_CONFIG:
    from huggingface_hub.dataclasses import strict

    UsfmaeClassifierConfig = strict(UsfmaeClassifierConfig)


def drop_path(hidden_states: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random subset of samples, rescaling the others."""
    if rate == 0.0 or not training:
        return hidden_states
    keep = 1.0 - rate
    mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)).bernoulli_(keep)
    return hidden_states * mask / keep


class UsfmaeViTLayer(ViTLayer):
    """A ``ViTLayer`` (same parameters and names) whose two residual branches use drop-path.

    transformers 5.x layers have ``attention`` (returning output and weights), ``mlp`` and ``dropout``;
    4.x layers have ``attention`` (returning the output, dropout included), ``intermediate`` and
    ``output`` (dense, dropout and the residual sum, which is redone here to drop the branch).
    """

    def __init__(self, config: UsfmaeClassifierConfig, drop_path_rate: float) -> None:
        super().__init__(config)
        self.drop_path_rate = drop_path_rate

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if hasattr(self, "mlp"):  # transformers 5.x
            attention_output, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
            hidden_states = hidden_states + drop_path(
                self.dropout(attention_output), self.drop_path_rate, self.training
            )
            mlp_output = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        else:  # transformers 4.x: the second positional argument is the head mask
            attention_output = self.attention(self.layernorm_before(hidden_states), attention_mask)
            hidden_states = hidden_states + drop_path(attention_output, self.drop_path_rate, self.training)
            mlp_output = self.intermediate(self.layernorm_after(hidden_states))
            mlp_output = self.output.dropout(self.output.dense(mlp_output))
        return hidden_states + drop_path(mlp_output, self.drop_path_rate, self.training)


class UsfmaeForImageClassification(ViTPreTrainedModel):
    """ViT encoder (final norm dropped) + mean pooling of patch tokens + ``fc_norm`` + linear head."""

    config_class = UsfmaeClassifierConfig

    def __init__(self, config: UsfmaeClassifierConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTModel(config, add_pooling_layer=False)
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        layers = nn.ModuleList(UsfmaeViTLayer(config, rate) for rate in rates)
        if hasattr(self.vit, "layers"):  # transformers 5.x
            self.vit.layers = layers
        else:  # transformers 4.x
            self.vit.encoder.layer = layers
        self.vit.layernorm = nn.Identity()
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "classifier", None):
            init.trunc_normal_(module.weight, std=self.config.head_init_std)
            init.zeros_(module.bias)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        outputs = self.vit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        pooled = self.fc_norm(outputs.last_hidden_state[:, 1:, :].mean(dim=1))
        logits = self.classifier(pooled)
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


UsfmaeClassifierConfig.register_for_auto_class()
UsfmaeForImageClassification.register_for_auto_class("AutoModelForImageClassification")
