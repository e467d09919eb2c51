"""What a pretraining run knows about itself, for its model cards: the initial weights, the data, the progress.

:class:`RunProvenance` is fixed when a run starts (the initial weights by path and SHA-256, each data source
by name, size and, for a ``usfmae ingest`` build, the rows used per source dataset) and saved with every
checkpoint, so that a resumed run's cards name what the run started from even if those folders changed
since. :meth:`RunProvenance.training_run` adds the steps, images and epochs actually run.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from usfmae_hf.pretraining.arguments import DataArguments, ModelArguments
    from usfmae_hf.pretraining.checkpointing import TrainState

#: The report an ``usfmae ingest`` build writes beside its data (rows per source dataset).
INGEST_REPORT = "ingest_report.json"
#: The column in which an ``usfmae ingest`` build names each row's source dataset.
SOURCE_COLUMN = "dataset"
#: Key of :class:`RunProvenance` in ``run_settings.json`` (not compared on resume: see checkpointing.py).
SETTINGS_KEY = "provenance"


def is_hub_dataset_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub dataset id (``namespace/name``), not a local path or a builder name."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "/" not in name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _ingest_report(directory: Path) -> dict[str, Any] | None:
    try:
        report = json.loads((directory / INGEST_REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("datasets"), list) else None


def _rows_used(data_args: DataArguments, used: int, count_sources: bool) -> tuple[int, dict[str, int]]:
    """The size of the split a run read its first ``used`` rows from, and those rows per source dataset."""
    from usfmae_hf.pretraining.data import open_dataset

    dataset = open_dataset(
        dataset_dir=data_args.dataset_dir,
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        split=data_args.dataset_split,
        streaming=False,
    )
    sources: dict[str, int] = {}
    if count_sources and SOURCE_COLUMN in dataset.column_names:
        names = dataset.select_columns([SOURCE_COLUMN]).with_format("arrow")[:used][SOURCE_COLUMN].to_pylist()
        sources = dict(sorted(Counter(names).items()))
    return len(dataset), sources


def describe_data(data_args: DataArguments, images: int | None) -> dict[str, Any]:
    """The card's entry for the source a run trains on (``images``: the samples it holds, None for a stream).

    ``of`` is the source's size when ``--max_train_samples`` kept fewer; an ``usfmae ingest`` build also
    names its source datasets with the rows used of each (all of the build's rows for a whole stream).
    """
    entry: dict[str, Any] = {"images": images}
    split = "" if data_args.dataset_split == "train" else f", split {data_args.dataset_split}"
    if data_args.train_dir is not None:
        from usfmae_hf.io import expand_inputs

        entry.update(name=data_args.train_dir, kind="image folder")
        if data_args.max_train_samples is not None:
            entry["of"] = len(expand_inputs([data_args.train_dir]))
    elif data_args.dataset_dir is not None:
        report = _ingest_report(Path(data_args.dataset_dir))
        entry.update(name=data_args.dataset_dir, kind="`usfmae ingest` build" if report else "local dataset folder")
        entry["kind"] += split
        if images is not None and data_args.max_train_samples is not None:
            entry["of"], entry["sources"] = _rows_used(data_args, images, count_sources=report is not None)
        elif images is not None and report:
            entry["sources"] = _rows_used(data_args, images, count_sources=True)[1]
        elif report and data_args.max_train_samples is None:  # a whole stream: the build's own counts
            entry["sources"] = {d["dataset"]: d["rows"] for d in report["datasets"] if d.get("rows")}
    else:
        hub = is_hub_dataset_id(data_args.dataset_name)
        entry.update(name=data_args.dataset_name, kind="Hub dataset" if hub else "dataset", hub=hub)
        if data_args.dataset_config_name:
            entry["kind"] += f", configuration {data_args.dataset_config_name}"
        entry["kind"] += split
        if images is not None and data_args.max_train_samples is not None:
            entry["of"] = _rows_used(data_args, images, count_sources=False)[0]
    if "of" in entry and entry["of"] == images:
        del entry["of"]
    return entry


@dataclass
class RunProvenance:
    """Where a run's weights come from: initial weights (or a from-scratch config) and data, fixed at its start."""

    initialised_from: dict[str, Any] | None = None  # cards.describe_initial_weights of --model_name_or_path
    config: str | None = None  # --config_name of a from-scratch run
    data: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        model_args: ModelArguments,
        data_args: DataArguments,
        images: int | None,
        *,
        saved: Mapping[str, Any] | None,
        step: int,
        note: Callable[[str], None],
    ) -> RunProvenance:
        """This run's provenance; a resumed run (``saved``: its checkpoint's) keeps the one it started with.

        A resumed run on another data source adds it, from ``step`` on; ``note`` tells about every difference.
        """
        from usfmae_hf.publishing.cards import describe_initial_weights

        data = describe_data(data_args, images)
        if not saved:
            start = model_args.model_name_or_path
            initial = describe_initial_weights(start) if start is not None else None
            return cls(initial, None if start is not None else str(model_args.config_name), [data])
        provenance = cls(**{name: saved[name] for name in ("initialised_from", "config", "data") if name in saved})
        recorded = (provenance.initialised_from or {}).get("name") or provenance.config
        given = model_args.model_name_or_path or model_args.config_name
        if recorded is not None and str(given) != recorded:
            note(f"the checkpoint's run started from {recorded}: its cards name that, not {given}")
        if provenance.data and (provenance.data[-1]["kind"], provenance.data[-1]["name"]) != (
            data["kind"],
            data["name"],
        ):
            note(f"resuming on {data['name']}; the run trained on {provenance.data[-1]['name']} before step {step}")
            provenance.data.append({**data, "from_step": step})
        return provenance

    def start_name(self) -> str:
        """The initial weights in a few words: their path or Hub id, or the config of random ones."""
        if self.initialised_from is not None:
            return str(self.initialised_from["name"])
        return f"random weights (MAE initialisation) of {self.config}"

    def settings(self) -> dict[str, Any]:
        """The form saved in ``run_settings.json`` under :data:`SETTINGS_KEY`."""
        return asdict(self)

    def training_run(self, state: TrainState, epochs: float | None) -> dict[str, Any]:
        """``render_model_card``'s ``training_run`` after ``state``'s progress (``epochs``: None for a stream)."""
        run: dict[str, Any] = {
            "from_scratch": self.initialised_from is None,
            "data": [dict(entry) for entry in self.data],
            "optimizer_steps": state.step,
            "images_seen": state.images_seen,
            "epochs": None if epochs is None else round(epochs, 2),
            "bad_images": state.bad_images_seen,
        }
        if self.config is not None:
            run["config"] = self.config
        return run

    def hub_datasets(self) -> list[str]:
        """The Hub dataset ids among the data, for the card's ``datasets`` metadata."""
        return list(dict.fromkeys(entry["name"] for entry in self.data if entry.get("hub")))
