"""``--recipe usfmae`` pretraining is USF-MAE's own notebook loop (``USF-MAE_pretraining.ipynb``).

The reference here is a transcription of that notebook's training loop in plain torch: ``AdamW(model.parameters(),
lr, weight_decay)`` with default betas, ``lr = blr * 128 / 256``, the lr set before every iteration (linear warmup
over ``int(10% of all iterations)``, then half-cycle cosine to 1e-5), backward, ``clip_grad_norm_(1.0)``, step,
``zero_grad``, every batch of a ``drop_last=False`` loader. Autocast is off on both sides (fp32) so that the two
can be compared to 1e-6; the batches and masking noise are those the package's loop fed its model, in order.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import HfArgumentParser, ViTMAEForPreTraining

from usfmae_hf.pretraining import DataArguments, ModelArguments, PretrainingArguments, main
from usfmae_hf.pretraining.arguments import apply_recipe, usfmae_grid_misses

IMAGES, BATCH, EPOCHS = 10, 4, 5  # 3 batches an epoch (4, 4, 2), 15 iterations, int(1.5) = 1 of warmup
BLR, WEIGHT_DECAY = 1e-3, 0.05  # a point of the notebook's grid
POSITION_TABLES = ("position_embeddings", "decoder_pos_embed")  # MAE's pos_embed, decoder_pos_embed: fixed


@pytest.fixture(scope="module")
def start_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with every weight but the position tables moved off MAE's init (biases and norms decay too)."""
    model = ViTMAEForPreTraining.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith(POSITION_TABLES):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    directory = tmp_path_factory.mktemp("start") / "model"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """IMAGES random 36x40 RGB PNGs."""
    directory = tmp_path_factory.mktemp("usfmae_images")
    stack = np.random.default_rng(1).integers(0, 256, size=(IMAGES, 36, 40, 3), dtype=np.uint8)
    for index, pixels in enumerate(stack):
        Image.fromarray(pixels).save(directory / f"{index:02d}.png")
    return directory


def _flags(start: Path, images: Path, output: Path, *extra: str) -> list[str]:
    """A tiny fp32 run in this process, no previews; ``extra`` adds or overrides flags."""
    return [
        *("--model_name_or_path", str(start), "--train_dir", str(images), "--output_dir", str(output)),
        *("--per_device_train_batch_size", str(BATCH), "--mixed_precision", "fp32", "--logging_steps", "1"),
        *("--dataloader_num_workers", "0", "--num_reconstruction_images", "0"),
        *extra,
    ]


def _card_table(model_dir: Path) -> dict[str, str]:
    """The model card's training table, setting -> value."""
    return dict(re.findall(r"^\| (.+?) \| `(.*)` \|$", (model_dir / "README.md").read_text(), flags=re.MULTILINE))


def _parse(*argv: str) -> tuple[ModelArguments, PretrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments))
    model_args, _, args = parser.parse_args_into_dataclasses(["--output_dir", "x", *argv])
    apply_recipe(model_args, args)
    return model_args, args


def _notebook_lr(iteration: int, *, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The notebook's ``adjust_learning_rate`` at a global iteration count."""
    if iteration < warmup:
        return max_lr * iteration / warmup
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (iteration - warmup) / (total - warmup)))


def _notebook_loop(
    start: Path, batches: list[tuple[torch.Tensor, torch.Tensor]], *, exempt_biases_and_norms: bool = False
) -> tuple[ViTMAEForPreTraining, list[float]]:
    """The notebook's training loop on ``batches``; return the trained model and the lr of every iteration.

    ``exempt_biases_and_norms`` gives 1-D tensors and tokens no decay, as MAE does: a loop that is not the notebook's.
    """
    model = ViTMAEForPreTraining.from_pretrained(start, dtype=torch.float32)
    model.train()
    for name, parameter in model.named_parameters():  # models_mae: nn.Parameter(..., requires_grad=False)
        if name.endswith(POSITION_TABLES):
            parameter.requires_grad_(False)
    learning_rate = BLR * 128 / 256
    if exempt_biases_and_norms:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        exempt = [p for n, p in named if p.ndim <= 1 or n.endswith(("cls_token", "mask_token"))]
        decayed = [p for n, p in named if not any(p is q for q in exempt)]
        groups = [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=WEIGHT_DECAY)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=WEIGHT_DECAY)
    total = math.ceil(IMAGES / BATCH) * EPOCHS  # len(train_loader) * num_epochs, drop_last=False
    warmup = int(total * 0.1)
    lrs = []
    for iteration, (pixel_values, noise) in enumerate(batches):
        lr = _notebook_lr(iteration, max_lr=learning_rate, min_lr=1.0e-5, warmup=warmup, total=total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(pixel_values=pixel_values, noise=noise).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        lrs.append(lr)
    return model, lrs


@pytest.fixture(scope="module")
def package_run(start_dir, images, tmp_path_factory) -> tuple[Path, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``pretrain_mae --recipe usfmae`` in fp32 for 5 epochs; returns its folder and the batches its model saw."""
    from usfmae_hf.pretraining import trainer

    seen, build_model = [], trainer.build_model

    def build_and_record(**kwargs):
        model = build_model(**kwargs)
        model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((kwargs["pixel_values"].clone(), kwargs["noise"].clone())),
            with_kwargs=True,
        )
        return model

    output = tmp_path_factory.mktemp("usfmae_run") / "run"
    grid_point = ("--base_learning_rate", str(BLR), "--weight_decay", str(WEIGHT_DECAY))
    argv = _flags(start_dir, images, output, "--recipe", "usfmae", "--num_train_epochs", str(EPOCHS), *grid_point)
    argv += ["--checkpointing_steps", "15"]  # at the last step, for its run_settings.json
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "build_model", build_and_record)
        assert main(argv) == 0
    return output, seen


def test_recipe_is_the_notebooks_training_loop(package_run, start_dir):
    output, batches = package_run
    assert [len(pixels) for pixels, _ in batches] == [4, 4, 2] * EPOCHS  # every image, the last batch short
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == list(range(1, len(batches) + 1))

    notebook, lrs = _notebook_loop(start_dir, batches)
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(BLR * 128 / 256)
    assert max(abs(record["lr"] - lr) for record, lr in zip(records, lrs)) <= 1e-12

    trained = dict(ViTMAEForPreTraining.from_pretrained(output / "final").named_parameters())

    def largest_difference(model: ViTMAEForPreTraining) -> tuple[float, str]:
        # softmax ignores the key bias: its gradient is rounding noise, which Adam scales up to the lr
        return max(
            ((trained[name] - p).abs().max().item(), name)
            for name, p in model.named_parameters()
            if not name.endswith("k_proj.bias")
        )

    difference, name = largest_difference(notebook)
    assert difference <= 1e-6, (name, difference)
    start = dict(ViTMAEForPreTraining.from_pretrained(start_dir).named_parameters())
    assert all(torch.equal(trained[name], start[name]) for name in trained if name.endswith(POSITION_TABLES))
    # the tolerance resolves what the old preset did differently: no decay on biases, norms and tokens
    assert largest_difference(_notebook_loop(start_dir, batches, exempt_biases_and_norms=True)[0])[0] > 1e-5


def test_card_and_settings_record_the_grid_point(package_run):
    output, _ = package_run
    table = _card_table(output / "final")
    assert table["recipe"] == "usfmae"
    assert table["learning rate"] == "0.0005 = blr 0.001 x 128 / 256"
    assert table["weight decay"] == "0.05 on all parameters"
    assert (
        table["USF-MAE grid point"]
        == "blr 0.001, weight decay 0.05 (of blr {0.0003, 0.001} x weight decay {0.01, 0.05})"
    )
    assert table["schedule"] == "linear warmup 1 of 15 steps, cosine to 1e-05"
    assert (table["AdamW betas"], table["gradient clipping"], table["last short batch"]) == ("0.9 / 0.999", "1", "kept")
    settings = json.loads((output / "checkpoint-15" / "run_settings.json").read_text())
    assert settings["optimizer"]["weight_decay"] == [WEIGHT_DECAY]  # one group: every parameter decays
    assert settings["run"]["peak_lr"] == BLR * 128 / 256 and settings["run"]["dataloader_drop_last"] is False


def test_mae_recipe_keeps_maes_optimizer(start_dir, images, tmp_path):
    """--recipe mae: lr = blr x effective batch / 256, no decay on biases and norms, full batches only."""
    output = tmp_path / "mae"
    flags = _flags(start_dir, images, output, "--recipe", "mae", "--max_steps", "3", "--checkpointing_steps", "3")
    assert main(flags) == 0
    table = _card_table(output / "final")
    assert table["learning rate"] == f"{1.5e-4 * 4 / 256:g} = blr 0.00015 x 4 / 256"
    assert table["weight decay"] == "0.05 on weight matrices (none on biases, norms, tokens)"
    assert "USF-MAE grid point" not in table and table["last short batch"] == "dropped"
    settings = json.loads((output / "checkpoint-3" / "run_settings.json").read_text())
    assert settings["optimizer"]["weight_decay"] == [0.05, 0.0] and settings["optimizer"]["betas"][0] == [0.9, 0.95]
    assert settings["run"]["dataloader_drop_last"] is True and settings["run"]["warmup_steps"] == 0  # round(0.15)


def test_resume_after_an_epochs_short_batch_continues_exactly(start_dir, images, tmp_path):
    """A checkpoint taken right after an epoch's short last batch resumes into the next epoch, bit for bit."""
    output = tmp_path / "run"
    argv = _flags(start_dir, images, output, "--max_steps", "6", "--checkpointing_steps", "3")

    def losses() -> list[float]:
        return [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()]

    assert main(argv) == 0
    uninterrupted = losses()
    assert json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())["epoch"] == 0  # 4 + 4 + 2 images
    shutil.rmtree(output / "checkpoint-6")
    shutil.rmtree(output / "final")
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    assert losses() == uninterrupted and len(uninterrupted) == 6


def test_recipes_fill_the_notebooks_and_maes_values():
    _, usfmae = _parse("--recipe", "usfmae")
    assert (usfmae.base_learning_rate, usfmae.weight_decay, usfmae.lr_scaling_batch_size) == (3e-4, 0.05, 128)
    assert (usfmae.adam_beta1, usfmae.adam_beta2, usfmae.max_grad_norm, usfmae.min_lr) == (0.9, 0.999, 1.0, 1e-5)
    assert usfmae.decay_all_parameters is True and usfmae.dataloader_drop_last is False
    _, mae = _parse("--recipe", "mae")
    assert (mae.base_learning_rate, mae.lr_scaling_batch_size, mae.adam_beta2) == (1.5e-4, None, 0.95)
    assert mae.decay_all_parameters is False and mae.dataloader_drop_last is True


@pytest.mark.parametrize(
    "argv,misses",
    [
        (["--base_learning_rate", "1e-3", "--weight_decay", "0.01"], []),
        (["--base_learning_rate", "1.5e-4"], ["--base_learning_rate 0.00015 is not in {0.0003, 0.001}"]),
        (["--weight_decay", "0.1"], ["--weight_decay 0.1 is not in {0.01, 0.05}"]),
        (["--learning_rate", "1e-3"], ["--learning_rate 0.001 replaces lr = blr x 128 / 256"]),
        (["--lr_scaling_batch_size", "64"], ["--lr_scaling_batch_size 64 replaces lr = blr x 128 / 256"]),
        (["--recipe", "mae"], []),
    ],
)
def test_values_off_the_notebooks_grid_are_named(argv, misses):
    assert usfmae_grid_misses(_parse(*argv)[1]) == misses
