"""Tests for what surrounds the pretraining loop: precision, launch checks, plans, logs, loaders, resume checks.

End-to-end runs are in test_pretraining.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from usfmae_hf.errors import CheckpointError, OutputExistsError, UsfmaeError
from usfmae_hf.pretraining.checkpointing import TrainState, batches_to_skip, check_resumable, prepare_output_dir
from usfmae_hf.pretraining.data import MIN_SAMPLES_FOR_BAD_CHECK, check_bad_fraction
from usfmae_hf.pretraining.environment import check_process_count, resolve_precision
from usfmae_hf.pretraining.modeling import Plan, build_lr_scheduler, build_optimizer
from usfmae_hf.pretraining.reporting import StepLog, StepStats
from usfmae_hf.pretraining.summary import lr_plan_warnings

CPU = torch.device("cpu")
AVX512_BF16 = frozenset({"sse2", "avx2", "avx512f", "avx512_bf16"})
AVX2_ONLY = frozenset({"sse2", "avx2", "fma"})


# ---------------------------------------------------------------- precision


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has the given /proc/cpuinfo flags."""

    def pretend(flags: frozenset[str]) -> None:
        monkeypatch.setattr("usfmae_hf.precision.cpu_flags", lambda cpuinfo=None: flags)

    return pretend


def test_auto_is_bf16_only_where_the_cpu_is_fast_at_it(cpu_with):
    cpu_with(AVX512_BF16)
    precision, note = resolve_precision("auto", CPU)
    assert (precision.name, precision.dtype, note) == ("bf16", torch.bfloat16, "")
    assert "AVX-512 BF16" in precision.reason
    cpu_with(AVX2_ONLY)
    precision, note = resolve_precision("auto", CPU)
    assert (precision.name, precision.dtype, note) == ("fp32", torch.float32, "")


@pytest.mark.parametrize("flags,expected", [(AVX512_BF16, "bf16"), (AVX2_ONLY, "fp32")])
def test_recipe_precision_is_honoured_only_where_fast(cpu_with, flags, expected):
    cpu_with(flags)
    precision, note = resolve_precision("bf16", CPU, recipe="usfmae")  # USF-MAE's preset
    assert precision.name == expected
    assert "recipe usfmae" in (precision.reason if expected == "bf16" else note)
    precision, note = resolve_precision("fp16", CPU, recipe="mae")  # MAE's fp16 never runs on a CPU
    assert precision.name == expected and "recipe mae asks for fp16" in note


def test_precision_given_on_the_command_line_is_honoured(cpu_with):
    cpu_with(AVX2_ONLY)
    precision, note = resolve_precision("bf16", CPU)
    assert precision.name == "bf16" and "emulated" in note  # slow here, but asked for
    for name in ("no", "fp32"):
        assert resolve_precision(name, CPU)[0].name == "fp32"
    with pytest.raises(UsfmaeError, match="--mixed_precision fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


# ---------------------------------------------------------------- launch checks


@pytest.mark.parametrize(
    "environ,running,expected",
    [
        ({}, 1, ""),
        ({"WORLD_SIZE": "2"}, 2, ""),
        ({"ACCELERATE_NUM_PROCESSES": "2"}, 2, ""),
        ({"ACCELERATE_NUM_PROCESSES": "2"}, 1, "2 processes asked for (ACCELERATE_NUM_PROCESSES=2) but 1 running"),
        # `accelerate launch --cpu --num_processes 2` sets MASTER_PORT, not WORLD_SIZE, and starts one process
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, 1, "several processes asked for"),
        ({"MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "0"}, 2, ""),
    ],
)
def test_process_count_check(environ, running, expected):
    warning = check_process_count(running, environ)
    assert (expected in warning) if expected else warning == ""
    if expected:
        assert "ACCELERATE_USE_CPU=1" in warning


def test_ranks_training_alone_is_an_error():
    """torchrun without ACCELERATE_USE_CPU on a CPU-only machine: every rank would write the same folder."""
    with pytest.raises(UsfmaeError, match="WORLD_SIZE=2 but this process trains alone"):
        check_process_count(1, {"WORLD_SIZE": "2", "RANK": "1"})


# ---------------------------------------------------------------- plans and schedules


def test_min_lr_at_or_above_the_peak_is_warned_about():
    peak = 1.5e-4 * 8 / 256  # batch 8 at MAE's blr: 4.7e-6, below USF-MAE's floor of 1e-5
    (warning,) = lr_plan_warnings(Plan(100, 10, peak, 1e-5, 8))
    assert "--min_lr 1e-05" in warning and "4.69e-06" in warning and "climbs" in warning
    assert "stays flat" in lr_plan_warnings(Plan(100, 10, 1e-5, 1e-5, 8))[0]
    assert lr_plan_warnings(Plan(100, 10, 1.5e-4 * 64 / 256, 1e-5, 64)) == []
    assert "never decays" in lr_plan_warnings(Plan(10, 10, 1e-3, 0.0, 64))[0]


def _cosine_with_warmup(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    """MAE's adjust_learning_rate in steps, written out independently."""
    if step < warmup:
        return peak * step / warmup
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("start", [0, 3, 10, 19])
def test_schedule_started_at_a_step_continues_the_curve(start):
    """A resumed run rebuilds its schedule at the checkpoint's step; its lrs are the uninterrupted curve's."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": w} for w in (0.05, 0.0)]
    optimizer = torch.optim.AdamW(groups, lr=2e-3)
    scheduler = build_lr_scheduler(optimizer, minimum=1e-5, warmup_steps=5, total_steps=20, start_step=start)
    for step in range(start, 21):
        expected = _cosine_with_warmup(step, 2e-3, 1e-5, 5, 20)
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([expected] * 2, rel=1e-12, abs=0)
        optimizer.step()
        scheduler.step()


def test_fused_adamw_matches_the_per_tensor_loop(tiny_mae_config):
    """The fused kernel the loop uses on CPU computes what torch's reference for-loop AdamW does."""
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(0)
    reference = ViTMAEForPreTraining(tiny_mae_config)
    fused = ViTMAEForPreTraining(tiny_mae_config)
    fused.load_state_dict(reference.state_dict())
    settings = dict(lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8)
    optimizers = [
        build_optimizer(reference, **settings, fused=False),
        build_optimizer(fused, **settings, fused=True),
    ]
    assert optimizers[0].defaults["fused"] in (None, False) and optimizers[1].defaults["fused"] is True
    pixels, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    for _ in range(5):
        for model, optimizer in zip((reference, fused), optimizers):
            model(pixel_values=pixels, noise=noise).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(reference.named_parameters(), fused.parameters()):
        if name.endswith("k_proj.bias"):  # softmax ignores it: its gradient is rounding noise, which Adam scales to lr
            continue
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- per-step statistics and the log


class _OneProcess:
    """The one call of an ``Accelerator`` that StepStats makes, for a single process."""

    @staticmethod
    def reduce(tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return tensor


def test_step_stats_read_back_once_per_window():
    stats = StepStats(CPU)
    micro_losses = [[1.0, 3.0], [0.5, 0.25]]  # two optimizer steps of two micro-batches
    for step, losses in enumerate(micro_losses, start=1):
        for loss in losses:
            stats.add_micro_batch(torch.tensor(loss, requires_grad=True) * 1, 4, torch.tensor(step - 1))
        stats.end_step(step=step, lr=0.1 * step)
    records = stats.flush(_OneProcess())
    assert [r["step"] for r in records] == [1, 2] and [r["lr"] for r in records] == [0.1, 0.2]
    assert [r["loss"] for r in records] == [2.0, 0.375]  # mean over the step's micro-batches
    assert [(r["images"], r["bad_images"]) for r in records] == [(8, 0), (8, 2)]
    assert records[0]["images_per_sec"] == records[1]["images_per_sec"] > 0  # the window's throughput
    assert stats.flush(_OneProcess()) == []


def test_log_of_a_killed_run_is_read_without_its_cut_off_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + '{"step": 2, "lo')
    assert StepLog(path).records() == [{"step": 1, "loss": 1.0}]
    path.write_text('{"step": 1, "lo\n' + json.dumps({"step": 2, "loss": 1.0}) + "\n")
    with pytest.raises(UsfmaeError, match="line 1 is not JSON"):
        StepLog(path).records()


def test_dataloader_workers_use_one_thread_and_leave_the_main_process_alone():
    from torch.utils.data import Dataset

    from usfmae_hf.pretraining.data import build_dataloader

    class ThreadCounts(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> dict:
            return {
                "pixel_values": torch.zeros(1),
                "noise": torch.zeros(1),
                "augment_seed": torch.get_num_threads(),  # the count where the sample is made
                "num_bad": 0,
            }

    threads = torch.get_num_threads()
    batches = list(build_dataloader(ThreadCounts(), batch_size=2, num_workers=2))
    assert [batch["augment_seed"].tolist() for batch in batches] == [[1, 1], [1, 1]]
    assert torch.get_num_threads() == threads
    (batch,) = list(build_dataloader(ThreadCounts(), batch_size=4, num_workers=0))
    assert batch["augment_seed"].tolist() == [threads] * 4


@pytest.mark.parametrize(
    "device,cpus,workers", [("cpu", 2, 0), ("cpu", 4, 0), ("cpu", 16, 2), ("cuda", 2, 1), ("cuda", 64, 4)]
)
def test_default_workers_leave_a_small_cpu_to_training(device, cpus, workers):
    from usfmae_hf.pretraining.data import default_num_workers

    assert default_num_workers(torch.device(device), cpus) == workers


# ---------------------------------------------------------------- output folder


def test_output_folder_holding_a_run_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "final").mkdir()
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds a run .*checkpoint-2, final/.*--overwrite_output_dir"):
        prepare_output_dir(tmp_path, resuming=False, overwrite=False)
    with pytest.raises(UsfmaeError, match="give one"):
        prepare_output_dir(tmp_path, resuming=True, overwrite=True)
    note = prepare_output_dir(tmp_path, resuming=False, overwrite=True)
    assert "removed checkpoint-2, log.jsonl, final" in note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's own outputs go


def test_log_of_a_failed_run_does_not_block_a_fresh_start(tmp_path):
    (tmp_path / "log.jsonl").write_text("")  # failed before its first step
    (tmp_path / ".checkpoint-3.tmp").mkdir()  # killed while saving
    assert "starting over" in prepare_output_dir(tmp_path, resuming=False, overwrite=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- resume checks


def _settings(**run) -> dict:
    return {
        "architecture": {"hidden_size": 32, "num_hidden_layers": 2, "mask_ratio": 0.75},
        "optimizer": {"tensors": [10, 20], "values": [5000, 300], "weight_decay": [0.05, 0.0]},
        "run": {"effective_batch_size": 8, "peak_lr": 3.125e-4, "total_steps": 4, **run},
        "precision": "fp32",
    }


def _checkpoint(tmp_path: Path, settings: dict) -> Path:
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "run_settings.json").write_text(json.dumps(settings))
    return checkpoint


def test_matching_settings_resume(tmp_path):
    checkpoint = _checkpoint(tmp_path, _settings())
    current = {**_settings(), "precision": "bf16"}
    assert check_resumable(checkpoint, current) == ["checkpoint-2 trained in fp32; continuing in bf16"]


@pytest.mark.parametrize(
    "section,change,named",
    [
        ("architecture", {"hidden_size": 48}, "architecture hidden_size 32 in the checkpoint, 48 now"),
        ("optimizer", {"tensors": [10, 21]}, "optimizer tensors 10/20 in the checkpoint, 10/21 now"),
        ("optimizer", {"weight_decay": [0.01, 0.0]}, "optimizer weight_decay 0.05/0 in the checkpoint, 0.01/0 now"),
        ("run", {"peak_lr": 6.25e-4}, "run peak_lr 0.0003125 in the checkpoint, 0.000625 now"),
        ("run", {"effective_batch_size": 16}, "run effective_batch_size 8 in the checkpoint, 16 now"),
    ],
)
def test_a_mismatch_is_one_line_naming_it(tmp_path, section, change, named):
    checkpoint = _checkpoint(tmp_path, _settings())
    current = _settings()
    current[section] = {**current[section], **change}
    with pytest.raises(CheckpointError) as raised:
        check_resumable(checkpoint, current)
    message = str(raised.value)
    assert "\n" not in message and named in message and str(checkpoint / "model") in message


@pytest.mark.parametrize("per_device,processes,skip", [(4, 2, 3), (8, 1, 3), (2, 4, 3), (1, 8, 3)])
def test_resume_skips_the_epoch_s_consumed_batches_at_any_process_count(per_device, processes, skip):
    # 24 samples into the epoch at a global micro-batch of 8, however it is split across processes.
    assert batches_to_skip(TrainState(samples_in_epoch=24), per_device, processes) == skip


def test_resume_with_another_global_batch_is_refused_in_one_line():
    with pytest.raises(UsfmaeError, match="24 samples into the epoch is not a multiple of the global micro-batch 16"):
        batches_to_skip(TrainState(samples_in_epoch=24), 8, 2)


def test_bad_image_rate_waits_for_enough_samples_until_the_end():
    few = MIN_SAMPLES_FOR_BAD_CHECK // 4
    check_bad_fraction(few, few, 0.1, final=False)  # half unreadable, but too few samples to judge yet
    with pytest.raises(UsfmaeError, match=rf"{few} of {2 * few} samples could not be decoded \(50.0% > "):
        check_bad_fraction(few, few, 0.1, final=True)
    with pytest.raises(UsfmaeError, match="--max_bad_fraction 10.0%"):
        check_bad_fraction(MIN_SAMPLES_FOR_BAD_CHECK, MIN_SAMPLES_FOR_BAD_CHECK, 0.1, final=False)
    check_bad_fraction(9 * MIN_SAMPLES_FOR_BAD_CHECK, MIN_SAMPLES_FOR_BAD_CHECK, 0.1, final=True)  # exactly 10%
    check_bad_fraction(0, 0, 0.0, final=True)  # nothing read: nothing to judge
