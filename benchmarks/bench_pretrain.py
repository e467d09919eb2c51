#!/usr/bin/env python
"""Benchmark: MAE pretraining throughput of ViT-B/16 at 224 px, batch 8 (issue 5).

Measures in one run, on the same machine:
  (a) images/s of the real loop (`training/pretrain_mae.py`: PNG decoding, USF-MAE augmentations in
      DataLoader workers, masking, forward, backward, AdamW), median over steady-state steps;
  (b) images/s of a bare loop over stock ``ViTMAEForPreTraining`` on random tensors (same optimizer);
  (c) images/s of decoding + augmentation in one worker (one thread, as DataLoader workers run).
Targets: (a)/(b) >= 0.95; (c) >= 4x (a). Also prints achieved TFLOP/s and, with --peak_tflops,
model FLOP utilisation (training = 3x the forward FLOPs of the encoder on visible tokens plus the
decoder on all tokens).

    python benchmarks/bench_pretrain.py [--steps 6] [--workers 2] [--device cuda --mixed_precision bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


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


def real_loop(config_file: Path, images: Path, output: Path, args) -> float:
    from usfmae_hf.pretraining import main

    code = main(
        [
            "--config_name",
            str(config_file),
            "--train_dir",
            str(images),
            "--output_dir",
            str(output),
            "--per_device_train_batch_size",
            str(args.batch_size),
            "--max_steps",
            str(args.steps),
            "--dataloader_num_workers",
            str(args.workers),
            "--mixed_precision",
            args.mixed_precision,
            "--num_reconstruction_images",
            "0",
            "--logging_steps",
            str(args.steps),
        ]
        + (["--torch_compile"] if args.torch_compile else [])
    )
    if code:
        raise SystemExit(f"pretraining failed with exit code {code}")
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_sec"] for r in records[args.warmup :])


def bare_loop(config, args) -> float:
    from transformers import ViTMAEForPreTraining

    device = torch.device(args.device)
    model = ViTMAEForPreTraining(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    pixel_values = torch.randn(args.batch_size, 3, config.image_size, config.image_size, device=device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(pixel_values=pixel_values).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return args.batch_size / statistics.median(times[args.warmup :])


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
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per loop (default: 6)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median (default: 2)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the real loop (default: 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="bare-loop device")
    parser.add_argument(
        "--mixed_precision", default="no", choices=["no", "bf16", "fp16"], help="autocast (default: fp32)"
    )
    parser.add_argument("--torch_compile", action="store_true", help="compile the model in the real loop")
    parser.add_argument(
        "--peak_tflops", type=float, default=None, help="device peak TFLOP/s, for model FLOP utilisation"
    )
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    from transformers import ViTMAEConfig

    config = ViTMAEConfig(layer_norm_eps=1e-6)  # mae_vit_base_patch16_dec512d8b, USF-MAE's architecture
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config_file = tmp / "config.json"
        config.to_json_file(config_file)
        (tmp / "images").mkdir()
        make_images(tmp / "images", 4 * args.batch_size)
        augment = augmentation_per_worker(tmp / "images", config.image_size)
        bare = bare_loop(config, args)
        real = real_loop(config_file, tmp / "images", tmp / "run", args)

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    flops = training_flops_per_image(config)
    print(f"ViT-B/16 MAE, 224 px, batch {args.batch_size}, precision {args.mixed_precision}, {device}")
    print(f"(a) real loop (data + augmentation + step): {real:8.2f} images/s")
    print(f"(b) bare ViTMAEForPreTraining loop:         {bare:8.2f} images/s")
    print(f"(c) decode + augmentation, one worker:      {augment:8.2f} images/s")
    print(f"(a)/(b) = {real / bare:.3f}   [target >= 0.95]")
    print(f"(c)/(a) = {augment / real:.2f}x per worker   [target >= 4x]")
    achieved = real * flops / 1e12
    line = f"training FLOPs/image {flops / 1e9:.1f} GFLOP; real loop {achieved:.3f} TFLOP/s"
    if args.peak_tflops:
        line += f", model FLOP utilisation {achieved / args.peak_tflops:.1%} of {args.peak_tflops} TFLOP/s"
    print(line)


if __name__ == "__main__":
    main()
