#!/usr/bin/env python
"""Benchmark: what bf16 autocast costs MAE pretraining, against fp32 over the same steps (issue 15).

Runs the real pretraining loop (`usfmae pretrain`, the library's `usfmae_hf.pretraining.main`) twice
from the same random initial weights, on the same images, with the same augmentation and masking
randomness (both come from `--seed`): once with `--mixed_precision fp32`, once with `bf16`. Prints
the two per-step loss curves, their largest absolute and relative difference, the difference of the
mean loss over the last half of the steps, and images/s of each (medians after --warmup steps), with
the CPU or GPU they ran on. bf16 is only faster where the hardware has bf16 matrix units (Intel AMX or
AVX-512 BF16, NVIDIA compute capability 8.0+); the script runs anywhere and says what it found.

    python benchmarks/bench_pretrain_precision.py [--steps 30] [--size base|small]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_pretrain import make_images, run_flags  # this folder is on sys.path when a script in it runs

from usfmae_hf.precision import cpu_flags, cpu_name

#: encoder/decoder shapes; ``base`` is USF-MAE's mae_vit_base_patch16_dec512d8b
SIZES = {
    "base": dict(layer_norm_eps=1e-6),
    "small": dict(
        layer_norm_eps=1e-6,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
        decoder_hidden_size=256,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=8,
        decoder_intermediate_size=1024,
    ),
}


def run(precision: str, config_file: Path, images: Path, output: Path, args) -> list[dict]:
    """One real pretraining run; its ``log.jsonl`` records (one per step)."""
    from usfmae_hf.pretraining import main

    flags = run_flags(config_file, images, output, args.batch_size, args.steps, precision) + [
        "--seed",
        "0",
        # one peak learning rate for both runs, at which the model learns in a few steps
        "--learning_rate",
        str(args.learning_rate),
        "--min_lr",
        "1e-6",
        "--warmup_steps",
        str(args.warmup),
    ]
    if main(flags):
        raise SystemExit(f"the {precision} run failed")
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each run (default: 30)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the speed (default: 2)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--learning_rate", type=float, default=1.5e-4, help="peak lr of both runs (default: 1.5e-4)")
    parser.add_argument("--size", choices=sorted(SIZES), default="base", help="model shape (default: base, ViT-B)")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    from transformers import ViTMAEConfig

    config = ViTMAEConfig(**SIZES[args.size])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config_file = tmp / "config.json"
        config.to_json_file(config_file)
        (tmp / "images").mkdir()
        make_images(tmp / "images", 4 * args.batch_size)
        curves = {
            precision: run(precision, config_file, tmp / "images", tmp / precision, args)
            for precision in ("fp32", "bf16")
        }

    fp32 = np.array([record["loss"] for record in curves["fp32"]])
    bf16 = np.array([record["loss"] for record in curves["bf16"]])
    half = len(fp32) // 2
    speed = {
        name: statistics.median(record["images_per_sec"] for record in records[args.warmup :])
        for name, records in curves.items()
    }
    if torch.cuda.is_available():  # accelerate trains on the GPU where there is one
        where = torch.cuda.get_device_name()
    else:
        flags = cpu_flags()
        units = [unit for unit in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if unit in flags]
        where = f"{cpu_name()} ({', '.join(units) or 'no AVX'}), {torch.get_num_threads()} threads"
    print(f"MAE pretraining, ViT-{args.size} /16 at 224 px, batch {args.batch_size}, {args.steps} steps; {where}")
    print("loss fp32: " + " ".join(f"{value:.4f}" for value in fp32))
    print("loss bf16: " + " ".join(f"{value:.4f}" for value in bf16))
    difference = np.abs(bf16 - fp32)
    print(
        f"largest |bf16 - fp32| {difference.max():.4f} (relative {(difference / np.abs(fp32)).max():.2%}), "
        f"step 1 {difference[0]:.2e}"
    )
    late_fp32, late_bf16 = fp32[half:].mean(), bf16[half:].mean()
    print(
        f"mean loss over the last {len(fp32) - half} steps: fp32 {late_fp32:.4f}, bf16 {late_bf16:.4f} "
        f"({(late_bf16 - late_fp32) / late_fp32:+.2%})"
    )
    print(
        f"images/s (median after {args.warmup} steps): fp32 {speed['fp32']:.2f}, bf16 {speed['bf16']:.2f} "
        f"({speed['bf16'] / speed['fp32']:.2f}x)"
    )


if __name__ == "__main__":
    main()
