"""Segmentation fine-tuning end to end: stock DPT on the USF-MAE encoder, learnability, outputs, pipeline, push, CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MAE_KWARGS
from finetuning_helpers import run_flags, run_python, usage_snippet
from hub_server import hub_server  # noqa: F401
from PIL import Image
from ports import free_port
from synthetic_segmentation import write_generic

REPO = Path(__file__).resolve().parents[1]
# Four blocks (DPT reassembles four depths), 64-px input with 8-px patches: an 8 x 8 token grid.
SEG_MAE_KWARGS = dict(TINY_MAE_KWARGS, image_size=64, num_hidden_layers=4)


@pytest.fixture(scope="module")
def seg_model_dir(tmp_path_factory) -> Path:
    """A random 4-block, 64-px MAE in the original layout, converted to a vit_mae directory."""
    from usfmae_hf.model.conversion import convert_checkpoint
    from usfmae_hf.model.reference_mae import ReferenceMAE

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("seg_mae")
    torch.save(ReferenceMAE.from_hf_config_kwargs(SEG_MAE_KWARGS).state_dict(), root / "mae.pth")
    convert_checkpoint(root / "mae.pth", root / "hf", num_attention_heads=2, decoder_num_attention_heads=2)
    return root / "hf"


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    return write_generic(tmp_path_factory.mktemp("seg_data"), 48, 8, n_test=12, size=64, seed=0, lesion="bright")


def _args(model_dir: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return run_flags(model_dir, data, output, "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra)


@pytest.fixture(scope="module")
def trained(seg_model_dir, seg_data, tmp_path_factory) -> tuple[Path, dict]:
    """A short real fine-tuning run (Dice + CE, no augmentation) whose outputs several tests read."""
    from usfmae_hf.finetuning.segmentation import main

    output = tmp_path_factory.mktemp("seg_run") / "out"
    args = _args(
        seg_model_dir,
        seg_data,
        output,
        "--max_steps",
        "100",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--augment",
        "none",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "100",
        "--num_overlays",
        "3",
    )
    assert main(args) == 0
    return output, json.loads((output / "all_results.json").read_text())


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_vit_dir", "seg_model_dir"])
def test_dpt_backbone_equals_the_vit_encoder(fixture, request):
    from usfmae_hf.finetuning.segmenter import build_segmenter
    from usfmae_hf.inference.features import load_encoder

    model_dir = request.getfixturevalue(fixture)
    segmenter = build_segmenter(model_dir, ["background", "lesion"]).eval()
    encoder = load_encoder(model_dir)
    size = encoder.config.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        got = segmenter.dpt(pixel_values, output_hidden_states=True).hidden_states
        logits = segmenter(pixel_values=pixel_values).logits
    assert len(got) == len(expected) == encoder.config.num_hidden_layers + 1
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert logits.shape[:2] == (2, 2) and logits.shape[-1] >= size
    assert segmenter.config.id2label == {0: "background", 1: "lesion"}


def test_layer_decay_depths_of_dpt():
    from usfmae_hf.finetuning.recipe import layer_id

    assert layer_id("dpt.embeddings.cls_token", 12) == 0
    assert layer_id("dpt.encoder.layer.3.attention.attention.query.weight", 12) == 4
    assert layer_id("neck.fusion_stage.layers.2.projection.weight", 12) == 13  # decoder: full learning rate
    assert layer_id("vit.layers.11.mlp.fc1.weight", 12) == 12
    assert layer_id("base_model.model.dpt.encoder.layer.0.output.dense.weight", 12) == 1  # under peft


def test_loss_is_exact_under_accumulation():
    """Two micro-batches' losses summed equal one batch's loss (the Trainer passes the whole batch's pixel count)."""
    from usfmae_hf.finetuning.segmentation_loss import SegmentationLoss, soft_dice_loss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (4, 16, 16), generator=generator)
    loss = SegmentationLoss("ce")
    whole = loss({"logits": logits}, labels, num_items_in_batch=labels.numel())
    parts = sum(loss({"logits": logits[i : i + 2]}, labels[i : i + 2], labels.numel()) for i in (0, 2))
    torch.testing.assert_close(whole, parts)
    upsampled = torch.nn.functional.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(whole, torch.nn.functional.cross_entropy(upsampled, labels))
    # Soft Dice, transcribed: 1 - mean over foreground classes of 2|P*G| / (|P| + |G|)
    probabilities = upsampled.softmax(1)
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    dice = 2 * (probabilities * one_hot).sum((0, 2, 3)) / (probabilities.sum((0, 2, 3)) + one_hot.sum((0, 2, 3)))
    torch.testing.assert_close(soft_dice_loss(upsampled, labels), 1 - dice[1:].mean(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_learns_the_synthetic_lesions_and_writes_every_output(trained, seg_data):
    from huggingface_hub import ModelCard

    output, results = trained
    assert results["test_dice_mean"] >= 0.8, results["test_dice_mean"]
    assert results["validation_dice_mean"] >= 0.8
    assert results["test_hd95_px_mean"] is not None and results["test_num_images"] == 12
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "training_args.json",
        "test_per_image_metrics.csv",
        "validation_per_image_metrics.csv",
    ):
        assert (output / name).is_file(), name
    assert len(list((output / "test_overlays").glob("*.png"))) == 3
    with open(output / "test_per_image_metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 * 2 and {row["class"] for row in rows} == {"background", "lesion"}
    lesion = [float(row["dice"]) for row in rows if row["class"] == "lesion"]
    assert np.mean(lesion) == pytest.approx(results["test_dice_mean"], abs=1e-9)
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "image-segmentation"
    values = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values[("test", "dice")] == pytest.approx(results["test_dice_mean"], abs=1e-4)
    assert all(r.task_type == "image-segmentation" for r in card.data.eval_results)


@pytest.mark.slow
def test_stock_transformers_loads_it_without_the_package(trained, ultrasound_dicoms, tmp_path):
    """AutoModelForSemanticSegmentation and pipeline() in a process where usfmae_hf cannot be imported."""
    from usfmae_hf.inference.segmentation import load_segmenter, predict_masks
    from usfmae_hf.io import load_frames

    output, _ = trained
    frame = next(load_frames(ultrasound_dicoms["US1_UNCR.dcm"])).image
    Image.fromarray(frame).save(tmp_path / "frame.png")
    script = f"""
import sys, json
sys.modules["usfmae_hf"] = None  # importing the package would fail
import numpy as np
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline
model = AutoModelForSemanticSegmentation.from_pretrained({str(output)!r})
assert type(model).__name__ == "DPTForSemanticSegmentation", type(model)
exact = AutoImageProcessor.from_pretrained({str(output)!r}, backend="pil")
default = pipeline("image-segmentation", model={str(output)!r})
pil = pipeline("image-segmentation", model={str(output)!r}, image_processor=exact)
def lesion(items):
    found = [np.asarray(item["mask"]) > 0 for item in items if item["label"] == "lesion"]
    return found[0] if found else np.zeros((480, 640), bool)
a, b = lesion(pil({str(tmp_path / "frame.png")!r})), lesion(default({str(tmp_path / "frame.png")!r}))
np.save({str(tmp_path / "pil.npy")!r}, a)
print(json.dumps({{"shape": list(a.shape), "default_vs_exact": float((a != b).mean())}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == [480, 640]
    # The default (torchvision) backend samples nearest-neighbour pixels slightly differently at 640 -> 64.
    assert report["default_vs_exact"] < 0.05
    ours = next(predict_masks(load_segmenter(output), [frame])).mask == 1
    np.testing.assert_array_equal(np.load(tmp_path / "pil.npy"), ours)


@pytest.mark.slow
def test_segment_command_on_folders_dicoms_and_cines(trained, seg_data, ultrasound_dicoms, tmp_path):
    from usfmae_hf.cli import main

    output, _ = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in sorted((seg_data / "test" / "images").glob("*.png"))[:2]:
        (inputs / path.name).write_bytes(path.read_bytes())
    (inputs / "broken.png").write_bytes(b"not an image")
    os.symlink(ultrasound_dicoms["US1_UNCR.dcm"], inputs / "us1.dcm")
    os.symlink(ultrasound_dicoms["color3d_jpeg_baseline.dcm"], inputs / "cine.dcm")
    masks = tmp_path / "masks"
    assert main(["segment", str(inputs), "--model", str(output), "--output", str(masks), "--frame-stride", "60"]) == 0
    names = sorted(path.name for path in masks.iterdir())
    assert "us1_mask.png" in names and "us1_overlay.png" in names
    assert {"cine_frame0000_mask.png", "cine_frame0060_mask.png"} <= set(names)
    assert not any(name.startswith("broken") for name in names)
    mask = Image.open(masks / "us1_mask.png")
    assert mask.mode == "P" and mask.size == (640, 480) and set(np.unique(np.asarray(mask))) <= {0, 1}
    scan = sorted((seg_data / "test" / "images").glob("*.png"))[0]
    with Image.open(scan) as image:
        assert Image.open(masks / f"{scan.stem}_mask.png").size == image.size
    # an existing output folder is refused without --overwrite: one line, exit 2
    assert main(["segment", str(inputs), "--model", str(output), "--output", str(masks)]) == 2
    assert main(["segment", str(inputs), "--model", str(REPO), "--output", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_push_to_hub_flag_uploads_the_run_once(seg_model_dir, seg_data, tmp_path, hub_server):  # noqa: F811
    from usfmae_hf.finetuning.segmentation import main

    output = tmp_path / "pushed"
    flags = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--num_overlays", "1"]
    flags += ["--push_to_hub", "--hub_model_id", "tester/usfmae-seg"]
    assert main(_args(seg_model_dir, seg_data, output, *flags)) == 0
    remote = hub_server.files("tester/usfmae-seg")
    expected = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "all_results.json"}
    assert expected <= set(remote) and "training_args.json" in remote and "training_args.bin" not in remote
    assert remote["model.safetensors"] == (output / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_two_processes_equal_one_with_accumulation(seg_model_dir, seg_data, tmp_path):
    """2 CPU processes over gloo x batch 2 == 1 process x batch 2 x accumulation 2 (same images per step)."""
    from safetensors.torch import load_file

    common = ["--max_steps", "2", "--learning_rate", "1e-3", "--augment", "none", "--decoder_dropout", "0",
              "--per_device_train_batch_size", "2", "--seed", "3"]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = str(REPO / "training" / "finetune_segmentation.py")
    runs = {
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port()), script],
        "single": [sys.executable, script, "--gradient_accumulation_steps", "2"],
    }  # fmt: skip
    weights = {}
    for name, command in runs.items():
        output = tmp_path / name
        result = subprocess.run(
            [*command, *_args(seg_model_dir, seg_data, output, *common)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        weights[name] = load_file(output / "model.safetensors")
        assert json.loads((output / "all_results.json").read_text())["world_size"] == (2 if name == "ddp" else 1)
    from usfmae_hf.inference.features import load_encoder

    pretrained = load_encoder(seg_model_dir).state_dict()["layers.0.attention.q_proj.weight"]
    assert not torch.allclose(weights["single"]["dpt.encoder.layer.0.attention.attention.query.weight"], pretrained)
    trained = [key for key in weights["single"] if "running_" not in key and "num_batches" not in key]
    for key in trained:
        torch.testing.assert_close(weights["ddp"][key], weights["single"][key], atol=1e-5, rtol=1e-4, msg=key)


def test_split_report_with_instances_csv_overlays_and_card_results(tmp_path):
    """Perfect predictions of two lesions: Dice 1, HD95 0, mAP 1; the CSV, overlays and card rows follow."""
    from usfmae_hf.evaluation.segmentation_reporting import (
        evaluate_segmentation_split,
        flat_segmentation_results,
        segmentation_card_results,
    )
    from usfmae_hf.inference.segmentation import SegmentationPrediction

    truth = np.zeros((20, 30), dtype=np.uint8)
    truth[2:6, 2:8] = 1
    truth[10:16, 18:26] = 2
    empty = np.zeros((12, 12), dtype=np.uint8)
    predictions = [
        SegmentationPrediction(truth.copy(), np.full(truth.shape, 0.9, np.float32)),
        SegmentationPrediction(empty.copy(), np.ones(empty.shape, np.float32)),
    ]
    images = [Image.fromarray(np.full((20, 30), 128, np.uint8)), Image.fromarray(np.zeros((12, 12), np.uint8))]
    report = evaluate_segmentation_split(
        tmp_path,
        "test",
        predictions=predictions,
        references=[truth, empty],
        ids=["a/one", "two"],
        label_names=["background", "cyst", "tumour"],
        pixel_spacings=[(0.5, 0.5), None],
        instances=True,
        overlay_images=images[:1],
    )
    assert report["dice_mean"] == 1.0 and report["hd95_px_mean"] == 0.0 and report["hd95_mm_mean"] == 0.0
    assert report["instance_map"] == pytest.approx(1.0) and report["instance_map_50"] == pytest.approx(1.0)
    assert report["per_class"]["cyst"]["empty"] == 1  # the empty image: defined as 1, counted
    assert [path.name for path in (tmp_path / "test_overlays").iterdir()] == ["a_one.png"]
    with Image.open(tmp_path / "test_overlays" / "a_one.png") as overlay:
        assert overlay.size == (30 * 3 + 4 * 2, 20)  # image | truth | prediction
    rows = list(csv.DictReader(open(tmp_path / "test_per_image_metrics.csv", newline="")))
    assert len(rows) == 6 and rows[0]["id"] == "a/one" and rows[3]["hd95_px"] == ""  # undefined: empty cell
    flat = flat_segmentation_results("test", report)
    assert flat["test_dice_tumour"] == 1.0 and "test_per_class" not in flat
    cards = {row["metric"]: row["value"] for row in segmentation_card_results({"test": report}, "Synthetic")}
    assert cards["dice"] == 1.0 and cards["map"] == 1.0 and cards["hd95_mm"] == 0.0


def test_mask_png_keeps_label_ids_and_colours():
    from usfmae_hf.inference.segmentation import mask_png

    mask = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.open(io.BytesIO(mask_png(mask, 3)))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), mask)
    palette = image.getpalette()[:9]
    assert palette[:3] == [0, 0, 0] and palette[3:6] != palette[6:9]


# Appended to the card's snippet: the adapter it loaded, merged, against the run's own merged export.
COMPARE_WITH_MERGED = """
import torch
from PIL import Image
from transformers import AutoModelForSemanticSegmentation

merged = AutoModelForSemanticSegmentation.from_pretrained(MERGED).eval()
inputs = processor(images=Image.open("ultrasound.png"), return_tensors="pt")
with torch.no_grad():
    print("max difference", float((model(**inputs).logits - merged(**inputs).logits).abs().max()))
"""


def test_adapter_card_snippet_rebuilds_the_trained_model(seg_model_dir, seg_data, tmp_path):
    """The LoRA run's card snippet, run as written (fresh interpreter, offline) on the adapter folder and the
    local base model, segments the image and holds the model the run trained (its --export_merged copy)."""
    from usfmae_hf.finetuning.segmentation import main

    output = tmp_path / "lora"
    flags = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"]
    flags += ["--num_overlays", "0", "--peft", "lora", "--export_merged"]
    assert main(_args(seg_model_dir, seg_data, output, *flags)) == 0
    assert "adapter_model.safetensors" in {path.name for path in output.iterdir()}
    shutil.copy(sorted((seg_data / "test" / "images").glob("*.png"))[0], tmp_path / "ultrasound.png")
    snippet = usage_snippet(output / "README.md", str(output))
    printed = run_python(snippet + COMPARE_WITH_MERGED.replace("MERGED", repr(str(output / "merged"))), tmp_path)
    *segments, difference = printed.strip().splitlines()
    assert segments and all(line.split()[0] in {"background", "lesion"} for line in segments)
    assert float(difference.removeprefix("max difference ")) < 1e-4
