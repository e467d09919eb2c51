"""Alpha is dropped exactly as PIL's ``convert("RGB")`` drops it, on every path a user takes.

USF-MAE trained on ``Image.open(path).convert("RGB")``: an RGBA, LA or transparent-palette scan
keeps its colour channels and loses its alpha. transformers 5's image processors composite alpha onto
white instead, so each path below is run twice, once on the transparent files and once on twins
that PIL's ``convert("RGB")`` wrote, and must give the same numbers: the independent reference is
PIL itself, not the package.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from usfmae_hf.cli import main
from usfmae_hf.image.augment import (
    build_eval_transform,
    build_mae_finetune_transform,
    build_segmentation_transform,
    build_train_transform,
)
from usfmae_hf.inference.attention import attention_maps
from usfmae_hf.inference.features import extract_features, load_encoder
from usfmae_hf.inference.pipelines import pipeline
from usfmae_hf.io import load_frames

MODES = ("RGBA", "LA", "P+transparency")


def transparent_image(mode: str, seed: int, size: tuple[int, int] = (45, 37)) -> Image.Image:
    """A random image of ``mode`` whose alpha is mostly partial (so compositing would change most pixels)."""
    rng = np.random.default_rng(seed)
    height, width = size
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 2), dtype=np.uint8), "LA")
    palette = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L").convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # the first pixel's colour is transparent
    return palette


@pytest.fixture(scope="module")
def twin_folders(tmp_path_factory):
    """``alpha/`` holds transparent PNGs in two class folders; ``rgb/`` the same files after ``convert("RGB")``."""
    root = tmp_path_factory.mktemp("alpha")
    for index in range(6):
        image = transparent_image(MODES[index % 3], seed=index)
        label = f"class{index % 2}"
        for kind, picture in (("alpha", image), ("rgb", image.convert("RGB"))):
            folder = root / kind / label
            folder.mkdir(parents=True, exist_ok=True)
            picture.save(folder / f"scan{index}.png")
    return root / "alpha", root / "rgb"


def _seed(seed: int) -> None:
    """Seed every generator a transform may draw from (timm's RandAugment uses ``random``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _files(folder):
    return sorted(folder.rglob("*.png"))


def test_twins_really_differ_when_composited(twin_folders):
    """The fixture is a real test: compositing onto white (transformers 5's way) changes the pixels."""
    alpha, _ = twin_folders
    for path in _files(alpha):
        with Image.open(path) as image:
            rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        composited = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        changed = (composited != np.asarray(rgba.convert("RGB"))).mean()
        assert changed > (0.0 if image.mode == "P" else 0.3), (path, changed)


def test_reader_drops_alpha(twin_folders):
    alpha, rgb = twin_folders
    for ours, reference in zip(_files(alpha), _files(rgb)):
        assert np.array_equal(next(load_frames(ours)).image, next(load_frames(reference)).image)


@pytest.mark.parametrize("mode", MODES)
def test_training_transforms_drop_alpha(mode):
    """Every training and evaluation transform, under the same seed, sees the RGB twin."""
    image = transparent_image(mode, seed=11, size=(64, 80))
    twin = image.convert("RGB")
    transforms = {
        "pretrain usfmae": build_train_transform("usfmae", 32),
        "pretrain mae": build_train_transform("mae", 32),
        "finetune mae": build_mae_finetune_transform(32),
        "eval": build_eval_transform(32),
    }
    for name, transform in transforms.items():
        outputs = []
        for candidate in (image, twin):
            _seed(5)
            outputs.append(transform(candidate))
        assert torch.equal(outputs[0], outputs[1]), name
    mask = Image.fromarray((np.arange(64 * 80).reshape(64, 80) % 3).astype(np.uint8))
    segmentation = build_segmentation_transform("usfmae", 32, train=True)
    outputs = []
    for candidate in (image, twin):
        _seed(5)
        outputs.append(segmentation(candidate, mask))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_features_command_drops_alpha(twin_folders, tiny_model_dir, tmp_path):
    alpha, rgb = twin_folders
    tables = []
    for kind, folder in (("alpha", alpha), ("rgb", rgb)):
        output = tmp_path / f"{kind}.parquet"
        assert main(["features", str(folder), "--model", str(tiny_model_dir), "--output", str(output), "-q"]) == 0
        tables.append(np.array(pq.read_table(output).to_pydict()["features"], dtype=np.float32))
    assert tables[0].shape[0] == 6 and np.array_equal(tables[0], tables[1])


def test_library_and_pipeline_drop_alpha(twin_folders, tiny_model_dir):
    alpha, rgb = twin_folders
    encoder = load_encoder(tiny_model_dir)
    pil_alpha = [Image.open(path) for path in _files(alpha)]
    pil_rgb = [Image.open(path) for path in _files(rgb)]
    assert torch.equal(extract_features(encoder, pil_alpha), extract_features(encoder, pil_rgb))
    # arrays with an alpha channel, as a user's own reader may hand them over
    arrays = [np.asarray(image.convert("RGBA")) for image in pil_alpha if image.mode == "RGBA"]
    twins = [np.asarray(Image.fromarray(array).convert("RGB")) for array in arrays]
    assert torch.equal(extract_features(encoder, arrays), extract_features(encoder, twins))
    extractor = pipeline("image-feature-extraction", model=tiny_model_dir)
    for ours, reference in zip(pil_alpha, pil_rgb):
        assert np.array_equal(np.asarray(extractor(ours)), np.asarray(extractor(reference)))


def test_reconstruct_and_attention_drop_alpha(twin_folders, tiny_model_dir, tmp_path):
    alpha, rgb = twin_folders
    source, twin = _files(alpha)[0], _files(rgb)[0]
    pictures = []
    for name, path in (("alpha", source), ("rgb", twin)):
        output = tmp_path / f"{name}.png"
        assert main(["reconstruct", str(path), "--model", str(tiny_model_dir), "--output", str(output)]) == 0
        pictures.append(np.asarray(Image.open(output)))
    assert np.array_equal(pictures[0], pictures[1])
    maps = [attention_maps(tiny_model_dir, Image.open(path)) for path in (source, twin)]
    assert np.array_equal(maps[0].rollout, maps[1].rollout)
    assert np.array_equal(maps[0].heads, maps[1].heads)


def test_probe_drops_alpha(twin_folders, tiny_model_dir, tmp_path):
    """``usfmae probe`` reads class folders through ``datasets``' imagefolder: same predictions."""
    alpha, rgb = twin_folders
    predictions = []
    for kind, folder in (("alpha", alpha), ("rgb", rgb)):
        output = tmp_path / kind
        argv = ["probe", "--model", str(tiny_model_dir), "--train-dir", str(folder), "--validation-dir", str(folder)]
        assert main([*argv, "--output-dir", str(output), "--k", "2", "--method", "knn"]) == 0
        found = output / "validation_predictions.csv"
        with found.open() as handle:
            predictions.append(list(csv.reader(handle)))
        results = json.loads((output / "all_results.json").read_text())
        assert "validation_accuracy" in results
    assert predictions[0] == predictions[1]


def test_finetuning_data_drops_alpha(twin_folders):
    """Class folders read by ``datasets`` and the fine-tuning transforms (augmented train, eval elsewhere)."""
    from usfmae_hf.evaluation.labelled import load_labelled_images
    from usfmae_hf.finetuning.data import with_transforms

    alpha, rgb = twin_folders
    batches = []
    for folder in (alpha, rgb):
        dataset = load_labelled_images(train_dir=str(folder), validation_dir=str(folder))
        dataset = with_transforms(dataset, image_size=32, augment="usfmae")
        _seed(3)
        batches.append({split: dataset[split][:] for split in ("train", "validation")})
    for split in ("train", "validation"):
        assert torch.equal(
            torch.stack(batches[0][split]["pixel_values"]), torch.stack(batches[1][split]["pixel_values"])
        )


@pytest.mark.parametrize("stored_as", ["path", "bytes"])
def test_pretraining_samples_drop_alpha(twin_folders, stored_as):
    """A pretraining sample from a file path (``--train_dir``) or from stored bytes (a ``datasets`` column)."""
    from usfmae_hf.pretraining.data import SampleMaker

    alpha, rgb = twin_folders
    make_sample = SampleMaker(build_train_transform("usfmae", 32), num_patches=16, seed=0)
    for ours, reference in zip(_files(alpha), _files(rgb)):
        values = [str(ours), str(reference)]
        if stored_as == "bytes":
            values = [{"bytes": Path(path).read_bytes(), "path": None} for path in values]
        samples = [make_sample(value, 0, 1) for value in values]
        assert torch.equal(samples[0]["pixel_values"], samples[1]["pixel_values"])
