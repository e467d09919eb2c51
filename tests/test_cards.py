"""Model cards: Hub metadata, content, and a usage snippet that runs verbatim on converted models."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from usfmae_hf.cli import main
from usfmae_hf.errors import UsfmaeError
from usfmae_hf.ingest.catalogue import load_catalogue
from usfmae_hf.publishing.cards import PIPELINE_TAGS, REPO_ID_PLACEHOLDER, TAGS, render_model_card

REPO_ID = "someone/usf-mae-test"
PROVENANCE = {"source_file": "USF-MAE_100ep.pt", "source_sha256": "0123abcd" * 8, "layout": "state_dict"}
RESULTS = [
    {"task": "image-classification", "dataset": "BUS-BRA", "metric": "f1", "value": 0.816, "split": "test"},
    {"task": "image-classification", "dataset": "BUS-BRA", "metric": "accuracy", "value": 0.85, "split": "test"},
]


def reparse(card: ModelCard) -> ModelCard:
    """The card as the Hub sees it: the saved text, parsed again."""
    return ModelCard(str(card))


def usage_snippet(card: ModelCard) -> str:
    match = re.search(r"## How to use\n.*?```python\n(.*?)```", card.content, re.DOTALL)
    assert match, "the card has no Python snippet under 'How to use'"
    return match.group(1)


@pytest.mark.parametrize("kind", ["pretrained", "encoder", "classifier", "segmenter"])
def test_metadata_is_complete_and_valid(kind, tiny_mae_config):
    card = reparse(render_model_card(kind, config=tiny_mae_config, provenance=PROVENANCE, repo_id=REPO_ID))
    data = card.data
    assert data.license == "unknown"  # nothing says what the license of an undeclared file is
    assert data.library_name == "transformers"
    assert data.pipeline_tag == PIPELINE_TAGS[kind]
    assert set(TAGS) <= set(data.tags)
    assert data.eval_results is None and "model-index" not in data.to_dict()  # no results, no model-index
    assert data.base_model is None and data.datasets is None


def test_results_become_model_index():
    card = render_model_card(
        "classifier",
        base_model="someone/usf-mae-encoder",
        datasets=["someone/bus-bra"],
        results=RESULTS,
        repo_id=REPO_ID,
        config={"model_type": "vit", "id2label": {0: "benign", 1: "malignant"}, "image_size": 32},
        extra={"training": {"learning_rate": 5e-4, "schedule": "warmup | cosine\nto 1e-5"}},
    )
    data = reparse(card).data
    assert data.base_model == "someone/usf-mae-encoder"
    assert data.datasets == ["someone/bus-bra"]
    assert data.model_name == "usf-mae-test"
    got = [
        (r.task_type, r.dataset_name, r.dataset_type, r.dataset_split, r.metric_type, r.metric_value)
        for r in data.eval_results
    ]
    assert got == [
        ("image-classification", "BUS-BRA", "bus-bra", "test", "f1", 0.816),
        ("image-classification", "BUS-BRA", "bus-bra", "test", "accuracy", 0.85),
    ]
    assert "| 1 | malignant |" in card.content
    assert "Results measured on this model" in card.content
    assert "Fine-tuned on: someone/bus-bra." in card.content
    assert "| learning_rate | `0.0005` |" in card.content
    assert "| schedule | `warmup \\| cosine to 1e-5` |" in card.content  # one table row, pipe escaped


def test_incomplete_result_is_refused():
    with pytest.raises(UsfmaeError, match="lacks metric, value"):
        render_model_card("classifier", results=[{"task": "image-classification", "dataset": "BUS-BRA"}])


def test_unknown_kind_and_extra_are_refused():
    with pytest.raises(UsfmaeError, match="unknown model card kind"):
        render_model_card("detector")
    with pytest.raises(UsfmaeError, match="unknown model card extra"):
        render_model_card("encoder", extra={"descripton": "typo"})


def test_card_sections_training_data_provenance_and_citation(tiny_mae_config):
    card = render_model_card(
        "pretrained",
        config=tiny_mae_config,
        provenance={**PROVENANCE, "declared_source": "usf-mae-100ep"},
        extra={"description": "Converted from the 100-epoch checkpoint.", "training": {"epochs": 3}},
    )
    text = card.content
    for section in (
        "## Intended uses",
        "## Out-of-scope uses",
        "## How to use",
        "## Preprocessing",
        "## Training data",
        "## Evaluation",
        "## Limitations and biases",
        "## Provenance",
        "## Citation",
    ):
        assert section in text
    catalogue = load_catalogue()
    assert len(catalogue) == 46
    for entry in catalogue:
        assert f"| {entry.name} | {entry.anatomy} |" in text
    held_out_table = text.split("Held out for evaluation:")[1].split("## Evaluation")[0]
    assert {e.name for e in catalogue if e.held_out} == {"BUS-BRA", "MMOTU-2D", "GIST514-DB"}
    for name in ("BUS-BRA", "MMOTU-2D", "GIST514-DB"):
        assert f"| {name} |" in held_out_table
    assert "43 datasets" in text
    assert PROVENANCE["source_sha256"] in text and "bare state dict" in text
    assert "| Converter version |" in text
    assert "not a medical device" in text
    assert "Converted from the 100-epoch checkpoint." in text
    assert "### This model's training run" in text and "| epochs | `3` |" in text
    assert "nearest-neighbour" in text and "32×32" in text
    bibtex = re.search(r"```bibtex\n(.*?)```", text, re.DOTALL).group(1)
    assert bibtex.count("{") == bibtex.count("}")
    for fragment in ("Megahed, Youssef", "Biomedical Signal Processing and Control", "122", "110313", "2510.22990"):
        assert fragment in bibtex


@pytest.fixture
def ultrasound_png(tmp_path, ultrasound_dicoms) -> Path:
    """A real ultrasound frame (GE, from pydicom-data) saved as ``ultrasound.png`` in a fresh folder."""
    import pydicom
    from PIL import Image

    folder = tmp_path / "work"
    folder.mkdir()
    if "US1_UNCR.dcm" in ultrasound_dicoms:
        pixels = pydicom.dcmread(ultrasound_dicoms["US1_UNCR.dcm"]).pixel_array
    else:  # pydicom-data missing: a synthetic speckle-like grey frame keeps the test meaningful
        pixels = np.random.default_rng(0).rayleigh(40, size=(480, 640)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "ultrasound.png")
    return folder


def run_snippet(card: ModelCard, model_dir: Path, workdir: Path, monkeypatch, capsys, repo_id: str = REPO_ID):
    """Run the card's snippet verbatim, with only the repository id replaced by ``model_dir``.

    Returns the snippet's variables and what it printed.
    """
    snippet = usage_snippet(card)
    assert f'"{repo_id}"' in snippet
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    capsys.readouterr()
    exec(compile(snippet.replace(repo_id, str(model_dir)), "model-card-snippet", "exec"), namespace)
    return namespace, capsys.readouterr().out


def vit_tokens(model_dir: Path, pixel_values: torch.Tensor) -> torch.Tensor:
    """Encoder tokens from a plain ViTModel on the same weights: an independent path to compare with."""
    from transformers import ViTModel

    with torch.no_grad():
        return ViTModel.from_pretrained(model_dir, add_pooling_layer=False).eval()(pixel_values).last_hidden_state


def test_converter_card_snippet_runs_on_its_model(tiny_model_dir, ultrasound_png, monkeypatch, capsys):
    """The README the converter wrote (repo id still the placeholder) works on its own directory."""
    card = ModelCard.load(tiny_model_dir / "README.md")
    assert card.data.pipeline_tag == "image-feature-extraction" and card.data.license == "unknown"
    ns, out = run_snippet(card, tiny_model_dir, ultrasound_png, monkeypatch, capsys, repo_id=REPO_ID_PLACEHOLDER)
    assert "features: (1, 32) (1, 32)" in out and "masked-patch MSE:" in out
    pixel_values = ns["inputs"]["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    # Ordered, unmasked ViTMAE tokens are exactly the ViT encoder's tokens.
    torch.testing.assert_close(ns["tokens"], vit_tokens(tiny_model_dir, pixel_values), rtol=1e-5, atol=1e-5)
    assert ns["reconstruction"].shape == pixel_values.shape
    assert torch.isfinite(ns["outputs"].loss)


@pytest.mark.parametrize("model_dir_fixture", ["tiny_vit_dir", "tiny_model_dir"])
def test_encoder_snippet_runs_on_converted_model(model_dir_fixture, request, ultrasound_png, monkeypatch, capsys):
    from transformers import AutoConfig

    model_dir = request.getfixturevalue(model_dir_fixture)
    card = render_model_card("encoder", config=AutoConfig.from_pretrained(model_dir), repo_id=REPO_ID)
    ns, out = run_snippet(card, model_dir, ultrasound_png, monkeypatch, capsys)
    assert "features: (1, 32) (1, 32)" in out
    torch.testing.assert_close(ns["tokens"], vit_tokens(model_dir, ns["inputs"]["pixel_values"]), rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["cls", "mean"])
def classifier_dir(request, tiny_vit_dir, tmp_path) -> Path:
    """A (random-head) classifier as fine-tuning saves it: stock ViT (``cls``) or custom-code (``mean``) head."""
    from transformers import AutoImageProcessor

    from usfmae_hf.finetuning import build_classifier

    folder = tmp_path / f"classifier-{request.param}"
    build_classifier(tiny_vit_dir, ["benign", "malignant"], head=request.param).save_pretrained(folder)
    AutoImageProcessor.from_pretrained(tiny_vit_dir).save_pretrained(folder)
    return folder


def test_classifier_snippet_runs_on_fine_tuned_model(classifier_dir, ultrasound_png, monkeypatch, capsys):
    from transformers import AutoConfig, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(classifier_dir)
    card = render_model_card(
        "classifier", config=config, base_model="someone/usf-mae-encoder", results=RESULTS, repo_id=REPO_ID
    )
    assert ("trust_remote_code=True" in usage_snippet(card)) == bool(getattr(config, "auto_map", None))
    ns, out = run_snippet(card, classifier_dir, ultrasound_png, monkeypatch, capsys)
    model = AutoModelForImageClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        expected = model(ns["inputs"]["pixel_values"]).logits.softmax(-1)[0]
    torch.testing.assert_close(ns["probabilities"], expected)
    assert sorted(re.findall(r"^(\w+): [01]\.\d{3}$", out, re.MULTILINE)) == ["benign", "malignant"]


# --- Truthful cards: what the paper says about the official checkpoints is this model's only when declared.

KINDS = ("pretrained", "encoder", "classifier", "segmenter")
# Statements about the official release's pretraining that no undeclared file may carry.
OFFICIAL_CLAIMS = ("370,000", "360,000", "complete pretrained model", "According to the USF-MAE paper", "OpenUS-46 is")
PAPER_F1_ROW = "| BUS-BRA | Breast lesion (benign / malignant) | 81.6 |"
SEGMENTER_CONFIG = {"model_type": "dpt", "image_size": 32, "id2label": {0: "background", 1: "lesion"}}


@pytest.fixture(scope="module")
def converted_dirs(tiny_original_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint converted twice: as an undeclared file, and declared the official 100-epoch release."""
    from usfmae_hf.model.conversion import convert_checkpoint

    root = tmp_path_factory.mktemp("declared")
    dirs = {"undeclared": root / "hf", "declared": root / "official"}
    for name, folder in dirs.items():
        convert_checkpoint(
            tiny_original_checkpoint,
            folder,
            num_attention_heads=2,
            decoder_num_attention_heads=2,
            declared_source="usf-mae-100ep" if name == "declared" else None,
        )
    return dirs


def _card_for(kind: str, model_dir: Path) -> ModelCard:
    """The card of each kind for weights from ``model_dir``: its own (converted) or a model fine-tuned from it."""
    config = json.loads((model_dir / "config.json").read_text())
    if kind in ("pretrained", "encoder"):
        return reparse(render_model_card(kind, config=config, provenance=config["usfmae_provenance"]))
    return reparse(
        render_model_card(
            kind,
            config=SEGMENTER_CONFIG if kind == "segmenter" else {**config, "id2label": {0: "a", 1: "b"}},
            initialised_from=model_dir,
            results=RESULTS,
            extra={"training": {"optimizer steps run": 12}},
        )
    )


def _paper_f1_framing(text: str) -> str:
    """The words between the Evaluation heading and the paper's F1 table."""
    return text.split("## Evaluation")[1].split("| Dataset | Task | F1 (%) |")[0]


@pytest.mark.parametrize("kind", KINDS)
def test_cards_of_undeclared_weights_claim_nothing_about_the_official_release(kind, converted_dirs):
    model_dir = converted_dirs["undeclared"]
    card = _card_for(kind, model_dir)
    text = " ".join(card.content.split())  # phrases may wrap in the Markdown
    for claim in OFFICIAL_CLAIMS:
        assert claim not in text, claim
    assert card.data.license == "unknown" and "not recorded" in text.split("**License:**")[1]
    provenance = json.loads((model_dir / "config.json").read_text())["usfmae_provenance"]
    assert provenance["source_sha256"] in text and "tiny_mae.pth" in text  # names what is known
    assert "not declared to be an official USF-MAE release" in text
    if kind in ("classifier", "segmenter"):
        with open(model_dir / "model.safetensors", "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() in text  # the initial weights, by content
        assert f"`{model_dir}`" in text
    if kind == "segmenter":
        assert PAPER_F1_ROW not in text  # classification F1 say nothing about a segmenter
    else:
        assert PAPER_F1_ROW in text
        framing = _paper_f1_framing(text)
        assert "They are the paper's, not this model's" in framing and "provenance is not verified" in framing
    measured = {r.metric_value for r in card.data.eval_results or []}
    assert not measured & {81.6, 79.6, 82.4}  # the paper's numbers never enter model-index


@pytest.mark.parametrize("kind", KINDS)
def test_declaring_the_official_release_brings_the_papers_statements_back(kind, converted_dirs):
    card = _card_for(kind, converted_dirs["declared"])
    text = " ".join(card.content.split())
    assert card.data.license == "mit" and "USF-MAE reference repository" in text.split("**License:**")[1]
    assert "~370,000 ultrasound images" in text and "According to the USF-MAE paper, the 100-epoch" in text
    assert "ran for 100 epochs" in text
    assert ("complete pretrained model" in text) == (kind == "pretrained")
    if kind in ("pretrained", "encoder"):
        assert "These weights are the official USF-MAE 100-epoch checkpoint" in text
        assert "after fine-tuning the official checkpoint" in _paper_f1_framing(text)
    else:
        assert "declared to be the official USF-MAE 100-epoch checkpoint" in text
    if kind == "classifier":  # a fine-tuned model is not the paper's fine-tuned model
        assert "They are the paper's, not this model's" in _paper_f1_framing(text)


def test_a_training_run_names_its_initial_weights(converted_dirs):
    """A local folder is named with its weights' SHA-256 and conversion provenance, never by its name alone."""
    hub = reparse(render_model_card("classifier", initialised_from="someone/usf-mae-encoder"))
    assert hub.data.base_model == "someone/usf-mae-encoder"
    assert "Training started from [`someone/usf-mae-encoder`](https://huggingface.co/someone/usf-mae-encoder)" in (
        hub.content
    )
    local = reparse(render_model_card("pretrained", initialised_from=converted_dirs["declared"]))
    assert local.data.base_model is None  # a local path is not a Hub id
    text = " ".join(local.content.split())
    assert f"the local model directory `{converted_dirs['declared']}` (weights SHA-256 `" in text
    assert "which usfmae-hf converted from `tiny_mae.pth` (SHA-256 `" in text
    unknown = reparse(render_model_card("encoder"))
    assert "Where these weights came from is not recorded" in unknown.content and unknown.data.license == "unknown"


def test_convert_command_records_source_license_and_verification(tiny_original_checkpoint, tmp_path, capsys):
    heads = ["--num-attention-heads", "2", "--decoder-num-attention-heads", "2"]
    out = tmp_path / "official"
    assert main(["convert", str(tiny_original_checkpoint), "-o", str(out), "--source", "usf-mae-500ep", *heads]) == 0
    card = ModelCard.load(out / "README.md")
    provenance = json.loads((out / "config.json").read_text())["usfmae_provenance"]
    assert provenance["declared_source"] == "usf-mae-500ep" and provenance["license"] == "mit"
    assert provenance["verification"] == "passed" and 0 <= provenance["verification_max_abs_diff"] <= 1e-5
    assert "500-epoch checkpoint" in card.content and "ran for 500 epochs" in " ".join(card.content.split())

    out = tmp_path / "licensed"
    argv = ["convert", str(tiny_original_checkpoint), "-o", str(out), "--license", "apache-2.0", "--no-verify"]
    assert main([*argv, *heads]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and "370,000" not in card.content
    assert "`usfmae convert --license`" in card.content
    assert "was skipped (`--no-verify`)" in card.content and "largest absolute difference" not in card.content

    capsys.readouterr()
    for bad in (["--license", "MIT License"], ["--source", "usf-mae-200ep"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", str(tiny_original_checkpoint), "-o", str(tmp_path / "bad"), *bad])
        assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
