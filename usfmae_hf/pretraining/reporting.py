"""Run outputs of pretraining: per-step statistics, the JSON-lines log and the loss/lr curves."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from usfmae_hf.atomic import atomic_write_bytes, atomic_write_text
from usfmae_hf.errors import UsfmaeError


class StepLog:
    """``log.jsonl``: one JSON object per optimizer step, appended and flushed as it happens."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        """All complete records; a last line cut off by a killed run is left out."""
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except ValueError:
                if number == len(lines):
                    break
                raise UsfmaeError(f"{self.path}: line {number} is not JSON; move the file away to start over") from None
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a run resumes from)."""
        kept = [record for record in self.records() if record["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def append(self, records: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(record) + "\n" for record in records))
            handle.flush()


@dataclass
class _Pending:
    """One optimizer step whose numbers are not yet read back from the device."""

    fields: dict[str, Any]
    on_device: torch.Tensor  # loss sum, unreadable images
    micro_batches: int
    images: int


class StepStats:
    """Per-step loss and unreadable-image count (on the device) and image counts (on the host) until :meth:`flush`.

    Reading a number back from the device (``.item()``) waits for it to finish the step; doing it once
    per logging window instead of once per step lets the host queue the next steps meanwhile.
    Throughput is measured over the window, between two read-backs, so it is exact on asynchronous
    devices too.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: list[_Pending] = []
        self._reset_step()
        self.restart_clock()

    def _reset_step(self) -> None:
        self.on_device, self.micro_batches, self.images = torch.zeros(2, device=self.device), 0, 0

    def restart_clock(self) -> None:
        """Start timing a new window (after saving, which is not training time)."""
        self.started = time.perf_counter()

    def add_micro_batch(self, loss: torch.Tensor, images: int, bad_images: torch.Tensor) -> None:
        """Count one micro-batch: its loss and unreadable-image count (tensors, left where they are), its size."""
        bad = bad_images.to(self.device, non_blocking=True)
        self.on_device = self.on_device + torch.stack([loss.detach().float(), bad.float()])
        self.micro_batches += 1
        self.images += images

    def end_step(self, **fields: Any) -> None:
        """Close the optimizer step just taken; ``fields`` (step, epoch, lr, ...) go into its record as given."""
        self.pending.append(_Pending(fields, self.on_device, self.micro_batches, self.images))
        self._reset_step()

    def flush(self, accelerator: Any) -> list[dict[str, Any]]:
        """The pending steps' records summed over all processes (collective), oldest first; starts a new window.

        Each is the step's ``fields`` with ``loss``, ``images``, ``bad_images`` and ``images_per_sec``
        (that of the whole window) added.
        """
        if not self.pending:
            return []
        counts = torch.tensor([[step.micro_batches, step.images] for step in self.pending], device=self.device)
        values = torch.cat([torch.stack([step.on_device for step in self.pending]), counts.float()], dim=1)
        totals = accelerator.reduce(values, reduction="sum").tolist()
        seconds = max(time.perf_counter() - self.started, 1e-9)
        rate = sum(row[3] for row in totals) / seconds
        records = [
            {**step.fields, "loss": loss / micro, "images": int(images), "bad_images": int(bad), "images_per_sec": rate}
            for step, (loss, bad, micro, images) in zip(self.pending, totals)
        ]
        self.pending = []
        self.restart_clock()
        return records


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write a PNG with the training loss (left) and learning rate (right) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    steps = [record["step"] for record in records]
    figure, (loss_axis, lr_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot(steps, [record["loss"] for record in records])
    loss_axis.set(xlabel="step", ylabel="loss", title="MAE reconstruction loss")
    lr_axis.plot(steps, [record["lr"] for record in records], color="tab:orange")
    lr_axis.set(xlabel="step", ylabel="learning rate", title="learning rate")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def tracker_config(*groups: Any) -> dict[str, Any]:
    """All arguments as one flat dict of scalars, as trackers want their run config."""
    flat = {}
    for group in groups:
        for key, value in dataclasses.asdict(group).items():
            flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
