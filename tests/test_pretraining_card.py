"""The model card of a pretraining run states only what the run knows: initial weights, data, steps, epochs.

Each run is 1-2 optimizer steps of a 32-px MAE on a few images; the expected facts (SHA-256 of the initial
weights, image and row counts, epochs) are computed here from the files, not taken from the package.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.pretraining import DataArguments, main
from usfmae_hf.pretraining.checkpointing import TrainState
from usfmae_hf.pretraining.provenance import RunProvenance, describe_data, is_hub_dataset_id
from usfmae_hf.publishing.cards import render_model_card

IMAGES = 6
# What the paper says of the official release's pretraining; never this model's when its start was not it.
OFFICIAL_CLAIMS = ("370,000", "360,000", "OpenUS-46", "complete pretrained model", "According to the USF-MAE paper")
PAPER_F1_ROW = "| BUS-BRA | Breast lesion (benign / malignant) | 81.6 |"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    for index in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(directory / f"scan_{index}.png")
    return directory


@pytest.fixture(scope="module")
def ingest_build(tmp_path_factory) -> Path:
    """An ``usfmae ingest`` build of two catalogue datasets, 5 images each."""
    from usfmae_hf.ingest import ingest

    root = tmp_path_factory.mktemp("ingest") / "root"
    rng = np.random.default_rng(1)
    for folder in ("kidneyUS", "CCAUI"):
        (root / folder).mkdir(parents=True)
        for index in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 28), dtype=np.uint8)).save(root / folder / f"img_{index}.png")
    output = root.parent / "build"
    ingest(root, output, progress=False)
    return output


@pytest.fixture(scope="module")
def official_dir(tiny_original_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint converted and declared to be the official 100-epoch release."""
    from usfmae_hf.model.conversion import convert_checkpoint

    folder = tmp_path_factory.mktemp("official") / "usf-mae-100ep"
    convert_checkpoint(
        tiny_original_checkpoint,
        folder,
        num_attention_heads=2,
        decoder_num_attention_heads=2,
        declared_source="usf-mae-100ep",
    )
    return folder


def _flags(start: list[str], data: list[str], output: Path, *extra: str) -> list[str]:
    return [
        *start,
        *data,
        "--output_dir",
        str(output),
        "--recipe",
        "mae",
        "--mixed_precision",
        "no",
        "--per_device_train_batch_size",
        "2",
        "--dataloader_num_workers",
        "0",
        "--num_reconstruction_images",
        "0",
        "--max_steps",
        "2",
        *extra,
    ]


def _final_card(start: list[str], data: list[str], output: Path, *extra: str) -> ModelCard:
    """Run a pretraining of 2 steps and return the card of its ``final/`` model."""
    assert main(_flags(start, data, output, *extra)) == 0
    return ModelCard.load(output / "final" / "README.md")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _text(card: ModelCard) -> str:
    return " ".join(card.content.split())  # phrases may wrap in the Markdown


def _table(card: ModelCard) -> dict[str, str]:
    """The card's training table, setting -> value."""
    return dict(re.findall(r"^\| (.+?) \| `(.*)` \|$", card.content, flags=re.MULTILINE))


def _section(text: str, heading: str) -> str:
    return text.split(f"## {heading}")[1].split(" ## ")[0]


def _assert_no_official_claims(text: str) -> None:
    for claim in OFFICIAL_CLAIMS:
        assert claim not in text, claim
    if PAPER_F1_ROW in text:
        assert "They are the paper's, not this model's" in _section(text, "Evaluation")


def test_continued_pretraining_card_names_initial_weights_data_and_progress(tiny_model_dir, images, tmp_path):
    output = tmp_path / "run"
    start, data = ["--model_name_or_path", str(tiny_model_dir)], ["--train_dir", str(images)]
    card = _final_card(start, data, output, "--checkpointing_steps", "1")
    text, table = _text(card), _table(card)
    weights_sha256 = _sha256(tiny_model_dir / "model.safetensors")
    provenance = json.loads((tiny_model_dir / "config.json").read_text())["usfmae_provenance"]
    assert (
        f"continued pretraining, by usfmae-hf, of the local model directory `{tiny_model_dir}` "
        f"(weights SHA-256 `{weights_sha256}`), which usfmae-hf converted from `tiny_mae.pth` "
        f"(SHA-256 `{provenance['source_sha256']}`), a file not declared to be an official USF-MAE release" in text
    )
    assert f"- `{images}` (image folder): {IMAGES} images" in card.content
    # 2 steps of 2 images: 4 of the 6 images, 2/3 of an epoch
    assert "This run took 2 optimizer steps and saw 4 images (0.67 epochs)." in text
    assert (table["optimizer steps run"], table["images seen"], table["epochs run"]) == ("2", "4", "0.67")
    assert table["initialised from"] == str(tiny_model_dir)
    assert card.data.base_model is None and card.data.datasets is None  # a local path is no Hub id
    assert card.data.license == "unknown"
    _assert_no_official_claims(text)
    # the first checkpoint's card is of that step
    step_1 = ModelCard.load(output / "checkpoint-1" / "model" / "README.md")
    assert _table(step_1)["optimizer steps run"] == "1" and "took 1 optimizer steps and saw 2 images" in _text(step_1)
    # the config no longer claims the conversion provenance of weights the run has changed
    config = json.loads((output / "final" / "config.json").read_text())
    assert "usfmae_provenance" not in config
    record = config["usfmae_pretraining"]
    assert record["initialised_from"]["weights_sha256"] == weights_sha256
    assert (record["optimizer_steps"], record["images_seen"], record["data"][0]["images"]) == (2, 4, IMAGES)


def test_resumed_run_names_the_weights_it_started_from(tiny_model_dir, images, tmp_path):
    """The initial weights are those of the run's start, even when the folder is given differently or changed."""
    start = tmp_path / "start"
    shutil.copytree(tiny_model_dir, start)
    original_sha256 = _sha256(start / "model.safetensors")
    output, data = tmp_path / "run", ["--train_dir", str(images)]
    _final_card(["--model_name_or_path", str(start)], data, output, "--checkpointing_steps", "1")
    moved = tmp_path / "moved"
    start.rename(moved)
    shutil.copy(output / "final" / "model.safetensors", moved / "model.safetensors")  # other weights now
    shutil.rmtree(output / "final")
    resume = ["--checkpointing_steps", "1", "--resume_from_checkpoint", str(output / "checkpoint-1")]
    card = _final_card(["--model_name_or_path", str(moved)], data, output, *resume)
    text = _text(card)
    assert f"the local model directory `{start}` (weights SHA-256 `{original_sha256}`)" in text
    assert str(moved) not in text and _table(card)["initialised from"] == str(start)
    assert "This run took 2 optimizer steps and saw 4 images (0.67 epochs)." in text


def test_from_scratch_card_claims_no_initial_weights_or_official_corpus(tiny_mae_config, images, tmp_path):
    config_file = tmp_path / "config.json"
    tiny_mae_config.to_json_file(config_file)
    start, data = ["--config_name", str(config_file)], ["--train_dir", str(images)]
    card = _final_card(start, data, tmp_path / "scratch", "--max_train_samples", "4")
    text = _text(card)
    assert f"pretrained by usfmae-hf from random weights (MAE initialisation of the config `{config_file}`)" in text
    assert f"- `{images}` (image folder): 4 images, the first 4 of its {IMAGES} (`--max_train_samples`)" in text
    assert "This run took 2 optimizer steps and saw 4 images (1.0 epochs)." in text
    assert "Training started from" not in text and "initial weights (" not in text
    assert card.data.base_model is None and card.data.license == "unknown"
    _assert_no_official_claims(text)
    assert "model was pretrained from random weights by usfmae-hf" in _section(text, "Evaluation")


def test_declared_license_is_on_the_card_and_passed_on(tiny_mae_config, images, tmp_path, capsys):
    config_file = tmp_path / "config.json"
    tiny_mae_config.to_json_file(config_file)
    start, data = ["--config_name", str(config_file)], ["--train_dir", str(images)]
    card = _final_card(start, data, tmp_path / "run", "--license", "cc-by-nc-4.0")
    assert card.data.license == "cc-by-nc-4.0"
    assert "as declared by the publisher of this card" in _text(card).split("**License:**")[1]
    record = json.loads((tmp_path / "run" / "final" / "config.json").read_text())["usfmae_pretraining"]
    assert record["license"] == "cc-by-nc-4.0"
    downstream = render_model_card(
        "classifier", config={"model_type": "vit", "image_size": 32}, initialised_from=tmp_path / "run" / "final"
    )
    assert downstream.data.license == "cc-by-nc-4.0"  # a model trained from these weights inherits it

    capsys.readouterr()
    assert main(_flags(start, data, tmp_path / "bad", "--license", "CC BY-NC")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "'CC BY-NC' is not a Hub license id" in error[0]
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_continuing_the_official_release_on_an_ingest_build(official_dir, ingest_build, tmp_path):
    """The paper's description is that of the initial release, labelled so; the data are the build's rows used."""
    output = tmp_path / "run"
    start, data = ["--model_name_or_path", str(official_dir)], ["--dataset_dir", str(ingest_build)]
    card = _final_card(start, data, output, "--max_train_samples", "7")
    text = _text(card)

    # the first 7 rows, in the order datasets reads the build's shards (sorted file names)
    shards = sorted((ingest_build / "data").glob("*.parquet"))
    names = [name for shard in shards for name in pq.read_table(shard, columns=["dataset"])["dataset"].to_pylist()]
    first = Counter(names[:7])
    by_source = ", ".join(f"{name} {first[name]}" for name in sorted(first))
    assert f"- `{ingest_build}` (`usfmae ingest` build): 7 images, the first 7 of its {len(names)}" in text
    assert f"by source dataset: {by_source}" in text and len(names) == 10

    training_data = _section(text, "Training data")
    assert "This model is the continued pretraining of its initial weights" in training_data
    assert "Before this run, the initial weights were declared to be the official USF-MAE 100-epoch" in training_data
    assert "What follows is the paper's description of that checkpoint's pretraining, not of this run" in text
    assert "~370,000 2-D images" in training_data.split("not of this run")[1]  # only after that label
    assert "complete pretrained model" not in text and "These weights are the official" not in text
    framing = _section(text, "Evaluation").split("| Dataset | Task | F1 (%) |")[0]
    assert "official checkpoint that this model's pretraining started from" in framing
    assert "They are the paper's, not this model's" in framing
    assert card.data.license == "mit" and "recorded for the initial weights" in text.split("**License:**")[1]

    # a model fine-tuned from these weights is not told they are the official release
    downstream = _text(
        render_model_card(
            "classifier", config={"model_type": "vit", "image_size": 32}, initialised_from=output / "final"
        )
    )
    assert f"which usfmae-hf pretrained from `{official_dir}` for 2 optimizer steps on `{ingest_build}`" in downstream
    assert "declared to be the official" not in downstream and "370,000" not in downstream
    assert "They are the paper's, not this model's" in downstream


def test_streamed_build_and_hub_datasets(ingest_build):
    """A whole streamed build is described by its own rows per source; only a Hub id enters ``datasets``."""
    report = json.loads((ingest_build / "ingest_report.json").read_text())
    streamed = describe_data(DataArguments(dataset_dir=str(ingest_build), streaming=True), None)
    assert streamed["images"] is None and streamed["sources"] == {d["dataset"]: d["rows"] for d in report["datasets"]}

    assert is_hub_dataset_id("someone/us-frames")
    assert not is_hub_dataset_id("imagefolder") and not is_hub_dataset_id(str(ingest_build))
    provenance = RunProvenance(
        initialised_from=None,
        config="config.json",
        data=[
            describe_data(DataArguments(dataset_name="someone/us-frames", streaming=True), None),
            {**streamed, "from_step": 3},
        ],
    )
    run = provenance.training_run(TrainState(step=5, images_seen=40), epochs=None)
    card = ModelCard(str(render_model_card("pretrained", training_run=run, datasets=provenance.hub_datasets())))
    text = _text(card)
    assert card.data.datasets == ["someone/us-frames"]
    assert "- [`someone/us-frames`](https://huggingface.co/datasets/someone/us-frames) (Hub dataset): streamed" in text
    assert f"- `{ingest_build}` (`usfmae ingest` build): streamed; by source dataset: " in text
    assert "(from step 3 on, after a resume)" in text
    assert "This run took 5 optimizer steps and saw 40 images." in text
    with pytest.raises(UsfmaeError, match="training_run describes a pretraining run"):
        render_model_card("classifier", training_run=run)
