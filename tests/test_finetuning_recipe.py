"""``--recipe mae`` is MAE's ``main_finetune.py``: per-step lr schedule, timm augmentation, mixup/cutmix, logged lr.

The references are transcriptions of MAE's code written here (``util/lr_sched.adjust_learning_rate``, the
per-iteration call in ``engine_finetune.train_one_epoch``, ``util/lr_decay.param_groups_lrd``'s layer ids) and
timm's own ``create_transform``, ``Mixup`` and ``SoftTargetCrossEntropy``.
"""

from __future__ import annotations

import json
import math
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.finetuning import build_classifier
from usfmae_hf.finetuning.recipe import ClassificationCollator, ClassificationLoss, MaeSchedule, UsfmaeTrainer

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --- MAE's schedule, transcribed ------------------------------------------------------------------------------


def mae_adjust_learning_rate(param_groups: list[dict], epoch: float, args: SimpleNamespace) -> float:
    """``util/lr_sched.adjust_learning_rate``."""
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    else:
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (
            1.0 + math.cos(math.pi * (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs))
        )
    for group in param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    return lr


def mae_lr_per_update(num_batches: int, args: SimpleNamespace, lr_scales: list[float]) -> list[list[float]]:
    """Group lrs set by ``engine_finetune.train_one_epoch`` at every ``accum_iter``-th batch, all epochs."""
    lrs = []
    for epoch in range(args.epochs):
        for data_iter_step in range(num_batches):
            if data_iter_step % args.accum_iter == 0:
                groups = [{"lr_scale": scale} for scale in lr_scales]
                mae_adjust_learning_rate(groups, data_iter_step / num_batches + epoch, args)
                lrs.append([group["lr"] for group in groups])
    return lrs


def mae_layer_scales(parameter_names: list[str], num_blocks: int, layer_decay: float) -> list[float]:
    """``param_groups_lrd``'s ``lr_scale`` of each parameter, MAE's names mapped from transformers' ones."""
    num_layers = num_blocks + 1
    scales = []
    for name in parameter_names:
        if name in ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings"):
            layer = 0  # cls_token, pos_embed
        elif name.startswith("vit.embeddings.patch_embeddings."):
            layer = 0  # patch_embed.*
        elif match := re.match(r"vit\.layers\.(\d+)\.", name):
            layer = int(match.group(1)) + 1  # blocks.N.*
        else:
            layer = num_layers  # fc_norm, head
        scales.append(layer_decay ** (num_layers - layer))
    return scales


class LearningRates(TrainerCallback):
    """Every parameter's lr at each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[int, float]] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append({id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]})


def _tensor_examples(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % 2} for i in range(count)]


@pytest.mark.parametrize(
    ("examples", "batch", "accumulation", "epochs", "warmup_epochs"),
    [(10, 2, 2, 3, 1), (12, 4, 1, 4, 2)],  # 5 batches in updates of 2 (+ a remainder); 3 batches, no accumulation
)
def test_mae_schedule_is_adjust_learning_rate_per_step(
    tiny_model_dir, tmp_path, examples, batch, accumulation, epochs, warmup_epochs
):
    from transformers import TrainingArguments

    lr, min_lr, layer_decay = 1e-2, 2e-3, 0.5
    model = build_classifier(tiny_model_dir, ["a", "b"], head="mean")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=epochs,
        learning_rate=lr,
        weight_decay=0.05,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        seed=0,
    )
    recorder = LearningRates()
    trainer = UsfmaeTrainer(
        model=model,
        args=args,
        train_dataset=_tensor_examples(examples),
        data_collator=ClassificationCollator(2),
        layer_decay=layer_decay,
        lr_schedule=MaeSchedule(warmup_epochs=warmup_epochs, min_lr=min_lr),
        callbacks=[recorder],
    )
    trainer.train()

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    parameters = [p for _, p in model.named_parameters() if p.requires_grad]
    scales = mae_layer_scales(names, model.config.num_hidden_layers, layer_decay)
    mae = SimpleNamespace(lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, epochs=epochs, accum_iter=accumulation)
    expected = mae_lr_per_update(math.ceil(examples / batch), mae, scales)
    assert len(recorder.steps) == len(expected) == epochs * math.ceil(math.ceil(examples / batch) / accumulation)
    worst = max(
        abs(step[id(p)] - want[k]) for step, want in zip(recorder.steps, expected) for k, p in enumerate(parameters)
    )
    assert worst <= 1e-12, worst
    assert min(min(row) for row in expected[1:]) > 0 and max(max(row) for row in expected) > 0.9 * lr  # not vacuous

    # ``learning_rate`` in the logs is the largest group's lr of the update just made (MAE's ``max_lr``)
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    np.testing.assert_allclose(logged, [max(row) for row in expected], rtol=0, atol=1e-12)


def test_recipe_mae_runs_main_finetune_schedule_and_augmentation(tiny_model_dir, tmp_path):
    """End to end through the flags: preset values, the per-step schedule of 5 warmup epochs, timm augmentation."""
    from transformers import HfArgumentParser, TrainingArguments

    from usfmae_hf.finetuning.run import DataArguments, ModelArguments, run_finetuning

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 2)):
        for name in ("a", "b"):
            (data / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (36, 40), dtype=np.uint8), "L").save(
                    data / split / name / f"{i}.png"
                )
    output = tmp_path / "run"
    flags = [
        "--model_name_or_path", str(tiny_model_dir), "--train_dir", str(data / "train"),
        "--test_dir", str(data / "test"), "--output_dir", str(output), "--recipe", "mae",
        "--per_device_train_batch_size", "4", "--num_train_epochs", "8", "--logging_steps", "1",
        "--save_strategy", "no", "--use_cpu", "--report_to", "none", "--seed", "0",
    ]  # fmt: skip
    parsed = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments)).parse_args_into_dataclasses(flags)
    results = run_finetuning(*parsed)
    recipe = results["recipe"]
    assert (recipe["lr_schedule"], recipe["warmup_epochs"], recipe["min_lr"], recipe["augment"]) == (
        "mae",
        5.0,
        1e-6,
        "mae_finetune",
    )
    peak = 5e-4 * 4 / 256  # blr * effective batch / 256
    assert recipe["learning_rate"] == peak
    mae = SimpleNamespace(lr=peak, min_lr=1e-6, warmup_epochs=5, epochs=8, accum_iter=1)
    expected_head = [row[0] for row in mae_lr_per_update(4, mae, [1.0])]  # the head's lr_scale is 1
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    logged = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert len(logged) == len(expected_head) == 32
    np.testing.assert_allclose(logged, expected_head, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("flags", "schedule"),
    [
        (["--recipe", "mae"], MaeSchedule(5.0, 1e-6)),
        (["--recipe", "mae", "--warmup_epochs", "2"], MaeSchedule(2.0, 1e-6)),
        (["--min_lr", "0"], MaeSchedule(5.0, 0.0)),
        (["--recipe", "mae", "--lr_scheduler_type", "cosine"], None),
        (["--recipe", "mae", "--warmup_steps", "3"], None),
        ([], None),
    ],
)
def test_lr_schedule_resolution(flags, schedule, tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    from usfmae_hf.finetuning.run import DataArguments, ModelArguments, lr_schedule_of, resolve_recipe

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    base = ["--model_name_or_path", "unused", "--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    model_args, _, training_args = parser.parse_args_into_dataclasses([*base, *flags])
    assert lr_schedule_of(resolve_recipe(model_args, training_args)) == schedule


def test_mae_and_trainer_schedule_flags_exclude_each_other(tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    from usfmae_hf.finetuning.run import DataArguments, ModelArguments, resolve_recipe

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, _, training_args = parser.parse_args_into_dataclasses(
        ["--model_name_or_path", "x", "--output_dir", str(tmp_path), "--warmup_epochs", "1", "--warmup_steps", "4"]
    )
    with pytest.raises(UsfmaeError, match="--warmup_epochs .* and --warmup_steps .* exclude each other"):
        resolve_recipe(model_args, training_args)


# --- augmentation ---------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_mae_finetune_augment_is_timm_create_transform(mode):
    from timm.data import create_transform

    from usfmae_hf.image.augment import build_train_transform

    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (45, 60) if mode == "L" else (45, 60, 3), dtype=np.uint8)
    image = Image.fromarray(array, mode)
    # util/datasets.build_transform(is_train=True) with main_finetune.py's defaults
    reference = create_transform(
        input_size=32,
        is_training=True,
        color_jitter=None,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    ours = build_train_transform("mae_finetune", 32)
    outputs = []
    for seed in range(8):
        _seed_everything(seed)
        expected = reference(image.convert("RGB"))  # torchvision's ImageFolder loader: convert("RGB")
        for source in (image, array):
            _seed_everything(seed)
            assert torch.equal(ours(source), expected), seed
        outputs.append(expected)
    assert all(not torch.equal(outputs[0], other) for other in outputs[1:])  # random per call


def test_posterize_to_zero_bits_is_black_as_in_maes_pillow():
    """RandAugment keeps 0 bits at magnitude 10; Pillow 13 refuses that, older Pillow (MAE's) gave black."""
    from timm.data.auto_augment import AugmentOp

    from usfmae_hf.image.augment import build_train_transform

    ops = [
        op for t in build_train_transform("mae_finetune", 32).transforms[-1].transforms for op in getattr(t, "ops", ())
    ]
    posterize = next(op for op in ops if op.name == "PosterizeIncreasing")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    fixed = {**posterize.hparams, "magnitude_std": 0.0}  # no magnitude noise: level 10 exactly
    strongest = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams=fixed)
    strongest.aug_fn = posterize.aug_fn
    # Pillow < 11's posterize: a lookup table keeping the top ``bits`` bits, ``i & ~(2 ** (8 - bits) - 1)``
    old_pillow = image.point([i & ~(2 ** (8 - 0) - 1) for i in range(256)] * 3)
    assert np.array_equal(np.array(strongest(image)), np.array(old_pillow)) and not np.array(old_pillow).any()
    try:  # timm's own op: black with an older Pillow, refused by Pillow 13
        timm_black = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams=fixed)(image)
    except ValueError as error:
        assert "bits" in str(error)
    else:
        assert np.array_equal(np.array(timm_black), np.array(old_pillow))
    milder = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5, hparams=fixed)
    reference = np.array(milder(image))  # timm's own op: 4 - int(5 / 10 * 4) = 2 bits
    milder.aug_fn = posterize.aug_fn
    assert np.array_equal(np.array(milder(image)), reference) and np.array_equal(reference, np.array(image) & 0xC0)


def test_mae_finetune_augment_has_no_joint_form():
    from usfmae_hf.image.augment import build_segmentation_transform, build_split_train_transform

    with pytest.raises(ValueError, match="no joint or split form"):
        build_segmentation_transform("mae_finetune", 32, train=True)
    with pytest.raises(ValueError, match="no joint or split form"):
        build_split_train_transform("mae_finetune", 32)


# --- mixup / cutmix -------------------------------------------------------------------------------------------


def _pair(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, 8, 8, generator=generator)
    labels = torch.tensor([0, 2])
    return pixels, labels, [{"pixel_values": pixels[i], "labels": int(labels[i]), "train": True} for i in range(2)]


def test_mixup_equals_timm_mixup_with_label_smoothing():
    """With the same lam, torchvision's MixUp + smoothing in the loss = timm's Mixup(label_smoothing) + soft CE."""
    from timm.data.mixup import Mixup
    from timm.loss import SoftTargetCrossEntropy

    class FixedLam(Mixup):
        def __init__(self, lam: float, **kwargs) -> None:
            super().__init__(**kwargs)
            self.fixed = lam

        def _params_per_batch(self):
            return self.fixed, False

    torch.manual_seed(0)
    collator = ClassificationCollator(3, mixup=0.8)
    logits = torch.randn(2, 3)
    for seed in range(5):
        pixels, labels, examples = _pair(seed)
        batch = collator(examples)
        lam = float(batch["labels"][0, 0])  # sample 0 keeps lam of its own class 0
        timm_mixup = FixedLam(lam, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)
        timm_pixels, timm_targets = timm_mixup(pixels.clone(), labels.clone())
        torch.testing.assert_close(batch["pixel_values"], timm_pixels, rtol=0, atol=1e-6)  # 2 samples: roll = flip
        ours = ClassificationLoss(label_smoothing=0.1)({"logits": logits}, batch["labels"])
        torch.testing.assert_close(ours, SoftTargetCrossEntropy()(logits, timm_targets), rtol=1e-6, atol=1e-7)


def test_mixup_lam_is_beta_and_cutmix_drawn_half_the_time():
    """MAE's Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5): lam ~ Beta(0.8, 0.8); cutmix p = 0.5."""
    from scipy import stats

    torch.manual_seed(0)
    collator = ClassificationCollator(3, mixup=0.8, cutmix=1.0)
    mixup_lams, cutmix = [], 0
    for seed in range(400):
        pixels, _, examples = _pair(seed)
        batch = collator(examples)
        lam = float(batch["labels"][0, 0])
        blended = batch["pixel_values"][0]
        from_self, from_other = torch.isclose(blended, pixels[0]), torch.isclose(blended, pixels[1])
        if bool((from_self | from_other).all()):  # every pixel is one of the two: a cutmix box
            cutmix += 1
            assert lam == pytest.approx(float(from_self[0].float().mean()), abs=1e-6)  # lam = area kept
        else:
            mixup_lams.append(lam)
            torch.testing.assert_close(blended, lam * pixels[0] + (1 - lam) * pixels[1])
    assert stats.binomtest(cutmix, 400, 0.5).pvalue > 1e-3, cutmix
    assert stats.kstest(mixup_lams, stats.beta(0.8, 0.8).cdf).pvalue > 1e-3


@pytest.mark.parametrize(
    ("batches", "accumulation", "warmup_epochs"), [(5, 2, 1), (5, 2, 1.5), (4, 1, 2.5), (7, 3, 0), (10, 1, 0.3)]
)
def test_warmup_steps_is_the_first_update_past_warmup_in_maes_loop(batches, accumulation, warmup_epochs):
    # The fractional epoch MAE passes to adjust_learning_rate at each update, in engine_finetune's loop
    epochs_at = [step / batches + epoch for epoch in range(6) for step in range(batches) if step % accumulation == 0]
    expected = next(index for index, epoch in enumerate(epochs_at) if epoch >= warmup_epochs)
    factor = MaeSchedule(warmup_epochs=warmup_epochs).factor(
        peak_lr=1e-3, batches_per_epoch=batches, accumulation=accumulation, total_steps=len(epochs_at)
    )
    assert factor.warmup_steps() == expected
    assert [factor.epoch_at(step) for step in range(len(epochs_at))] == pytest.approx(epochs_at, abs=1e-12)
