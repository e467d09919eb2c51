"""What every fine-tuning run leaves behind, shared by classification and segmentation: card, results, push."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerState, TrainingArguments

from usfmae_hf.errors import UsfmaeError


def dataset_label(
    *, card_dataset_name: str | None, task_name: str | None, dataset_name: str | None, train_dir: str | None
) -> str:
    """The dataset's name in the model card: the explicit one, the task's, the dataset's, or ``train_dir``'s parent."""
    if card_dataset_name:
        return card_dataset_name
    if task_name:
        return task_name
    return dataset_name or Path(train_dir).resolve().parent.name


def write_card(
    kind: str,
    model,
    *,
    model_name_or_path: str,
    license: str | None = None,  # noqa: A002 - the Hub metadata field's name
    recipe: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    training_args: TrainingArguments,
    state: TrainerState,
    evaluation_notes: str,
    warnings: Sequence[str] = (),
) -> None:
    """Write the run's model card (``README.md``): the initial weights (``model_name_or_path``, named by the card),
    hyperparameters, the optimizer steps and epochs actually run (``state``, i.e. ``trainer.state``: with
    ``--max_steps`` they are not ``--num_train_epochs``) and ``model-index`` results.

    ``warnings`` (e.g. a class absent from an evaluated split, as ``all_results.json`` records them) are shown in
    the results section, one ``> **Warning:**`` line each, before ``evaluation_notes``. A LoRA run's card (``peft``
    in ``recipe``) shows how to load the adapter onto its base model (``model_name_or_path``)."""
    from usfmae_hf.publishing.cards import render_model_card

    hyperparameters = {key: value for key, value in recipe.items() if value is not None}
    hyperparameters.update(
        optimizer_steps_run=state.global_step,
        epochs_run=round(state.epoch or 0.0, 2),
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        seed=training_args.seed,
    )
    card = render_model_card(
        kind,
        config=model.config,
        initialised_from=model_name_or_path,
        license=license,
        results=results,
        repo_id=training_args.hub_model_id,
        extra={"training": hyperparameters, "evaluation_notes": card_notes(evaluation_notes, warnings)},
    )
    card.save(Path(training_args.output_dir) / "README.md")


def card_notes(evaluation_notes: str, warnings: Sequence[str]) -> str:
    """The paragraph under the card's results: one visible line per warning, then ``evaluation_notes``."""
    return "\n\n".join([*(f"> **Warning:** {' '.join(warning.split())}" for warning in warnings), evaluation_notes])


def write_training_arguments(training_args: TrainingArguments) -> None:
    """Write ``training_args.json`` (tokens redacted): the publishable form of the Trainer's ``training_args.bin``."""
    from usfmae_hf.atomic import atomic_write_text

    atomic_write_text(Path(training_args.output_dir) / "training_args.json", training_args.to_json_string())


def push_output(training_args: TrainingArguments) -> None:
    """Upload the output directory as it is; :func:`~usfmae_hf.publishing.hub.push_model_dir` leaves out the
    Trainer's pickles (``training_args.bin``, optimizer states) and ``checkpoint-*/`` folders, and says so."""
    from usfmae_hf.publishing.hub import push_model_dir

    if not training_args.hub_model_id:
        raise UsfmaeError("--push_to_hub needs --hub_model_id")
    push_model_dir(
        training_args.output_dir,
        training_args.hub_model_id,
        private=bool(training_args.hub_private_repo),
        token=training_args.hub_token,
    )
