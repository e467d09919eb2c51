"""Run outputs of pretraining: the per-step JSON-lines log and the loss/lr curves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from usfmae_hf.atomic import atomic_write_bytes, atomic_write_text


class StepLog:
    """``log.jsonl``: one JSON object per optimizer step, appended and flushed as it happens."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a run resumes from)."""
        kept = [record for record in self.records() if record["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


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
