#!/usr/bin/env python
"""Benchmark: MAE pretraining throughput of ViT-B/16 at 224 px, batch 8 (issues 5 and 15).

Measures in one run, on the same machine:
  (a) images/s of the real loop (`training/pretrain_mae.py`: PNG decoding, USF-MAE augmentations in
      DataLoader workers, masking, forward, backward, gradient clipping, AdamW, per-step log);
  (b) images/s of a bare loop over stock ``ViTMAEForPreTraining`` on random tensors at the same
      precision, batch, clipping and AdamW implementation (fused where the real loop uses it);
  (c) images/s of decoding + augmentation in one worker (one thread, as DataLoader workers run).
(a) and (b) alternate step by step (a b a b ...), so that a shared machine whose load changes slows
both alike: the real loop runs as ever, and after each of its steps the benchmark runs one bare step
and restarts the real loop's step clock, so that step's time is not counted as (a). The ratio is that
of the medians of the steady-state steps (the first --warmup left out). Targets: (a)/(b) >= 0.95;
(c) >= 4x (a). Also prints achieved TFLOP/s and, with
--peak_tflops, model FLOP utilisation (training = 3x the forward FLOPs of the encoder on visible tokens
plus the decoder on all tokens).

    python benchmarks/bench_pretrain.py [--steps 10] [--workers 1] [--mixed_precision auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from usfmae_hf.precision import cpu_name


def make_images(directory: Path, count: int) -> None:
    """Ultrasound-sized (640 x 480) grey PNGs with smooth structure and speckle."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    for index in range(count):
        base = 96 + 64 * np.sin(x / (30 + index) + y / 45)
        speckle = rng.gamma(2.0, 20.0, size=base.shape)
        Image.fromarray(np.clip(base + speckle - 40, 0, 255).astype(np.uint8), "L").save(
            directory / f"scan_{index:03d}.png"
        )


def run_flags(config_file: Path, images: Path, output: Path, batch_size: int, steps: int, precision: str) -> list[str]:
    """Flags of a real pretraining run that logs every step and draws no reconstruction figures."""
    return [
        "--config_name",
        str(config_file),
        "--train_dir",
        str(images),
        "--output_dir",
        str(output),
        "--per_device_train_batch_size",
        str(batch_size),
        "--max_steps",
        str(steps),
        "--mixed_precision",
        precision,
        "--num_reconstruction_images",
        "0",
        "--logging_steps",
        "1",
    ]


def transformer_flops(tokens: int, width: int, layers: int, mlp: int) -> float:
    """Forward FLOPs of ``layers`` pre-norm ViT blocks on ``tokens`` tokens (multiply-add = 2 FLOPs)."""
    projections = 2 * tokens * (4 * width * width + 2 * width * mlp)
    attention = 2 * 2 * tokens * tokens * width
    return layers * (projections + attention)


def training_flops_per_image(config) -> float:
    patches = (config.image_size // config.patch_size) ** 2
    visible = int(patches * (1 - config.mask_ratio)) + 1
    patch_embed = 2 * patches * 3 * config.patch_size**2 * config.hidden_size
    encoder = transformer_flops(visible, config.hidden_size, config.num_hidden_layers, config.intermediate_size)
    decoder = transformer_flops(
        patches + 1, config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_intermediate_size
    )
    heads = (
        2 * visible * config.hidden_size * config.decoder_hidden_size
        + 2 * patches * config.decoder_hidden_size * 3 * config.patch_size**2
    )
    return 3 * (patch_embed + encoder + decoder + heads)


class BareLoop:
    """Stock ``ViTMAEForPreTraining`` + AdamW on one fixed random batch, one step at a time."""

    def __init__(self, config, args, dtype: torch.dtype | None, fused: bool) -> None:
        from transformers import ViTMAEForPreTraining

        self.device = torch.device(args.device)
        self.model = ViTMAEForPreTraining(config).to(self.device).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=1e-4,
            betas=(0.9, 0.999),
            weight_decay=0.05,
            **({"fused": True} if fused else {}),
        )
        self.dtype = dtype
        self.pixel_values = torch.randn(args.batch_size, 3, config.image_size, config.image_size, device=self.device)
        self.rates: list[float] = []

    def step(self) -> None:
        """One step, its images/s appended to :attr:`rates`."""
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.model(pixel_values=self.pixel_values).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # wait for the device, as the real loop's per-step log does
        self.rates.append(len(self.pixel_values) / (time.perf_counter() - start))


def interleaved(config_file: Path, images: Path, output: Path, bare: BareLoop, args) -> list[float]:
    """Per-step images/s of the real loop (``--logging_steps 1``), a bare step run after each of its steps."""
    from usfmae_hf.pretraining import main, trainer

    end_of_step = trainer.Pretrainer._end_of_step

    def end_of_step_then_bare(self) -> None:
        end_of_step(self)  # logs this step: its time is already measured
        bare.step()
        self.stats.restart_clock()  # the bare step is not the real loop's time

    flags = run_flags(config_file, images, output, args.batch_size, args.steps, args.mixed_precision)
    flags += [] if args.workers is None else ["--dataloader_num_workers", str(args.workers)]
    trainer.Pretrainer._end_of_step = end_of_step_then_bare
    try:
        if main(flags + (["--torch_compile"] if args.torch_compile else [])):
            raise SystemExit("pretraining failed")
    finally:
        trainer.Pretrainer._end_of_step = end_of_step
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [record["images_per_sec"] for record in records]


def augmentation_per_worker(images: Path, image_size: int, seconds: float = 5.0) -> float:
    from usfmae_hf.image.augment import build_train_transform
    from usfmae_hf.pretraining.data import decode_image

    transform = build_train_transform("usfmae", image_size)
    files = sorted(images.glob("*.png"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            transform(decode_image(str(files[done % len(files)])))
            done += 1
        return done / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of each loop (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out (default: 2)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers of the real loop (default: the loop's own default for the device)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="bare-loop device")
    parser.add_argument(
        "--mixed_precision",
        default="fp32",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="precision of both loops (default: fp32; auto: bf16 where the hardware is fast at it)",
    )
    parser.add_argument("--torch_compile", action="store_true", help="compile the model in the real loop")
    parser.add_argument(
        "--peak_tflops", type=float, default=None, help="device peak TFLOP/s, for model FLOP utilisation"
    )
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    from transformers import ViTMAEConfig

    from usfmae_hf.pretraining.environment import describe, resolve_precision
    from usfmae_hf.pretraining.modeling import fused_adamw_supported

    device = torch.device(args.device)
    precision, _ = resolve_precision(args.mixed_precision, device)
    fused = fused_adamw_supported(device, "NO")
    config = ViTMAEConfig(layer_norm_eps=1e-6)  # mae_vit_base_patch16_dec512d8b, USF-MAE's architecture
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config_file = tmp / "config.json"
        config.to_json_file(config_file)
        (tmp / "images").mkdir()
        make_images(tmp / "images", 4 * args.batch_size)
        augment = augmentation_per_worker(tmp / "images", config.image_size)
        bare_loop = BareLoop(config, args, None if precision.name == "fp32" else precision.dtype, fused)
        real = interleaved(config_file, tmp / "images", tmp / "run", bare_loop, args)[args.warmup :]
        bare = bare_loop.rates[args.warmup :]

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    real_rate, bare_rate = statistics.median(real), statistics.median(bare)
    flops = training_flops_per_image(config)
    print(
        f"ViT-B/16 MAE, 224 px, batch {args.batch_size}, {describe(precision)}, {'fused' if fused else 'default'} AdamW"
    )
    print(f"{name}; load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print("per step (a): " + " ".join(f"{rate:.3f}" for rate in real))
    print("per step (b): " + " ".join(f"{rate:.3f}" for rate in bare))
    print(f"(a) real loop (data + augmentation + step): {real_rate:8.3f} images/s (median of {len(real)} steps)")
    print(f"(b) bare ViTMAEForPreTraining loop:         {bare_rate:8.3f} images/s (median of {len(bare)} steps)")
    print(f"(c) decode + augmentation, one worker:      {augment:8.2f} images/s")
    print(f"(a)/(b) = {real_rate / bare_rate:.3f}   [target >= 0.95]")
    print(f"(c)/(a) = {augment / real_rate:.2f}x per worker   [target >= 4x]")
    achieved = real_rate * flops / 1e12
    line = f"training FLOPs/image {flops / 1e9:.1f} GFLOP; real loop {achieved:.3f} TFLOP/s"
    if args.peak_tflops:
        line += f", model FLOP utilisation {achieved / args.peak_tflops:.1%} of {args.peak_tflops} TFLOP/s"
    print(line)


if __name__ == "__main__":
    main()
