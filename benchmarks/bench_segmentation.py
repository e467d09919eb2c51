#!/usr/bin/env python
"""Benchmark: segmentation fine-tuning step throughput against the bare model, and ViT-B/16 inference at 224.

Measures in one run, on the same machine, with the same DPT model built on a ViT-B/16 USF-MAE encoder:
  (a) images/s of the package's Trainer loop (``usfmae_hf.finetuning.segmentation``: joint transforms in
      the DataLoader, the Dice + CE loss, layer-wise lr decay, AdamW), median over steady-state steps;
  (b) images/s of a bare loop: the same model on random tensors, cross-entropy on upsampled logits, AdamW;
  (c) inference images/s of ``predict_masks`` (preprocessing, model, resize to 640 x 480, arg-max) and of
      the bare model on random tensors.
Target: (a)/(b) >= 0.9. Prints the CPU (or GPU) it ran on.

    python benchmarks/bench_segmentation.py [--steps 6] [--batch 4] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from usfmae_hf.precision import cpu_name


def write_model(directory: Path) -> Path:
    """A random ViT-B/16 MAE (USF-MAE's shape) converted to a vit_mae directory."""
    from usfmae_hf.model.conversion import convert_checkpoint
    from usfmae_hf.model.reference_mae import ReferenceMAE

    torch.manual_seed(0)
    torch.save(ReferenceMAE().state_dict(), directory / "mae.pth")
    convert_checkpoint(directory / "mae.pth", directory / "hf")
    return directory / "hf"


def write_data(directory: Path, count: int) -> Path:
    """640 x 480 grey scans with an elliptical lesion mask each, in images/ + masks/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    for split in ("train",):
        (directory / split / "images").mkdir(parents=True)
        (directory / split / "masks").mkdir(parents=True)
        for index in range(count):
            cy, cx = rng.uniform(150, 330), rng.uniform(200, 440)
            mask = ((y - cy) / 60) ** 2 + ((x - cx) / 90) ** 2 <= 1
            scan = np.clip(rng.rayleigh(60, mask.shape) * np.where(mask, 0.4, 1.0), 0, 255).astype(np.uint8)
            Image.fromarray(scan, "L").save(directory / split / "images" / f"scan_{index:03d}.png")
            Image.fromarray(mask.astype(np.uint8), "L").save(directory / split / "masks" / f"scan_{index:03d}.png")
    return directory / "train"


class StepTimer(TrainerCallback):
    """A Trainer callback recording the wall time of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def package_loop(model_dir: Path, train_dir: Path, batch: int, steps: int, device: str) -> float:
    """(a): median images/s of the real Trainer loop (steps after the first two)."""
    from transformers import TrainingArguments

    from usfmae_hf.evaluation.segmentation_data import load_segmentation_images
    from usfmae_hf.finetuning.data import with_segmentation_transforms
    from usfmae_hf.finetuning.recipe import UsfmaeTrainer
    from usfmae_hf.finetuning.segmentation import SegmentationDataArguments
    from usfmae_hf.finetuning.segmentation_loss import SegmentationLoss
    from usfmae_hf.finetuning.segmenter import build_segmenter

    dataset = load_segmentation_images(**SegmentationDataArguments(train_dir=str(train_dir)).source())
    model = build_segmenter(model_dir, ["background", "lesion"])
    processed = with_segmentation_transforms(dataset, image_size=224, augment="usfmae")
    with tempfile.TemporaryDirectory() as output:
        args = TrainingArguments(
            output_dir=output,
            max_steps=steps + 2,
            per_device_train_batch_size=batch,
            learning_rate=1e-4,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=1,
            use_cpu=device == "cpu",
            logging_steps=10_000,
        )
        args.remove_unused_columns = False
        timer = StepTimer()
        trainer = UsfmaeTrainer(
            model=model,
            args=args,
            train_dataset=processed["train"],
            compute_loss_func=SegmentationLoss("dice_ce"),
            layer_decay=0.65,
            callbacks=[timer],
        )
        trainer.train()
    return batch / statistics.median(timer.times[2:])


def bare_loop(model_dir: Path, batch: int, steps: int, device: str) -> float:
    """(b): median images/s of the same model on random tensors, plain cross-entropy, AdamW."""
    from usfmae_hf.finetuning.segmenter import build_segmenter

    model = build_segmenter(model_dir, ["background", "lesion"]).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixel_values = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 2, (batch, 224, 224), device=device)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        logits = model(pixel_values=pixel_values).logits
        logits = torch.nn.functional.interpolate(logits, size=(224, 224), mode="bilinear", align_corners=False)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[2:])


def inference(model_dir: Path, train_dir: Path, batch: int, device: str) -> tuple[float, float]:
    """(c): images/s of ``predict_masks`` on 640 x 480 scans, and of the bare model on random tensors."""
    from PIL import Image

    from usfmae_hf.finetuning.segmenter import build_segmenter
    from usfmae_hf.inference.segmentation import predict_masks

    model = build_segmenter(model_dir, ["background", "lesion"]).to(device).eval()
    images = [Image.open(path) for path in sorted((train_dir / "images").glob("*.png"))[: batch * 3]]
    list(predict_masks(model, images[:batch], batch_size=batch))  # warm-up
    start = time.perf_counter()
    list(predict_masks(model, images, batch_size=batch))
    package = len(images) / (time.perf_counter() - start)
    pixel_values = torch.randn(batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        model(pixel_values=pixel_values)
        start = time.perf_counter()
        for _ in range(3):
            model(pixel_values=pixel_values)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return package, 3 * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per loop (after 2 warm-up)")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"device: {args.device} ({device_name}), torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        model_dir = write_model(workdir)
        train_dir = write_data(workdir / "data", max(16, args.batch * (args.steps + 3)))
        bare = bare_loop(model_dir, args.batch, args.steps, args.device)
        package = package_loop(model_dir, train_dir, args.batch, args.steps, args.device)
        bare_again = bare_loop(model_dir, args.batch, args.steps, args.device)
        reference = (bare + bare_again) / 2
        predict, forward = inference(model_dir, train_dir, args.batch, args.device)
    print(f"(a) package fine-tuning loop: {package:.2f} img/s")
    print(f"(b) bare DPT loop (mean of a run before and after): {reference:.2f} img/s ({bare:.2f}, {bare_again:.2f})")
    print(f"(a)/(b) = {package / reference:.3f} (target >= 0.9)")
    print(f"(c) inference: predict_masks {predict:.2f} img/s (640x480 scans), bare forward {forward:.2f} img/s at 224")


if __name__ == "__main__":
    main()
