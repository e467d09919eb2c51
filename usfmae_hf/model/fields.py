"""The ``ViTMAEConfig`` fields of a USF-MAE model, by what they describe; the one home of these lists.

Plain data that imports nothing, so that every layer may read it (``tests/test_architecture.py`` puts
this module in the lowest layer): the model cards (:mod:`usfmae_hf.publishing.cards`) list
:data:`CARD_FIELDS`, pretraining's resume check compares :data:`SHAPE_AND_LOSS_FIELDS`, and the
encoder-only ``ViTConfig`` (:mod:`usfmae_hf.model.directory`) takes :data:`ENCODER_FIELDS`.
"""

from __future__ import annotations

#: the input the patch embedding takes
_INPUT_FIELDS = ("image_size", "patch_size", "num_channels")
#: the encoder's width, depth and heads
_ENCODER_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

#: what describes the encoder, i.e. what a ``ViTConfig`` needs to hold the same weights
ENCODER_FIELDS = (
    *_ENCODER_SIZE_FIELDS,
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    *_INPUT_FIELDS,
    "qkv_bias",
)
#: ``ViTConfig`` fields a ``ViTMAEConfig`` does not have (kept when the source is already a ``ViTConfig``)
VIT_ONLY_FIELDS = ("encoder_stride", "pooler_output_size", "pooler_act")
#: the decoder's width, depth and heads
DECODER_FIELDS = (
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_intermediate_size",
)
#: what the pretraining loss depends on besides the weights
LOSS_FIELDS = ("mask_ratio", "norm_pix_loss")

#: fields that fix the weights' shapes or the loss: a run resumes only where they are unchanged
SHAPE_AND_LOSS_FIELDS = (*_INPUT_FIELDS, *_ENCODER_SIZE_FIELDS, "qkv_bias", *DECODER_FIELDS, *LOSS_FIELDS)
#: the architecture a model card shows, in this order
CARD_FIELDS = ("model_type", *_INPUT_FIELDS, *_ENCODER_SIZE_FIELDS, "layer_norm_eps", *DECODER_FIELDS, *LOSS_FIELDS)
