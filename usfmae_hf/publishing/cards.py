"""Model cards for converted, encoder-only and fine-tuned USF-MAE models.

The cards are Jinja templates in :mod:`usfmae_hf.publishing.templates` rendered by
:meth:`huggingface_hub.ModelCard.from_template`; this module fills their metadata (``license``,
``library_name``, ``pipeline_tag``, ``base_model``, ``datasets``, ``tags``, ``model-index``) and
the facts the text needs (architecture, provenance, training data, results).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.ingest.catalogue import load_catalogue
from usfmae_hf.version import __version__

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCard
    from transformers import PretrainedConfig

CardKind = Literal["pretrained", "encoder", "classifier", "segmenter"]

PIPELINE_TAGS: dict[str, str] = {
    "pretrained": "image-feature-extraction",
    "encoder": "image-feature-extraction",
    "classifier": "image-classification",
    "segmenter": "image-segmentation",
}
TAGS = ["ultrasound", "medical-imaging", "mae", "vit"]
# Stands in for the repository id in the usage snippet when the model is not yet on the Hub.
REPO_ID_PLACEHOLDER = "your-username/usf-mae"
DEFAULT_MODEL_NAMES = {
    "pretrained": "usf-mae",
    "encoder": "usf-mae-encoder",
    "classifier": "usf-mae-classifier",
    "segmenter": "usf-mae-segmenter",
}

PAPER_TITLE = "USF-MAE: Ultrasound Self-Supervised Foundation Model with Masked Autoencoding"
PAPER_ARXIV = "2510.22990"
PAPER_BIBTEX = """@article{megahed2026usfmae,
  title         = {{USF-MAE}: Ultrasound Self-Supervised Foundation Model with Masked Autoencoding},
  author        = {Megahed, Youssef and Ducharme, Robin and Erman, Aylin and Walker, Mark and Hawken, Steven and Chan, Adrian D. C.},
  journal       = {Biomedical Signal Processing and Control},
  volume        = {122},
  pages         = {110313},
  year          = {2026},
  eprint        = {2510.22990},
  archivePrefix = {arXiv},
  primaryClass  = {eess.IV},
  url           = {https://arxiv.org/abs/2510.22990}
}"""
REFERENCE_REPOSITORY = "https://github.com/Yusufii9/USF-MAE"
# Downstream F1 reported in the paper for the original checkpoint; shown as the paper's claim,
# never written to model-index (which is only for results measured on the model being published).
PAPER_RESULTS = [
    {"dataset": "BUS-BRA", "task": "Breast lesion (benign / malignant)", "f1": 81.6},
    {"dataset": "MMOTU-2D", "task": "Ovarian tumour (8 classes)", "f1": 79.6},
    {"dataset": "GIST514-DB", "task": "GIST vs leiomyoma (endoscopic US)", "f1": 82.4},
]

PROVENANCE_LABELS = {
    "source_file": "Source checkpoint",
    "source_sha256": "Source SHA-256",
    "layout": "Detected checkpoint layout",
    "converter_version": "Converter version",
    "format": "Output format",
}
CHECKPOINT_LAYOUTS = {
    "state_dict": "bare state dict (as USF-MAE saves it)",
    "mae_checkpoint": "original MAE training checkpoint ({'model': ..., 'optimizer': ...})",
    "encoder_only": "encoder-only weights (no decoder)",
}
ARCHITECTURE_KEYS = (
    "model_type",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "layer_norm_eps",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_intermediate_size",
    "mask_ratio",
    "norm_pix_loss",
)
EXTRA_KEYS = ("description", "training", "evaluation_notes")


def _config_dict(config: PretrainedConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    if config is None:
        return {}
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def _cell(value: Any) -> str:
    """``value`` as one Markdown table cell (no line breaks, escaped pipes)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _eval_results(results: Sequence[Mapping[str, Any]]) -> list[EvalResult]:
    from huggingface_hub import EvalResult

    evals = []
    for result in results:
        missing = {"task", "dataset", "metric", "value"} - result.keys()
        if missing:
            raise UsfmaeError(f"model card result {dict(result)} lacks {', '.join(sorted(missing))}")
        evals.append(
            EvalResult(
                task_type=result["task"],
                dataset_type=result.get("dataset_id", _slug(result["dataset"])),
                dataset_name=result["dataset"],
                dataset_split=result.get("split"),
                metric_type=result["metric"],
                metric_name=result.get("metric_name"),
                metric_value=float(result["value"]),
            )
        )
    return evals


def render_model_card(
    kind: CardKind,
    *,
    config: PretrainedConfig | Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    results: Sequence[Mapping[str, Any]] | None = None,
    datasets: Sequence[str] | None = None,
    repo_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Render the model card (``README.md``) of a USF-MAE model directory.

    Args:
        kind: ``"pretrained"`` (full ``ViTMAEForPreTraining``: encoder + decoder), ``"encoder"``
            (encoder-only ``ViTModel`` export), ``"classifier"`` (a fine-tuned image classifier) or
            ``"segmenter"`` (a fine-tuned ``DPTForSemanticSegmentation``).
        config: the model's ``PretrainedConfig`` (or its dict); its architecture fields and, for
            classifiers, ``id2label`` are shown on the card.
        provenance: where converted weights came from. Keys: ``source_file`` (file name),
            ``source_sha256``, ``layout`` (``"state_dict"``, ``"mae_checkpoint"`` or
            ``"encoder_only"``), ``converter_version`` (default: ``"usfmae-hf <this version>"``);
            further keys are listed as they are.
        base_model: Hub id of the model this one derives from (metadata ``base_model``).
        results: results measured on *this* model, written to ``model-index`` and to the
            evaluation table. Each dict has ``task`` (Hub task type, e.g. ``"image-classification"``),
            ``dataset`` (display name, e.g. ``"BUS-BRA"``), ``metric`` (metric type, e.g. ``"f1"``,
            ``"accuracy"``) and ``value`` (a number, as reported: 0.816 or 81.6); optional
            ``dataset_id`` (Hub dataset id or slug; default: the slugified name), ``split``
            (e.g. ``"test"``), ``metric_name`` (display name, e.g. ``"Macro F1"``).
        datasets: Hub dataset ids for the ``datasets`` metadata (only real Hub ids belong there).
        repo_id: Hub repository id used in the title and the usage snippet (a placeholder
            otherwise).
        extra: optional text for the card: ``description`` (a paragraph added to the description),
            ``training`` (mapping of training hyperparameters, shown as a table),
            ``evaluation_notes`` (a paragraph on how the results were obtained).

    Returns:
        The rendered :class:`huggingface_hub.ModelCard`; ``card.save(dir / "README.md")`` writes it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if kind not in PIPELINE_TAGS:
        raise UsfmaeError(f"unknown model card kind {kind!r}; expected one of {', '.join(PIPELINE_TAGS)}")
    extra = dict(extra or {})
    unknown = set(extra) - set(EXTRA_KEYS)
    if unknown:
        raise UsfmaeError(
            f"unknown model card extra field(s) {', '.join(sorted(unknown))}; expected {', '.join(EXTRA_KEYS)}"
        )

    model_name = repo_id.split("/")[-1] if repo_id else DEFAULT_MODEL_NAMES[kind]
    card_data = ModelCardData(
        license="mit",
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[kind],
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
        tags=list(TAGS),
        model_name=model_name if results else None,
        eval_results=_eval_results(results) if results else None,
    )
    config_dict = _config_dict(config)
    provenance = dict(provenance or {})
    if provenance:
        provenance.setdefault("converter_version", f"usfmae-hf {__version__}")
    catalogue = load_catalogue()
    templates = resources.files("usfmae_hf.publishing.templates")
    return ModelCard.from_template(
        card_data,
        # The shared section macros come first so that every card template can call them.
        template_str=(templates / "_sections.md").read_text(encoding="utf-8")
        + (templates / f"{kind}.md").read_text(encoding="utf-8"),
        model_name=model_name,
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        base_model=base_model,
        architecture={key: config_dict[key] for key in ARCHITECTURE_KEYS if key in config_dict},
        image_size=config_dict.get("image_size", 224),
        is_mae=config_dict.get("model_type") == "vit_mae",
        remote_code=bool(config_dict.get("auto_map")),
        id2label=config_dict.get("id2label") or {},
        provenance=[(PROVENANCE_LABELS.get(key, key), _cell(value)) for key, value in provenance.items()],
        layout_description=CHECKPOINT_LAYOUTS.get(provenance.get("layout", ""), ""),
        pretraining_datasets=[entry for entry in catalogue if not entry.held_out],
        held_out_datasets=[entry for entry in catalogue if entry.held_out],
        results=[dict(result) for result in results or []],
        paper_results=PAPER_RESULTS,
        paper_title=PAPER_TITLE,
        paper_arxiv=PAPER_ARXIV,
        bibtex=PAPER_BIBTEX,
        reference_repository=REFERENCE_REPOSITORY,
        description=extra.get("description"),
        evaluation_notes=extra.get("evaluation_notes"),
        training=[(_cell(key), _cell(value)) for key, value in (extra.get("training") or {}).items()],
    )
