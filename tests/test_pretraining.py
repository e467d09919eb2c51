"""Tests for usfmae_hf.pretraining: init, optimizer groups, schedule, outputs, bad images, resume, 2 processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ports import free_port

from usfmae_hf.pretraining import DataArguments, ModelArguments, PretrainingArguments, main
from usfmae_hf.pretraining.modeling import (
    build_lr_scheduler,
    build_model,
    mae_sincos_position_table,
    parameter_groups,
    scaled_learning_rate,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "pretrain_mae.py"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def config_file(tiny_mae_config, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.json"
    tiny_mae_config.to_json_file(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """24 readable PNGs of assorted sizes and one corrupt file."""
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(24):
        pixels = rng.integers(0, 256, size=(36 + index, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"img_{index:02d}.png")
    (directory / "img_99_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return directory


def _args(model: list[str], image_dir: Path, output: Path, *extra: str) -> list[str]:
    return [
        *model,
        "--train_dir",
        str(image_dir),
        "--output_dir",
        str(output),
        "--dataloader_num_workers",
        "0",
        "--mixed_precision",
        "no",
        "--num_reconstruction_images",
        "2",
        "--max_bad_fraction",
        "0.1",
        "--seed",
        "3",
        *extra,
    ]


def _losses(output: Path) -> list[float]:
    return [record["loss"] for record in _records(output)]


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- model init, optimizer, schedule


def _numpy_mae_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's util/pos_embed.py, transcribed (including its h/w naming swap)."""

    def from_grid_1d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([from_grid_1d(embed_dim // 2, grid[0]), from_grid_1d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


@pytest.mark.parametrize("dim,grid", [(32, 4), (16, 4), (768, 14)])
def test_sincos_table_matches_mae_numpy(dim, grid):
    np.testing.assert_allclose(mae_sincos_position_table(dim, grid).numpy(), _numpy_mae_sincos(dim, grid), atol=1e-12)


def test_from_scratch_model_is_mae_initialised(config_file, tiny_mae_config):
    torch.manual_seed(0)
    model = build_model(model_name_or_path=None, config_name=config_file, mask_ratio=0.6, norm_pix_loss=True)
    assert model.config.mask_ratio == 0.6 and model.config.norm_pix_loss is True
    grid = tiny_mae_config.image_size // tiny_mae_config.patch_size
    encoder_table = torch.from_numpy(_numpy_mae_sincos(tiny_mae_config.hidden_size, grid)).float()
    decoder_table = torch.from_numpy(_numpy_mae_sincos(tiny_mae_config.decoder_hidden_size, grid)).float()
    assert torch.equal(model.vit.embeddings.position_embeddings[0], encoder_table)
    assert torch.equal(model.decoder.decoder_pos_embed[0], decoder_table)
    for token in (model.vit.embeddings.cls_token, model.decoder.mask_token):
        assert token.abs().sum() > 0 and token.std() < 0.1
    attention = model.vit.layers[0].attention
    bound = math.sqrt(6 / (tiny_mae_config.hidden_size * 4))  # xavier bound of MAE's fused (3D, D) qkv
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert projection.weight.abs().max() <= bound and projection.weight.abs().max() > 0.8 * bound
        assert torch.equal(projection.bias, torch.zeros_like(projection.bias))
    assert torch.equal(model.vit.layernorm.weight, torch.ones_like(model.vit.layernorm.weight))


def test_weight_decay_groups(tiny_mae_config):
    from transformers import ViTMAEForPreTraining

    model = ViTMAEForPreTraining(tiny_mae_config)
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "vit.layers.0.attention.q_proj.weight" in decayed and "decoder.decoder_pred.weight" in decayed
    assert "vit.embeddings.patch_embeddings.projection.weight" in decayed
    assert {"vit.embeddings.cls_token", "decoder.mask_token", "vit.layers.0.attention.q_proj.bias"} <= exempt
    assert {"vit.layernorm.weight", "decoder.decoder_norm.bias", "vit.layers.0.layernorm_before.weight"} <= exempt
    assert not any("position_embeddings" in n or "decoder_pos_embed" in n for n in decayed | exempt)  # frozen
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decayed | exempt) == sum(p.requires_grad for p in model.parameters())
    (everything,) = parameter_groups(model, 0.05, decay_all=True)  # USF-MAE: AdamW(model.parameters())
    assert everything["weight_decay"] == 0.05
    assert [id(p) for p in everything["params"]] == [id(p) for p in model.parameters() if p.requires_grad]


def test_continued_model_trains_in_fp32_with_fixed_position_tables(tiny_model_dir, tmp_path):
    from transformers import ViTMAEForPreTraining

    stored = ViTMAEForPreTraining.from_pretrained(tiny_model_dir).to(torch.bfloat16)
    stored.save_pretrained(tmp_path / "bf16")
    assert ViTMAEForPreTraining.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16  # transformers keeps it
    model = build_model(model_name_or_path=tmp_path / "bf16", config_name=None)
    assert {p.dtype for p in model.parameters()} == {torch.float32} and model.config.dtype == torch.float32
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["vit.embeddings.position_embeddings", "decoder.decoder_pos_embed"]  # MAE's fixed sin-cos
    for (name, value), original in zip(model.state_dict().items(), stored.state_dict().values()):
        assert torch.equal(value, original.float()), name


def _mae_adjust_learning_rate(epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """facebookresearch/mae util/lr_sched.py ``adjust_learning_rate``, transcribed (``epoch`` fractional)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def _schedule(peak: float, **kwargs) -> list[float]:
    """The lr of each update (and after the last), two parameter groups, stepped once per update as the trainer does."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": w} for w in (0.05, 0.0)]
    optimizer = torch.optim.AdamW(groups, lr=peak)
    scheduler = build_lr_scheduler(optimizer, **kwargs)
    values = []
    for _ in range(kwargs["total_steps"] + 1):
        group_lrs = [group["lr"] for group in optimizer.param_groups]
        assert group_lrs[0] == group_lrs[1] == scheduler.get_last_lr()[0]  # every group scaled alike
        values.append(group_lrs[0])
        optimizer.step()
        scheduler.step()
    return values


def test_learning_rate_schedule_and_scaling():
    assert scaled_learning_rate(1.5e-4, 4096) == pytest.approx(2.4e-3)
    values = _schedule(1.0, minimum=0.1, warmup_steps=10, total_steps=110)
    assert values[0] == 0.0
    assert values[5] == pytest.approx(0.5)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55)  # half-way down the cosine
    assert values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    with pytest.raises(Exception, match="positive"):
        _schedule(0.0, minimum=0.0, warmup_steps=1, total_steps=2)


@pytest.mark.parametrize("recipe", ["mae", "usfmae"])
def test_schedule_matches_mae_adjust_learning_rate(recipe):
    """Per-step lr of a recipe = MAE's per-iteration adjust_learning_rate at fractional epoch it/ipe + epoch."""
    from transformers import HfArgumentParser

    from usfmae_hf.pretraining.arguments import apply_recipe
    from usfmae_hf.pretraining.modeling import make_plan, peak_learning_rate

    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments))
    model_args, _, args = parser.parse_args_into_dataclasses(["--output_dir", "x", "--recipe", recipe])
    apply_recipe(model_args, args)
    iters_per_epoch = 7
    plan = make_plan(  # a loader of 7 batches of 256, no accumulation
        max_steps=None,
        num_train_epochs=args.num_train_epochs,
        micro_batches_per_epoch=iters_per_epoch,
        gradient_accumulation_steps=1,
        warmup_steps=None,
        warmup_ratio=args.warmup_ratio,
        peak_lr=peak_learning_rate(None, args.base_learning_rate, 256),
        min_lr=args.min_lr,
        effective_batch_size=256,
    )
    epochs = args.num_train_epochs
    warmup_epochs = args.warmup_ratio * epochs  # mae: 40 of 800, usfmae: 10 of 100
    assert plan.total_steps == epochs * iters_per_epoch
    assert plan.warmup_steps == warmup_epochs * iters_per_epoch  # warmup in steps = warmup_epochs x ipe
    values = _schedule(plan.peak_lr, minimum=args.min_lr, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps)
    for step, value in enumerate(values):
        epoch, it = divmod(step, iters_per_epoch)
        expected = _mae_adjust_learning_rate(
            it / iters_per_epoch + epoch,
            lr=plan.peak_lr,
            min_lr=args.min_lr,
            warmup_epochs=warmup_epochs,
            epochs=epochs,
        )
        assert abs(value - expected) <= 1e-12, (step, value, expected)


def test_recipe_presets_fill_only_unset_flags():
    from transformers import HfArgumentParser

    from usfmae_hf.pretraining.arguments import apply_recipe

    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments))
    model_args, _, args = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--recipe", "mae", "--norm_pix_loss", "false", "--adam_beta2", "0.99"]
    )
    filled = apply_recipe(model_args, args)
    assert (args.adam_beta1, args.adam_beta2, args.min_lr, args.max_grad_norm) == (0.9, 0.99, 0.0, 0.0)
    assert model_args.norm_pix_loss is False and model_args.mask_ratio == 0.75 and args.augmentation == "mae"
    assert args.mixed_precision == "fp16" and "mixed_precision" in filled and "adam_beta2" not in filled
    model_args, _, args = parser.parse_args_into_dataclasses(["--output_dir", "x", "--mixed_precision", "bf16"])
    assert "mixed_precision" not in apply_recipe(model_args, args) and args.mixed_precision == "bf16"
    model_args, _, args = parser.parse_args_into_dataclasses(["--output_dir", "x"])
    apply_recipe(model_args, args)
    assert (args.mixed_precision, args.adam_beta2, args.warmup_ratio, model_args.norm_pix_loss) == (
        "bf16",
        0.999,
        0.1,
        False,
    )


# ---------------------------------------------------------------- end-to-end runs


def _run_flags(accumulation: int) -> list[str]:
    """4 optimizer steps of 4-image micro-batches, checkpoints at steps 2 and 4 (keeping 1), MAE's recipe.

    MAE's: its lr scales with the effective batch and it trains full batches only (USF-MAE's short last
    batch would be topped up from the epoch's start on 2 processes and trained short on one). Its
    precision, fp16, is overridden by ``--mixed_precision no``.
    """
    return [
        "--recipe",
        "mae",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        str(accumulation),
        "--max_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--save_total_limit",
        "1",
        "--base_learning_rate",
        "1e-2",
        "--warmup_steps",
        "2",
        "--min_lr",
        "1e-5",
        "--logging_steps",
        "1",
    ]


RUN = _run_flags(accumulation=2)  # 8 images per step in one process


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, image_dir, tmp_path_factory) -> Path:
    """One uninterrupted single-process run continuing from the converted tiny model."""
    output = tmp_path_factory.mktemp("reference") / "run"
    assert main(_args(["--model_name_or_path", str(tiny_model_dir)], image_dir, output, *RUN)) == 0
    return output


def test_run_outputs(reference_run):
    output = reference_run
    records = _records(output)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(set(r) >= {"step", "loss", "lr", "images_per_sec", "bad_images"} for r in records)
    assert all(math.isfinite(r["loss"]) and r["images_per_sec"] > 0 for r in records)
    peak = 1e-2 * 4 * 2 / 256  # effective batch = 4 per device x 2 accumulation x 1 process
    expected = [_mae_adjust_learning_rate(s / 2, lr=peak, min_lr=1e-5, warmup_epochs=1, epochs=2) for s in range(4)]
    assert [r["lr"] for r in records] == pytest.approx(expected)
    assert sum(r["bad_images"] for r in records) >= 1  # the corrupt file was drawn, skipped and counted
    # rotation keeps only the newest checkpoint; each holds an HF model
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not list(output.glob(".checkpoint-*"))
    assert json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4
    assert (output / "training_curves.png").is_file()
    grids = sorted(p.name for p in (output / "reconstructions").iterdir())
    assert grids == ["step-00000002.png", "step-00000004.png"]
    assert Image.open(output / "reconstructions" / grids[-1]).format == "PNG"

    from safetensors import safe_open
    from transformers import AutoModel, ViTMAEForPreTraining, ViTMAEModel

    final = output / "final"
    with safe_open(final / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert "decoder.decoder_layers.0.attention.attention.query.weight" in keys  # legacy names: 4.x and 5.x read them
    assert not any("decoder_encoder" in key for key in keys)
    assert isinstance(AutoModel.from_pretrained(final), ViTMAEModel)
    reloaded = ViTMAEForPreTraining.from_pretrained(final)
    assert reloaded.config.mask_ratio == 0.75 and (final / "README.md").is_file()
    assert (final / "preprocessor_config.json").is_file()
    checkpoint_model = ViTMAEForPreTraining.from_pretrained(output / "checkpoint-4" / "model")
    for (name, a), b in zip(reloaded.state_dict().items(), checkpoint_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_too_many_bad_images_fails_loudly(config_file, image_dir, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for index, source in enumerate(sorted(image_dir.glob("img_0*.png"))[:8]):
        (mixed / f"good_{index}.png").write_bytes(source.read_bytes())
        (mixed / f"bad_{index}.png").write_bytes(b"garbage")
    code = main(
        _args(["--config_name", str(config_file)], mixed, tmp_path / "run", "--max_bad_fraction", "0.2")
        + ["--per_device_train_batch_size", "4", "--max_steps", "2", "--num_reconstruction_images", "0"]
    )
    assert code == 2
    assert "could not be decoded" in capsys.readouterr().err


def test_continued_pretraining_needs_a_decoder(tiny_vit_dir, image_dir, tmp_path):
    assert (
        main(["--model_name_or_path", str(tiny_vit_dir), "--train_dir", str(image_dir), "--output_dir", str(tmp_path)])
        == 2
    )


# ---------------------------------------------------------------- resume after SIGKILL


KILLABLE = textwrap.dedent(
    """
    import sys, time
    from usfmae_hf.pretraining import checkpointing, main, trainer

    def publish_then_hang(staging, output_dir, step, limit):
        if step == {hang_at}:  # staging written, rename pending: the worst moment to die
            print("HANGING", flush=True)
            time.sleep(3600)
        return checkpointing.publish(staging, output_dir, step, limit)

    trainer.publish = publish_then_hang
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_losses(reference_run, tiny_model_dir, image_dir, tmp_path):
    resumed = tmp_path / "resumed"
    args = _args(["--model_name_or_path", str(tiny_model_dir)], image_dir, resumed, *RUN)
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE.format(hang_at=4))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, env=env, text=True)
    try:
        for line in process.stdout:
            if "HANGING" in line:
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert (resumed / "checkpoint-2").is_dir() and (resumed / ".checkpoint-4.tmp").is_dir()
    assert not (resumed / "checkpoint-4").exists() and not (resumed / "final").exists()
    assert len(_records(resumed)) == 4  # steps 3-4 were logged after the last complete checkpoint

    assert main(args + ["--resume_from_checkpoint", "latest"]) == 0
    assert [r["step"] for r in _records(resumed)] == [1, 2, 3, 4]
    assert _losses(resumed) == _losses(reference_run)  # bit-identical: CPU, fp32, one process
    assert not list(resumed.glob(".checkpoint-*"))


# ---------------------------------------------------------------- 2 processes over gloo


@pytest.mark.slow
def test_two_processes_match_one_process(reference_run, tiny_model_dir, image_dir, tmp_path):
    """Same global batch (1 process x 4 x 2 accumulation vs 2 processes x 4): losses equal within 1e-5
    relative (only the reduction order differs); only rank 0 writes."""
    double = tmp_path / "double"
    run = _run_flags(accumulation=1)  # 8 images per step: 4 on each of 2 processes
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(SCRIPT),
        *_args(["--model_name_or_path", str(tiny_model_dir)], image_dir, double, *run),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    one, two = _records(reference_run), _records(double)
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # one line per step: only rank 0 logs
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    assert [r["lr"] for r in two] == pytest.approx([r["lr"] for r in one])  # effective batch counts processes

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    # accelerate stores one RNG file per process in a checkpoint; everything else is written once
    assert files(double) == sorted(files(reference_run) + ["checkpoint-4/random_states_1.pkl"])


# ---------------------------------------------------------------- datasets sources


@pytest.fixture(scope="module")
def parquet_build(image_dir, tmp_path_factory) -> Path:
    """A folder of Parquet shards with an ``image`` column, as `usfmae ingest` writes (one corrupt image)."""
    import datasets

    files = sorted(image_dir.glob("*.png"))
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": f.read_bytes(), "path": None} for f in files], "dataset": ["test"] * len(files)},
        features=datasets.Features({"image": datasets.Image(), "dataset": datasets.Value("string")}),
    )
    build = tmp_path_factory.mktemp("build")
    (build / "data").mkdir()
    for shard in range(2):
        table.shard(2, shard, contiguous=True).to_parquet(str(build / "data" / f"train-{shard:05d}-of-00002.parquet"))
    return build


def test_dataset_dir_source_skips_corrupt_images(parquet_build):
    from usfmae_hf.image.augment import build_train_transform
    from usfmae_hf.pretraining.data import MapStyleImages, SampleMaker, load_source

    source, column = load_source(dataset_dir=str(parquet_build), train_dir=None, dataset_name=None)
    assert column == "image" and len(source) == 25 and source.column_names == ["image"]
    dataset = MapStyleImages(source, SampleMaker(build_train_transform("usfmae", 32), 16, seed=0), column)
    corrupt = next(i for i in range(25) if source[i]["image"]["bytes"].endswith(b"truncated"))
    sample = dataset[corrupt]
    assert sample["num_bad"] == 1 and sample["pixel_values"].shape == (3, 32, 32)
    again = dataset[corrupt]
    assert torch.equal(sample["pixel_values"], again["pixel_values"]) and torch.equal(sample["noise"], again["noise"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[corrupt]["noise"], sample["noise"])  # new epoch, new augmentation and mask


def test_streaming_run_with_augmentation_on_device(parquet_build, config_file, image_dir, tmp_path):
    output = tmp_path / "stream"
    args = _args(
        ["--config_name", str(config_file)],
        parquet_build,
        output,
        "--streaming",
        "--shuffle_buffer_size",
        "8",
        "--augment_on_device",
        "--validation_dir",
        str(image_dir),
    )
    args[args.index("--train_dir")] = "--dataset_dir"
    assert main(args + ["--per_device_train_batch_size", "4", "--max_steps", "3", "--warmup_steps", "1"]) == 0
    assert [r["step"] for r in _records(output)] == [1, 2, 3]
    assert (output / "final" / "model.safetensors").is_file()
    assert [p.name for p in (output / "reconstructions").iterdir()] == ["step-00000003.png"]


# ---------------------------------------------------------------- precision, summaries, output folder


def test_bf16_autocast_run_trains_and_records_precision(tiny_model_dir, image_dir, tmp_path, capsys, monkeypatch):
    """bf16 autocast on CPU (asked for: emulated on CPUs without AMX / AVX-512 BF16, but it runs)."""
    from usfmae_hf.pretraining import trainer

    dtypes = []  # output dtype of an encoder linear layer, every forward pass

    def build_and_watch(**kwargs):
        model = build_model(**kwargs)
        model.vit.layers[0].mlp.fc1.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        return model

    monkeypatch.setattr(trainer, "build_model", build_and_watch)
    output = tmp_path / "bf16"
    flags = ["--per_device_train_batch_size", "4", "--max_steps", "8", "--learning_rate", "2e-3"]
    args = _args(["--model_name_or_path", str(tiny_model_dir)], image_dir, output, *flags, "--logging_steps", "4")
    args[args.index("--mixed_precision") + 1] = "bf16"
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert dtypes[:8] == [torch.bfloat16] * 8  # the 8 training forwards ran under bf16 autocast
    records = _records(output)
    losses = [r["loss"] for r in records]
    assert len(records) == 8 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert {r["precision"] for r in records} == {"bf16"}
    assert "precision bf16 autocast (requested)" in printed
    card = (output / "final" / "README.md").read_text()
    assert "bf16 autocast (requested)" in card

    # start summary: processes, device, batch, lr plan, data, output; end summary: final loss and outputs
    assert "processes: 1 (NO), device cpu" in printed
    assert "effective batch: 4 per process x 1 accumulation x 1 processes = 4" in printed
    # 10% of 8 steps, rounded down as USF-MAE's int()
    assert "lr plan: linear warmup 0 steps to peak 0.002, cosine to 1e-05 at step 8" in printed
    assert (
        "optimizer: AdamW, learning rate 0.002 (--learning_rate), weight decay 0.05 on all parameters, "
        "AdamW betas 0.9 / 0.999, gradient clipping 1\n" in printed
    )
    assert "warning: not one of USF-MAE's notebook runs: --learning_rate 0.002 replaces lr = blr x 128 / 256" in printed
    assert f"data: 25 images; output folder: {output}" in printed
    assert f"final loss {losses[-1]:.4f} at step 8" in printed
    for name in ("final", "log.jsonl", "training_curves.png", "reconstructions"):
        assert str(output / name) in printed and (output / name).exists()


def test_failed_run_can_be_started_over(config_file, image_dir, tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    (output / "log.jsonl").write_text('{"step": 1, "loss": 0.9, "lr"')  # died while writing its first record
    args = _args(["--config_name", str(config_file)], image_dir, output, "--per_device_train_batch_size", "4")
    args += ["--max_steps", "2", "--num_reconstruction_images", "0", "--logging_steps", "1"]
    assert main(args) == 0
    assert "starting over" in capsys.readouterr().out
    assert [r["step"] for r in _records(output)] == [1, 2]
    assert main(args) == 2  # now it holds a finished run
    assert "holds a run (final/)" in capsys.readouterr().err
    assert main(args + ["--overwrite_output_dir"]) == 0
    assert [r["step"] for r in _records(output)] == [1, 2]


def test_launch_that_starts_fewer_processes_than_asked_is_warned_about(config_file, image_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (it sets MASTER_PORT, not WORLD_SIZE)."""
    args = _args(["--config_name", str(config_file)], image_dir, tmp_path / "run", "--per_device_train_batch_size", "4")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        *args,
        "--max_steps",
        "1",
        "--num_reconstruction_images",
        "0",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: several processes asked for (MASTER_PORT is set without WORLD_SIZE" in result.stdout
    assert "processes: 1 (NO)" in result.stdout
    assert [r["step"] for r in _records(tmp_path / "run")] == [1]  # written once: one process ran


def _error_line(capsys) -> str:
    """The one line a failed run printed as its error."""
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    return line


# ---------------------------------------------------------------- resume checks


def test_resume_with_other_settings_fails_in_one_line(reference_run, tiny_model_dir, image_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    resume = ["--resume_from_checkpoint", "latest"]
    base = _args(["--model_name_or_path", str(tiny_model_dir)], image_dir, run, *RUN, *resume)
    assert main(base + ["--base_learning_rate", "2e-2"]) == 2
    line = _error_line(capsys)
    assert "cannot resume from" in line and "run peak_lr 0.0003125 in the checkpoint, 0.000625 now" in line

    wider = tmp_path / "wider.json"
    json.dump({**json.loads((tiny_model_dir / "config.json").read_text()), "hidden_size": 48}, wider.open("w"))
    assert main(_args(["--config_name", str(wider)], image_dir, run, *RUN, *resume)) == 2
    assert "architecture hidden_size 32 in the checkpoint, 48 now" in _error_line(capsys)


def test_checkpoint_without_scheduler_state_or_settings_resumes(
    reference_run, tiny_model_dir, image_dir, tmp_path, capsys
):
    """A checkpoint as older versions wrote it (no run_settings.json, no scheduler.bin) resumes exactly."""
    import shutil

    run = tmp_path / "run"
    args = _args(["--model_name_or_path", str(tiny_model_dir)], image_dir, run, *RUN, "--save_total_limit", "2")
    assert main(args) == 0
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "final")
    (run / "checkpoint-2" / "run_settings.json").unlink()
    assert not (run / "checkpoint-2" / "scheduler.bin").exists()
    resume = args + ["--resume_from_checkpoint", "latest"]

    assert main(resume + ["--weight_decay", "0.01"]) == 2  # read off the optimizer state instead
    assert "optimizer weight_decay 0.05/0 in the checkpoint, 0.01/0 now" in _error_line(capsys)

    assert main(resume) == 0
    assert "checkpoint-2 predates run_settings.json: compared its model config and optimizer state only" in (
        capsys.readouterr().out
    )
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4]
    assert _losses(run) == _losses(reference_run)
    assert [r["lr"] for r in _records(run)] == [r["lr"] for r in _records(reference_run)]
