"""Fine-tuning USF-MAE classifiers with the Trainer: heads, MAE recipe options, data, reporting.

Importing this package registers the ``mean``-head model with ``AutoConfig`` and
``AutoModelForImageClassification``, so saved directories load with the Auto classes in a process
that imported :mod:`usfmae_hf.finetuning`, and with ``trust_remote_code=True`` anywhere else.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForImageClassification

from usfmae_hf.finetuning.heads import HEADS, build_classifier, label_maps
from usfmae_hf.finetuning.modeling_usfmae import UsfmaeClassifierConfig, UsfmaeForImageClassification

AutoConfig.register(UsfmaeClassifierConfig.model_type, UsfmaeClassifierConfig, exist_ok=True)
AutoModelForImageClassification.register(UsfmaeClassifierConfig, UsfmaeForImageClassification, exist_ok=True)

__all__ = ["HEADS", "UsfmaeClassifierConfig", "UsfmaeForImageClassification", "build_classifier", "label_maps"]
