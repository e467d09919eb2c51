"""Model cards for converted, encoder-only and fine-tuned USF-MAE models.

The cards are Jinja templates in :mod:`usfmae_hf.publishing.templates` rendered by
:meth:`huggingface_hub.ModelCard.from_template`; this module fills their metadata (``license``,
``library_name``, ``pipeline_tag``, ``base_model``, ``datasets``, ``tags``, ``model-index``) and
the facts the text needs (architecture, provenance, training data, results).

A card states only what the package knows: the source file and its SHA-256, the detected layout, the
initial weights of a training run (path and SHA-256, or Hub id), what a pretraining run trained on and for
how long (``training_run``), the metadata it is given. What the USF-MAE paper says about the
official checkpoints (the OpenUS-46 pretraining corpus, the downstream F1 scores) is stated as this
model's only when its weights are, or start from, a file declared at conversion to be an official
release (:data:`OFFICIAL_RELEASES`, ``usfmae convert --source``); otherwise it is labelled as the
paper's, or left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.model.fields import CARD_FIELDS
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

# The official USF-MAE checkpoints (published with REFERENCE_REPOSITORY), by the id that
# ``usfmae convert --source`` declares.
OFFICIAL_RELEASES: dict[str, dict[str, Any]] = {
    "usf-mae-100ep": {"id": "usf-mae-100ep", "title": "100-epoch checkpoint (the recommended one)", "epochs": 100},
    "usf-mae-500ep": {"id": "usf-mae-500ep", "title": "500-epoch checkpoint", "epochs": 500},
}
# The reference repository's license, under which it publishes the official checkpoints.
OFFICIAL_LICENSE = "mit"
# The Hub's license id for "not known".
UNKNOWN_LICENSE = "unknown"
# Hub license ids, for the help and errors of the --license flags.
LICENSE_EXAMPLES = "mit, apache-2.0, cc-by-4.0, cc-by-nc-4.0, other"
# Config attribute in which ``usfmae convert`` records where the weights came from.
PROVENANCE_KEY = "usfmae_provenance"
# Config attribute in which a usfmae-hf pretraining run records what it did (its ``training_run`` and initial
# weights); its weights are no longer those that ``usfmae_provenance`` described, so it replaces that.
PRETRAINING_KEY = "usfmae_pretraining"

PROVENANCE_LABELS = {
    "source_file": "Source checkpoint",
    "source_sha256": "Source SHA-256",
    "declared_source": "Declared release",
    "layout": "Detected checkpoint layout",
    "source_dtype": "Source dtype",
    "dtype": "Stored dtype",
    "converter_version": "Converter version",
    "format": "Output format",
    "verification": "Verification",
    "verification_max_abs_diff": "Largest difference to the reference",
    "license": "License",
}
CHECKPOINT_LAYOUTS = {
    "state_dict": "bare state dict (as USF-MAE saves it)",
    "mae_checkpoint": "original MAE training checkpoint ({'model': ..., 'optimizer': ...})",
    "encoder_only": "encoder-only weights (no decoder)",
}
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


def official_release(provenance: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The :data:`OFFICIAL_RELEASES` entry that ``provenance`` declares (``declared_source``), if any."""
    return OFFICIAL_RELEASES.get((provenance or {}).get("declared_source", ""))


def describe_initial_weights(initialised_from: str | os.PathLike) -> dict[str, Any]:
    """What is known about the weights a training run starts from: a Hub id, or a local model directory.

    A local directory is named by the path given, the SHA-256 of its ``model.safetensors``, the conversion
    provenance its ``config.json`` records (if usfmae-hf converted it) and the pretraining run that wrote it
    (if usfmae-hf pretrained it). A training run records this at its start, so that the cards of its
    checkpoints and of a resumed run name the weights it started from even if the folder changed since.
    """
    folder = Path(initialised_from)
    if not folder.is_dir():
        return {"name": str(initialised_from), "hub": True, "weights_sha256": None, "provenance": {}}
    recorded: dict[str, Any] = {}
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            parsed = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError:
            parsed = {}
        recorded = parsed if isinstance(parsed, dict) else {}
    weights = folder / "model.safetensors"
    weights_sha256 = None
    if weights.is_file():
        with open(weights, "rb") as handle:
            weights_sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    described = {
        "name": str(initialised_from),
        "hub": False,
        "weights_sha256": weights_sha256,
        "provenance": _recorded_mapping(recorded, PROVENANCE_KEY),
    }
    pretraining = _recorded_mapping(recorded, PRETRAINING_KEY)
    if pretraining:
        described["pretraining"] = pretraining
    return described


def _recorded_mapping(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return dict(value) if isinstance(value, Mapping) else {}


def _initial_weights(
    initialised_from: str | os.PathLike | Mapping[str, Any] | None, base_model: str | None
) -> dict[str, Any] | None:
    """:func:`describe_initial_weights` of ``initialised_from`` (or the description given); a Hub id if only
    ``base_model`` is known; None if neither."""
    if initialised_from is None:
        return {"name": base_model, "hub": True, "weights_sha256": None, "provenance": {}} if base_model else None
    if isinstance(initialised_from, Mapping):
        return {"weights_sha256": None, "provenance": {}, **initialised_from}
    return describe_initial_weights(initialised_from)


def check_license_id(value: str) -> str:
    """``value`` if it is a Hub license id (lower-case letters, digits, ``.``, ``+``, ``-``); else UsfmaeError."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", value):
        raise UsfmaeError(f"license {value!r} is not a Hub license id (lower case, e.g. {LICENSE_EXAMPLES})")
    return value


def _license(explicit: str | None, provenance: Mapping[str, Any], init: Mapping[str, Any] | None) -> tuple[str, str]:
    """The card's license id and where it comes from (a phrase for the card); ``unknown`` when not known.

    Known means: given, or recorded at conversion, of this model or of the weights its training started from.
    """
    if explicit:
        return explicit, "as declared by the publisher of this card"
    recorded = provenance or (init or {}).get("provenance") or {}
    if not recorded.get("license"):
        inherited = (init or {}).get("pretraining", {}).get("license")
        if inherited and not provenance:
            return str(inherited), f"recorded for the initial weights ({init['name']}) by the run that pretrained them"
        return UNKNOWN_LICENSE, ""
    if official_release(recorded) and recorded["license"] == OFFICIAL_LICENSE:
        basis = "the license of the USF-MAE reference repository, which publishes the official checkpoints"
    else:
        basis = "as declared at conversion (`usfmae convert --license`)"
    if not provenance:
        basis += f"; recorded for the initial weights ({init['name']})"
    return str(recorded["license"]), basis


def render_model_card(
    kind: CardKind,
    *,
    config: PretrainedConfig | Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    initialised_from: str | os.PathLike | None = None,
    license: str | None = None,  # noqa: A002 - the Hub metadata field's name
    results: Sequence[Mapping[str, Any]] | None = None,
    datasets: Sequence[str] | None = None,
    repo_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
    training_run: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Render the model card (``README.md``) of a USF-MAE model directory.

    Args:
        kind: ``"pretrained"`` (full ``ViTMAEForPreTraining``: encoder + decoder), ``"encoder"``
            (encoder-only ``ViTModel`` export), ``"classifier"`` (a fine-tuned image classifier) or
            ``"segmenter"`` (a fine-tuned ``DPTForSemanticSegmentation``).
        config: the model's ``PretrainedConfig`` (or its dict); its architecture fields and, for
            classifiers and segmenters, ``id2label`` are shown on the card.
        provenance: where *this* model's converted weights came from (what ``usfmae convert``
            records in the config's ``usfmae_provenance``). Keys: ``source_file`` (file name),
            ``source_sha256``, ``layout`` (``"state_dict"``, ``"mae_checkpoint"`` or
            ``"encoder_only"``), ``declared_source`` (an :data:`OFFICIAL_RELEASES` id: the file was
            declared to be that official release), ``license``, ``verification`` and
            ``verification_max_abs_diff``, ``converter_version`` (default: ``"usfmae-hf <this
            version>"``); further keys are listed as they are.
        base_model: Hub id of the model this one derives from (metadata ``base_model``).
        initialised_from: the weights a training run started from: a Hub id (also the ``base_model``
            metadata unless given) or a local model directory, which the card names by its path, the
            SHA-256 of its weights and the conversion provenance its config records; or what
            :func:`describe_initial_weights` recorded of either when the run started.
        license: Hub license id; default: the one recorded at conversion (``usfmae convert --license``,
            or the official releases' license), else that of the initial weights, else ``"unknown"``.
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
        training_run: what a pretraining run did, for ``"pretrained"`` cards (the card then says this
            model is that run's result): ``from_scratch`` (true: random initial weights, no
            ``initialised_from``), ``config`` (the config a from-scratch run built), ``data`` (one mapping
            per source: ``name`` (path or Hub id), ``kind`` (e.g. ``"usfmae ingest build"``), ``hub``
            (a Hub dataset), ``images`` (used; None for a stream), ``of`` (the source's size when fewer
            were used), ``sources`` (source dataset name -> rows used), ``from_step`` (the step a
            resumed run switched to it)), ``optimizer_steps``, ``images_seen``, ``epochs`` (None for a
            stream) and ``bad_images`` (unreadable images skipped).

    Returns:
        The rendered :class:`huggingface_hub.ModelCard`; ``card.save(dir / "README.md")`` writes it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from usfmae_hf.ingest.catalogue import load_catalogue

    if kind not in PIPELINE_TAGS:
        raise UsfmaeError(f"unknown model card kind {kind!r}; expected one of {', '.join(PIPELINE_TAGS)}")
    extra = dict(extra or {})
    unknown = set(extra) - set(EXTRA_KEYS)
    if unknown:
        raise UsfmaeError(
            f"unknown model card extra field(s) {', '.join(sorted(unknown))}; expected {', '.join(EXTRA_KEYS)}"
        )

    provenance = dict(provenance or {})
    if provenance:
        provenance.setdefault("converter_version", f"usfmae-hf {__version__}")
    run = dict(training_run or {})
    if run and kind != "pretrained":
        raise UsfmaeError(f"training_run describes a pretraining run; a {kind!r} card does not take it")
    init = None if provenance or run.get("from_scratch") else _initial_weights(initialised_from, base_model)
    if base_model is None and init and init["hub"]:
        base_model = init["name"]
    # The conversion behind these weights: this model's own, or that of the weights training started from.
    conversion = provenance or (init or {}).get("provenance") or {}
    source = (
        {"file": conversion["source_file"], "sha256": conversion.get("source_sha256", "not recorded")}
        if conversion.get("source_file")
        else None
    )
    license_id, license_basis = _license(license, provenance, init)

    model_name = repo_id.split("/")[-1] if repo_id else DEFAULT_MODEL_NAMES[kind]
    card_data = ModelCardData(
        license=license_id,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[kind],
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
        tags=list(TAGS),
        model_name=model_name if results else None,
        eval_results=_eval_results(results) if results else None,
    )
    config_dict = _config_dict(config)
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
        architecture={key: config_dict[key] for key in CARD_FIELDS if key in config_dict},
        image_size=config_dict.get("image_size", 224),
        is_mae=config_dict.get("model_type") == "vit_mae",
        remote_code=bool(config_dict.get("auto_map")),
        id2label=config_dict.get("id2label") or {},
        converted=bool(provenance),
        release=official_release(conversion),
        source=source,
        init=init,
        license_id=license_id,
        license_basis=license_basis,
        verified_max_abs_diff=provenance.get("verification_max_abs_diff"),
        provenance=[(PROVENANCE_LABELS.get(key, key), _cell(value)) for key, value in provenance.items()],
        layout_description=CHECKPOINT_LAYOUTS.get(provenance.get("layout", ""), ""),
        pretraining_datasets=[entry for entry in catalogue if not entry.held_out],
        held_out_datasets=[entry for entry in catalogue if entry.held_out],
        results=[dict(result) for result in results or []],
        datasets=list(datasets or []),
        run=run,
        paper_results=PAPER_RESULTS,
        paper_title=PAPER_TITLE,
        paper_arxiv=PAPER_ARXIV,
        bibtex=PAPER_BIBTEX,
        reference_repository=REFERENCE_REPOSITORY,
        description=extra.get("description"),
        evaluation_notes=extra.get("evaluation_notes"),
        training=[(_cell(key), _cell(value)) for key, value in (extra.get("training") or {}).items()],
    )
