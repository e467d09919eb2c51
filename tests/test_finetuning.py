"""Fine-tuning: heads (incl. remote code without usfmae_hf), data checks, Trainer runs (1 and 2 ranks)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from finetuning_helpers import run_flags, run_python, usage_snippet
from PIL import Image
from ports import free_port

from usfmae_hf.errors import UnreadableImageError, UsfmaeError
from usfmae_hf.finetuning import UsfmaeForImageClassification, build_classifier
from usfmae_hf.finetuning.data import check_labels, drop_unreadable, load_labelled_images
from usfmae_hf.finetuning.recipe import ClassificationCollator, ClassificationLoss, layer_decay_param_groups

REPO = Path(__file__).resolve().parents[1]
CLASSES = (("benign", 60), ("malignant", 170))


def make_speckle_folders(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """Class-per-folder grey speckle images (Rayleigh, like B-mode) whose classes differ in echogenicity."""
    rng = np.random.default_rng(seed)
    for split, per_class in sizes.items():
        for name, level in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                speckle = np.clip(rng.rayleigh(scale=level / 1.25, size=(40, 48)), 0, 255).astype(np.uint8)
                Image.fromarray(speckle, mode="L").save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="module")
def speckle_data(tmp_path_factory) -> Path:
    return make_speckle_folders(tmp_path_factory.mktemp("speckle"), {"train": 12, "validation": 6, "test": 6})


def test_mean_head_is_the_mae_recipe(tiny_model_dir):
    from transformers import ViTModel

    model = build_classifier(tiny_model_dir, ["a", "b", "c"], head="mean", drop_path_rate=0.1).eval()
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and model.config.label2id["c"] == 2
    assert model.classifier.weight.std() < 1e-4  # trunc-normal std 2e-5
    encoder = ViTModel.from_pretrained(tiny_model_dir, add_pooling_layer=False).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # the last block's output before the encoder's final norm, mean over patches (CLS excluded)
        tokens = encoder(pixels, output_hidden_states=True).hidden_states[-1]
        expected = model.classifier(model.fc_norm(tokens[:, 1:].mean(1)))
        torch.testing.assert_close(model(pixel_values=pixels).logits, expected)
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(pixel_values=pixels).logits, model(pixel_values=pixels).logits)  # drop-path active


def test_cls_head_is_stock_vit(tiny_vit_dir, tmp_path):
    from transformers import AutoModelForImageClassification, ViTForImageClassification

    model = build_classifier(tiny_vit_dir, ["x", "y"], head="cls")
    assert type(model) is ViTForImageClassification
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(reloaded) is ViTForImageClassification and reloaded.config.id2label == {0: "x", 1: "y"}


# Run with -I -S: site-packages without .pth files (no editable usfmae_hf). Without ``site`` a virtualenv's
# sys.prefix stays the base interpreter's, so the environment is found from sys.executable's pyvenv.cfg.
SITE_PACKAGES_OF_EXECUTABLE = """
import os, site, sys, sysconfig
def _site_packages():
    bin_dir = os.path.dirname(sys.executable)
    prefixes, system = [], True
    for cfg in (os.path.join(bin_dir, "pyvenv.cfg"), os.path.join(os.path.dirname(bin_dir), "pyvenv.cfg")):
        if os.path.isfile(cfg):
            prefixes.append(os.path.dirname(cfg))
            with open(cfg) as f:
                entries = dict(line.split("=", 1) for line in f if "=" in line)
            settings = {key.strip().lower(): value.strip().lower() for key, value in entries.items()}
            system = settings.get("include-system-site-packages") == "true"
            break
    if system:
        prefixes.append(sys.base_prefix)
    paths = []
    for prefix in prefixes:
        scheme = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})
        paths += [scheme["purelib"], scheme["platlib"], *site.getsitepackages([prefix])]
    return [p for i, p in enumerate(paths) if os.path.isdir(p) and p not in paths[:i]]
sys.path.extend(_site_packages())
"""

REMOTE_CODE_CHECK = (
    SITE_PACKAGES_OF_EXECUTABLE
    + """
try:
    import usfmae_hf
except ModuleNotFoundError:
    pass
else:
    sys.exit("usfmae_hf is importable here: " + usfmae_hf.__file__)
import numpy as np, torch, transformers
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
pixels = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], model(pixel_values=pixels).logits.numpy())
print(type(model).__module__, type(model).__name__, model.config.id2label, "transformers", transformers.__version__)
"""
)


def _run_remote_code_check(python: str, saved: Path, pixels: torch.Tensor, tmp_path: Path) -> tuple[str, np.ndarray]:
    """Load ``saved`` with trust_remote_code in ``python -I -S`` (no usfmae_hf); its stdout and logits."""
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [
            python,
            "-I",
            "-S",
            "-c",
            REMOTE_CODE_CHECK,
            str(saved),
            str(tmp_path / "pixels.npy"),
            str(tmp_path / "out.npy"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, np.load(tmp_path / "out.npy")


@pytest.mark.slow
def test_mean_head_loads_with_remote_code_without_package(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageClassification

    model = build_classifier(tiny_model_dir, ["benign", "malignant"], head="mean").eval()
    saved = tmp_path / "classifier"
    model.save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_usfmae.UsfmaeForImageClassification"
    assert (saved / "modeling_usfmae.py").is_file()
    # in this process (package imported, classes registered) the Auto class needs no remote code
    assert type(AutoModelForImageClassification.from_pretrained(saved)) is UsfmaeForImageClassification

    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.numpy()
    stdout, logits = _run_remote_code_check(sys.executable, saved, pixels, tmp_path)
    assert "UsfmaeForImageClassification" in stdout and "malignant" in stdout
    np.testing.assert_allclose(logits, expected, atol=1e-5)


@pytest.mark.slow
def test_mean_head_remote_code_gives_same_logits_in_tf4(tiny_model_dir, tmp_path, tf4_python):
    """The saved modeling_usfmae.py must load under transformers 4.57 and compute what 5.x computes."""
    model = build_classifier(tiny_model_dir, ["benign", "malignant"], head="mean").eval()
    saved = tmp_path / "classifier"
    model.save_pretrained(saved)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.numpy()
    stdout, logits = _run_remote_code_check(tf4_python, saved, pixels, tmp_path)
    assert "transformers 4." in stdout, stdout
    # remote code, not a class registered by usfmae_hf
    assert stdout.startswith("transformers_modules") and "UsfmaeForImageClassification" in stdout, stdout
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_layer_decay_groups(tiny_model_dir):
    model = build_classifier(tiny_model_dir, ["a", "b"], head="mean")
    groups = layer_decay_param_groups(
        model,
        learning_rate=1.0,
        weight_decay=0.05,
        layer_decay=0.5,
        decay_names=[name for name, p in model.named_parameters() if p.ndim > 1],
    )
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    # 2 blocks: embeddings depth 0 -> 0.5**3, block 1 -> 0.5**1, head -> 1
    assert lr_of[id(params["vit.embeddings.patch_embeddings.projection.weight"])] == (0.125, 0.05)
    assert lr_of[id(params["vit.embeddings.cls_token"])] == (0.125, 0.0)
    assert lr_of[id(params["vit.layers.1.mlp.fc1.weight"])] == (0.5, 0.05)
    assert lr_of[id(params["vit.layers.1.mlp.fc1.bias"])] == (0.5, 0.0)
    assert lr_of[id(params["classifier.weight"])] == (1.0, 0.05)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_loss_and_collator():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 2])
    loss = ClassificationLoss(label_smoothing=0.1)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(loss({"logits": logits}, labels), expected)
    # gradient accumulation: sum over this batch / samples of the whole accumulated batch (8)
    torch.testing.assert_close(loss({"logits": logits}, labels, num_items_in_batch=8), expected * 4 / 8)
    soft = torch.nn.functional.one_hot(labels, 3).float()
    # the Trainer counts soft-label entries (4 x 3); the loss converts back to samples
    torch.testing.assert_close(loss({"logits": logits}, soft, num_items_in_batch=torch.tensor(12)), expected)

    collator = ClassificationCollator(3, mixup=0.8, cutmix=1.0)
    examples = [{"pixel_values": torch.rand(3, 8, 8), "labels": i % 3} for i in range(4)]
    evaluation = collator(examples)
    assert evaluation["labels"].tolist() == [0, 1, 2, 0] and torch.equal(
        evaluation["pixel_values"][1], examples[1]["pixel_values"]
    )
    train = collator([{**example, "train": True} for example in examples])
    assert train["labels"].shape == (4, 3) and torch.allclose(train["labels"].sum(1), torch.ones(4))


def test_class_weights_and_layer_decay_optimizer(tiny_model_dir, tmp_path):
    from sklearn.utils.class_weight import compute_class_weight
    from transformers import TrainingArguments

    from usfmae_hf.finetuning.recipe import UsfmaeTrainer, balanced_class_weights

    labels = [0, 0, 0, 1, 2, 2]
    weights = balanced_class_weights(labels, 3)
    np.testing.assert_allclose(weights, compute_class_weight("balanced", classes=np.arange(3), y=labels), rtol=1e-6)
    logits, targets = torch.randn(6, 3), torch.tensor(labels)
    per_sample = torch.nn.functional.cross_entropy(logits, targets, reduction="none") * weights[targets]
    torch.testing.assert_close(
        ClassificationLoss(class_weights=weights)({"logits": logits}, targets), per_sample.mean()
    )
    with pytest.raises(ValueError, match="absent"):
        balanced_class_weights([0, 0, 2], 3)

    model = build_classifier(tiny_model_dir, ["a", "b"], head="cls")
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.05, use_cpu=True, report_to=[]
    )
    optimizer = UsfmaeTrainer(model=model, args=args, layer_decay=0.5).create_optimizer()
    assert sorted({group["lr"] for group in optimizer.param_groups}) == [1e-3 * 0.5**3, 1e-3 * 0.5**2, 1e-3 * 0.5, 1e-3]
    assert optimizer.defaults["betas"] == (args.adam_beta1, args.adam_beta2)  # the Trainer's optimizer settings


@pytest.mark.parametrize(
    ("flags", "augment"),
    [([], "usfmae"), (["--recipe", "mae"], "mae_finetune"), (["--recipe", "mae", "--augment", "usfmae"], "usfmae")],
)
def test_recipe_sets_augment_unless_given(flags, augment, tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    from usfmae_hf.finetuning.recipe import MAE_PRESET
    from usfmae_hf.finetuning.run import DataArguments, ModelArguments, resolve_recipe

    assert MAE_PRESET["augment"] == "mae_finetune"
    model_args, _, training_args = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments)
    ).parse_args_into_dataclasses(
        ["--model_name_or_path", "unused", "--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", *flags]
    )
    assert resolve_recipe(model_args, training_args)["augment"] == augment


def test_reports_with_a_class_absent_from_the_split(tmp_path):
    from usfmae_hf.evaluation.reporting import card_results, evaluate_split

    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 0, 1, 0, 1])  # class "c" absent from this split
    probabilities = rng.dirichlet(np.ones(3), size=6)
    report = evaluate_split(
        tmp_path,
        "test",
        probabilities=probabilities,
        labels=labels,
        ids=[f"i{k}" for k in range(6)],
        label_names=["a", "b", "c"],
    )
    assert report["roc_auc_undefined_classes"] == [2] and np.isnan(report["roc_auc"])
    assert (tmp_path / "test_roc.png").stat().st_size > 0 and (
        tmp_path / "test_confusion_matrix.png"
    ).stat().st_size > 0
    rows = (tmp_path / "test_predictions.csv").read_text().splitlines()
    assert rows[0].endswith("prob_a,prob_b,prob_c") and len(rows) == 7
    # an undefined AUROC never reaches the model card
    assert {entry["metric"] for entry in card_results({"test": report}, "X")} == {"f1", "accuracy", "balanced_accuracy"}


def test_unseen_label_and_unreadable_images(tmp_path):
    root = make_speckle_folders(tmp_path, {"train": 2, "validation": 1})
    extra = root / "validation" / "cyst"
    extra.mkdir()
    (root / "train" / "benign" / "benign_0.png").replace(extra / "c.png")
    with pytest.raises(UsfmaeError, match="cyst.*never occur in the training split"):
        check_labels(load_labelled_images(train_dir=str(root / "train"), validation_dir=str(root / "validation")))
    (extra / "c.png").unlink()
    extra.rmdir()
    (root / "train" / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    dataset = load_labelled_images(train_dir=str(root / "train"), validation_dir=str(root / "validation"))
    with pytest.raises(UnreadableImageError, match="benign/broken.png"):
        drop_unreadable(dataset, skip=False)
    kept = drop_unreadable(dataset, skip=True)
    assert len(kept["train"]) == len(dataset["train"]) - 1 and "benign/broken.png" not in kept["train"]["id"]


def test_dataset_name_source_gets_ids_and_shared_labels(tmp_path):
    root = make_speckle_folders(tmp_path / "set", {"train": 2, "test": 1})
    dataset = load_labelled_images(dataset_name=str(root))
    assert set(dataset) == {"train", "test"} and dataset["test"].features["label"].names == ["benign", "malignant"]
    assert dataset["test"]["id"] == ["test-0", "test-1"]
    with pytest.raises(UsfmaeError, match="exactly one data source"):
        load_labelled_images(dataset_name=str(root), train_dir=str(root / "train"))


def _finetune_args(model_dir: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return run_flags(
        model_dir,
        data,
        output,
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--eval_strategy",
        "no",
        "--logging_steps",
        "5",
        "--seed",
        "0",
        *extra,
    )


def test_finetune_beats_chance_with_mae_recipe_and_pushes(tiny_model_dir, speckle_data, tmp_path, hub_server):  # noqa: F811
    from huggingface_hub import ModelCard
    from transformers import HfArgumentParser, TrainingArguments

    from usfmae_hf.finetuning.run import DataArguments, ModelArguments, run_finetuning

    output = tmp_path / "run"
    args = _finetune_args(
        tiny_model_dir,
        speckle_data,
        output,
        "--recipe",
        "mae",
        "--blr",
        "0.1",
        "--max_steps",
        "16",
        "--push_to_hub",
        "--hub_model_id",
        "tester/usfmae-speckle",
        "--hub_token",
        "secret",
        "--license",
        "cc-by-4.0",
    )
    results = run_finetuning(
        *HfArgumentParser((ModelArguments, DataArguments, TrainingArguments)).parse_args_into_dataclasses(args)
    )
    recipe = results["recipe"]
    assert (recipe["head"], recipe["layer_decay"], recipe["mixup"], recipe["learning_rate"]) == (
        "mean",
        0.65,
        0.8,
        0.1 * 8 / 256,
    )
    # 12 test images, balanced: chance is 0.5; the classes differ only in echogenicity
    assert results["test_accuracy"] >= 0.9 and results["validation_accuracy"] >= 0.9, results
    assert results["test_roc_auc"] > 0.9
    saved = json.loads((output / "all_results.json").read_text())
    assert saved["test_confusion_matrix"] == results["test_confusion_matrix"]
    for name in (
        "test_predictions.csv",
        "test_confusion_matrix.png",
        "test_roc.png",
        "validation_roc.png",
        "modeling_usfmae.py",
        "preprocessor_config.json",
        "model.safetensors",
    ):
        assert (output / name).is_file(), name
    assert (output / "test_predictions.csv").read_text().splitlines()[0].startswith("id,label,label_name,prediction")
    card = ModelCard.load(output / "README.md")
    card_values = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert card.data.license == "cc-by-4.0" and "as declared by the publisher" in card.content
    assert card_values[("test", "accuracy")] == pytest.approx(results["test_accuracy"], abs=1e-4)
    # pushed once at the end: model, processor, code, card with these results; no Trainer pickle
    remote = hub_server.files("tester/usfmae-speckle")
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "modeling_usfmae.py",
        "all_results.json",
    } <= set(remote)
    assert remote["README.md"] == (output / "README.md").read_bytes() and "training_args.bin" not in remote


@pytest.mark.slow
def test_two_process_cpu_trainer(tiny_model_dir, speckle_data, tmp_path):
    output = tmp_path / "ddp"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO / "training" / "finetune_classification.py"),
        *_finetune_args(
            tiny_model_dir, speckle_data, output, "--head", "cls", "--max_steps", "3", "--learning_rate", "1e-3"
        ),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((output / "all_results.json").read_text())
    assert results["world_size"] == 2
    # distributed evaluation gathers every image exactly once
    assert results["test_num_samples"] == 12 and sum(results["test_support"]) == 12
    assert len((output / "test_predictions.csv").read_text().splitlines()) == 13


def _main(argv: list[str]) -> int:
    from usfmae_hf.finetuning.run import main

    return main(argv)


def test_start_and_end_summaries_name_the_plan_and_every_output(tiny_model_dir, speckle_data, tmp_path, capsys):
    output = tmp_path / "run"
    flags = ["--recipe", "mae", "--warmup_epochs", "1", "--max_steps", "6", "--save_strategy", "steps"]
    assert _main(_finetune_args(tiny_model_dir, speckle_data, output, *flags, "--save_steps", "3")) == 0
    printed = capsys.readouterr().out
    start = printed[printed.index("finetune_classification: training") :]
    assert "1 process (not distributed) on cpu, fp32" in start
    assert "effective batch 8 = 8 per device x 1 accumulation x 1 process" in start
    assert f"learning rate: peak {5e-4 * 8 / 256:.3g} = blr 0.0005 x 8 / 256; layer decay 0.65" in start
    # 24 images in batches of 8: 3 steps an epoch, so 1 warmup epoch is 3 steps
    assert "linear warmup over 1 epochs (3 steps), half-cycle cosine to 1e-06 at step 6" in start
    assert (
        "length: 6 optimizer steps = 2 epochs of 3 steps" in start and "data: train 24, validation 12, test 12" in start
    )
    assert f"output: {output.resolve()}" in start
    end = printed[printed.index("finetune_classification: done: 6 optimizer steps") :]
    results = json.loads((output / "all_results.json").read_text())
    assert f"test: Macro F1 {results['test_f1_macro']:.4g}, Accuracy {results['test_accuracy']:.4g}" in end
    assert "validation: Macro F1" in end and f"outputs in {output.resolve()}:" in end
    listed = {name.strip().rstrip("/") for line in end.splitlines()[4:] for name in line.split(":", 1)[1].split(",")}
    assert listed == {path.name for path in output.iterdir()}  # every output named
    assert "    checkpoints: checkpoint-3/, checkpoint-6/" in end and "    model card: README.md" in end


def test_launch_warning_when_a_multi_process_launch_gives_one_process():
    from usfmae_hf.finetuning.summary import launch_warning

    # ``accelerate launch --cpu --num_processes 2`` sets MASTER_ADDR / MASTER_PORT and starts one process
    assert "--multi_gpu" in launch_warning(1, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert "WORLD_SIZE=2" in launch_warning(1, {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    assert launch_warning(2, {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}) is None
    assert launch_warning(1, {}) is None


def test_previous_run_is_refused_then_replaced_with_overwrite_output_dir(
    tiny_model_dir, speckle_data, tmp_path, capsys
):
    output = tmp_path / "run"
    fast = ["--head", "cls", "--max_steps", "1"]
    assert _main(_finetune_args(tiny_model_dir, speckle_data, output, *fast)) == 0
    (output / "notes.txt").write_text("mine")
    # a later run without a test split: the old run's test files must not be left beside its outputs
    again = _finetune_args(tiny_model_dir, speckle_data, output, *fast)
    index = again.index("--test_dir")
    del again[index : index + 2]
    capsys.readouterr()
    assert _main(again) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "holds a previous run" in error and "--overwrite_output_dir" in error
    assert _main([*again, "--overwrite_output_dir"]) == 0
    names = {path.name for path in output.iterdir()}
    assert not any(name.startswith("test_") for name in names) and "notes.txt" in names
    assert "validation_predictions.csv" in names and "test_accuracy" not in json.loads(
        (output / "all_results.json").read_text()
    )


def test_resume_restores_the_checkpoint_model(tiny_model_dir, speckle_data, tmp_path):
    """The Trainer loads checkpoint tensors by name, but save_pretrained writes legacy ViT names: resume must
    still restore the fine-tuned encoder, not keep the --model_name_or_path one."""
    from safetensors.torch import load_file

    output = tmp_path / "run"
    flags = ["--head", "cls", "--learning_rate", "1e-2", "--save_strategy", "steps", "--save_steps", "2"]
    assert _main(_finetune_args(tiny_model_dir, speckle_data, output, *flags, "--max_steps", "2")) == 0
    saved = load_file(output / "checkpoint-2" / "model.safetensors")
    assert any(".attention.attention.query." in key for key in saved)  # legacy names on disk
    resumed = [*_finetune_args(tiny_model_dir, speckle_data, output, *flags, "--max_steps", "2")]
    assert _main([*resumed, "--resume_from_checkpoint", "latest"]) == 0  # no step left: the model as resumed
    final = load_file(output / "model.safetensors")
    assert saved.keys() == final.keys() and all(torch.equal(saved[key], final[key]) for key in saved)
    start = load_file(tiny_model_dir / "model.safetensors")
    query = "vit.encoder.layer.0.attention.attention.query.weight"
    assert not torch.equal(final[query], start[query])  # training moved the encoder: the check can fail


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory) -> Path:
    from conftest import TINY_MAE_KWARGS

    from usfmae_hf.model.conversion import convert_checkpoint
    from usfmae_hf.model.reference_mae import ReferenceMAE

    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    torch.save(ReferenceMAE.from_hf_config_kwargs({**TINY_MAE_KWARGS, "hidden_size": 48}).state_dict(), root / "w.pth")
    convert_checkpoint(root / "w.pth", root / "hf", num_attention_heads=2, decoder_num_attention_heads=2)
    return root / "hf"


def _checkpoint_of(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    return folder


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("wider", r"is another model: hidden_size 48 \(checkpoint\) vs 32 \(this run\)"),
        ("labels", r"labels \['x', 'y'\] \(checkpoint\) vs \['a', 'b'\]"),
        ("head", r"ViTForImageClassification \(checkpoint\) vs UsfmaeForImageClassification"),
        ("state_only", "has trainer_state.json but no model weights"),
        ("pretraining", "is a pretraining checkpoint .* --model_name_or_path .*model and without"),
        ("model_dir", "has no trainer_state.json: a model folder"),
        ("empty", "is empty: not a Trainer checkpoint"),
        ("missing", "is not a folder"),
        ("latest", "holds no checkpoint-N folder"),
    ],
)
def test_resume_checkpoint_checks_name_the_difference(make, message, tiny_model_dir, wide_model_dir, tmp_path):
    from usfmae_hf.errors import CheckpointError
    from usfmae_hf.finetuning.checks import resolve_resume_checkpoint
    from usfmae_hf.pretraining.checkpointing import TrainState

    model = build_classifier(tiny_model_dir, ["a", "b"], head="mean")
    folder = tmp_path / "checkpoint-2"
    if make == "wider":
        _checkpoint_of(build_classifier(wide_model_dir, ["a", "b"], head="mean"), folder)
    elif make == "labels":
        _checkpoint_of(build_classifier(tiny_model_dir, ["x", "y"], head="mean"), folder)
    elif make == "head":
        _checkpoint_of(build_classifier(tiny_model_dir, ["a", "b"], head="cls"), folder)
    elif make == "state_only":
        folder.mkdir()
        (folder / "trainer_state.json").write_text('{"global_step": 2}')
    elif make == "pretraining":
        folder.mkdir()
        TrainState(step=2).save(folder)  # what `usfmae pretrain` writes, beside model/
        (folder / "model").mkdir()
    elif make == "model_dir":
        model.save_pretrained(folder)
    elif make == "empty":
        folder.mkdir()
    target = "latest" if make == "latest" else str(folder)
    with pytest.raises(CheckpointError, match=message):
        resolve_resume_checkpoint(target, model, str(tmp_path))
    _checkpoint_of(model, tmp_path / "checkpoint-7")  # the same model: accepted, and found by "latest"
    assert resolve_resume_checkpoint("latest", model, str(tmp_path)) == str(tmp_path / "checkpoint-7")


def test_resume_of_another_width_fails_in_one_line_before_training(
    tiny_model_dir, wide_model_dir, speckle_data, tmp_path, capsys
):
    folder = _checkpoint_of(build_classifier(wide_model_dir, ["benign", "malignant"], head="cls"), tmp_path / "ck")
    argv = _finetune_args(tiny_model_dir, speckle_data, tmp_path / "run", "--head", "cls", "--max_steps", "2")
    assert _main([*argv, "--resume_from_checkpoint", str(folder)]) == 2
    error = capsys.readouterr().err  # after the model-loading progress bars: one line, no traceback
    assert "Traceback" not in error and "size mismatch" not in error
    last = error.strip().splitlines()[-1]
    assert last.startswith("finetune_classification: error: --resume_from_checkpoint") and "hidden_size 48" in last


def test_max_steps_zero_and_empty_class_folders_fail_in_one_line(tiny_model_dir, speckle_data, tmp_path, capsys):
    argv = _finetune_args(tiny_model_dir, speckle_data, tmp_path / "run", "--license", "Apache 2")
    assert _main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "finetune_classification: error: license 'Apache 2' is not a Hub license id (lower case, e.g. mit, "
        "apache-2.0, cc-by-4.0, cc-by-nc-4.0, other)"
    )
    argv = _finetune_args(tiny_model_dir, speckle_data, tmp_path / "run", "--max_steps", "0")
    assert _main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "finetune_classification: error: --max_steps 0 trains nothing: give a positive number of steps, or -1 (the "
        "default) to train for --num_train_epochs"
    )
    train = tmp_path / "train"
    for name in ("benign", "malignant", "cyst"):
        (train / name).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(train / "benign" / "a.png")
    (train / "malignant" / "b.dcm").write_bytes(b"DICM")
    argv = ["--model_name_or_path", str(tiny_model_dir), "--train_dir", str(train), "--output_dir", str(tmp_path / "o")]
    assert _main([*argv, "--use_cpu", "--report_to", "none"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "class folder(s) cyst, malignant hold no images (found only .dcm files)" in error[0]


@pytest.fixture(scope="module", params=["cls", "mean"])
def lora_run(request, tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A short LoRA run (``--head`` cls or mean) whose validation split has no malignant images: data, output."""
    root = tmp_path_factory.mktemp(f"lora_{request.param}")
    data = make_speckle_folders(root / "data", {"train": 4, "validation": 2, "test": 2})
    shutil.rmtree(data / "validation" / "malignant")
    output = root / "run"
    flags = ["--peft", "lora", "--head", request.param, "--max_steps", "3", "--learning_rate", "0.02"]
    assert _main(_finetune_args(tiny_model_dir, data, output, *flags)) == 0
    return data, output


def test_card_warns_of_a_class_absent_from_an_evaluated_split(lora_run):
    _, output = lora_run
    results = json.loads((output / "all_results.json").read_text())
    assert len(results["validation_warnings"]) == 1 and results["test_warnings"] == []
    card = (output / "README.md").read_text()
    evaluation = card[card.index("## Evaluation") : card.index("## Limitations")]
    warnings = [line for line in evaluation.splitlines() if line.startswith("> **Warning:** ")]
    assert warnings == [f"> **Warning:** {results['validation_warnings'][0]}"]
    assert "the validation split has no images of class(es) ['malignant']" in warnings[0]


def test_adapter_card_snippet_loads_the_adapter_and_predicts_as_the_run(lora_run, tmp_path):
    """The card's usage code, run as written (a fresh interpreter, offline) on the adapter folder and the local
    base model, prints the class probabilities the run's own evaluation wrote for that image."""
    data, output = lora_run
    files = {path.name for path in output.iterdir()}
    assert "adapter_model.safetensors" in files and "config.json" not in files  # an adapter, not a whole model
    image = "malignant/malignant_0.png"
    shutil.copy(data / "test" / image, tmp_path / "ultrasound.png")
    printed = run_python(usage_snippet(output / "README.md", str(output)), tmp_path)
    shown = dict(line.rsplit(": ", 1) for line in printed.strip().splitlines())
    with open(output / "test_predictions.csv", newline="") as handle:
        row = next(row for row in csv.DictReader(handle) if row["id"] == image)
    expected = {label: float(row[f"prob_{label}"]) for label in ("benign", "malignant")}
    assert abs(expected["malignant"] - 0.5) > 0.01  # trained away from 0.5 (an untrained mean head): the check can fail
    assert shown.keys() == expected.keys()
    for label, probability in shown.items():
        assert float(probability) == pytest.approx(expected[label], abs=6e-4)
