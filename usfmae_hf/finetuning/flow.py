"""The run every fine-tuning task shares; a task (:class:`FineTuningTask`) adds only its own pieces.

:func:`run_task` makes the steps in this order: seed and argument checks, the effective recipe (the task's
plus the ``--peft`` / freeze options), checks of the sources, the output folder (a previous run refused or
cleared), the data, the model and its LoRA / frozen layers, the :class:`~usfmae_hf.finetuning.recipe.UsfmaeTrainer`
(layer decay, start summary), training (``--resume_from_checkpoint`` checked first), evaluation of validation
and test, then on the main process ``all_results.json``, ``training_args.json``, the merged export, the model
card, the push and the end summary. :func:`entry_point` makes a task's command-line ``main``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from transformers import TrainingArguments

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.finetuning.arguments import CommonDataArguments, CommonModelArguments
from usfmae_hf.finetuning.checks import check_training_arguments, prepare_output_dir
from usfmae_hf.finetuning.outputs import dataset_label, push_output, write_card, write_training_arguments
from usfmae_hf.finetuning.parameter_efficient import PeftArguments, export_merged_model, prepare_model
from usfmae_hf.finetuning.recipe import UsfmaeTrainer, balanced_class_weights
from usfmae_hf.finetuning.summary import StartSummary, print_end_summary
from usfmae_hf.publishing.cards import check_license_id

Reports = dict[str, dict[str, Any]]


class FineTuningTask(ABC):
    """One task's pieces of :func:`run_task`; a subclass sets the class attributes and implements the methods
    (the task modules list them in the order the run uses them).

    The instance holds the parsed arguments: ``model_args`` and ``data_args`` (of :attr:`model_arguments` and
    :attr:`data_arguments`, subclasses of the common ones) and ``training_args``.
    """

    prog: ClassVar[str]  # the name in printed lines and one-line errors
    card_kind: ClassVar[str]  # model card template (usfmae_hf.publishing.cards.render_model_card's kind)
    card_metrics: ClassVar[Sequence[tuple[str, str, str]]]  # (report key, Hub metric type, display name)
    evaluation_notes: ClassVar[str]  # how the card's results were measured
    model_arguments: ClassVar[type[CommonModelArguments]]
    data_arguments: ClassVar[type[CommonDataArguments]]

    def __init__(
        self, model_args: CommonModelArguments, data_args: CommonDataArguments, training_args: TrainingArguments
    ) -> None:
        self.model_args, self.data_args, self.training_args = model_args, data_args, training_args

    @staticmethod
    @abstractmethod
    def resolve_recipe(model_args: CommonModelArguments, training_args: TrainingArguments) -> dict[str, Any]:
        """The effective recipe (presets applied, also to ``training_args``); has ``augment``, ``layer_decay`` and
        ``class_weighted_loss``."""

    @abstractmethod
    def load_data(self) -> tuple[Any, list[str]]:
        """The ``DatasetDict`` (train, optional validation / test) and the label names in index order."""

    @abstractmethod
    def build_model(self, label_names: Sequence[str], recipe: Mapping[str, Any]):
        """A fresh model on ``model_args.model_name_or_path`` with a ``len(label_names)``-way head."""

    @abstractmethod
    def with_transforms(self, dataset, *, image_size: int, augment: str | None):
        """``dataset`` with the on-the-fly training (``augment``, None: none) and evaluation transforms attached."""

    @abstractmethod
    def image_processor(self, image_size: int):
        """The image processor saved with the model (the evaluation transform)."""

    @abstractmethod
    def class_counts(self, dataset, num_labels: int):
        """Per-class counts of the training split, for ``--class_weighted_loss``."""

    @abstractmethod
    def trainer_options(self, model, label_names: Sequence[str], recipe: Mapping[str, Any], class_weights) -> dict:
        """The task's ``UsfmaeTrainer`` keyword arguments: loss, metrics, collator, schedule."""

    @abstractmethod
    def evaluate(self, trainer, dataset, processed, label_names: Sequence[str]) -> Reports:
        """Called on every process after training: the report of each evaluated split (on the main process)."""

    @abstractmethod
    def flat_results(self, split: str, report: Mapping[str, Any]) -> dict[str, Any]:
        """``{split}_{metric}`` entries of ``all_results.json``."""

    def card_results(self, reports: Reports, dataset: str) -> list[dict[str, Any]]:
        """The model card's ``model-index`` results: the :attr:`card_metrics` of each split, defined ones only."""
        from usfmae_hf.evaluation.reporting import card_results
        from usfmae_hf.publishing.cards import PIPELINE_TAGS

        return card_results(reports, dataset, metrics=self.card_metrics, task=PIPELINE_TAGS[self.card_kind])

    @abstractmethod
    def task_name(self) -> str | None:
        """Display name of ``--task`` for the card (None without one)."""

    def run_results(self, label_names: Sequence[str]) -> dict[str, Any]:
        """Further entries of ``all_results.json`` (none by default)."""
        return {}


def run_task(task: FineTuningTask, peft_args: PeftArguments | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate and write the outputs of ``task`` (see the module docstring); the flat results."""
    from transformers import set_seed

    from usfmae_hf.evaluation.reporting import write_results

    args, data_args = task.training_args, task.data_args
    set_seed(args.seed)
    check_training_arguments(args)
    if task.model_args.license is not None:
        check_license_id(task.model_args.license)
    peft_args = peft_args or PeftArguments()
    recipe = {**task.resolve_recipe(task.model_args, args), **peft_args.options()}
    data_args.check_sources()
    removed = prepare_output_dir(args, overwrite=data_args.overwrite_output_dir)
    if removed:
        print(f"{task.prog}: removed the previous run's {', '.join(removed)} from {args.output_dir}")
    dataset, label_names = task.load_data()
    if args.eval_strategy != "no" and "validation" not in dataset:
        raise UsfmaeError(f"--eval_strategy {args.eval_strategy} needs a validation split (e.g. --validation_dir)")
    model = task.build_model(label_names, recipe)
    model = prepare_model(model, peft_args, base_model_name_or_path=task.model_args.model_name_or_path)
    image_size = model.config.image_size
    augment = None if recipe["augment"] == "none" else recipe["augment"]
    processed = task.with_transforms(dataset, image_size=image_size, augment=augment)

    push, args.push_to_hub = args.push_to_hub, False  # pushed once, at the end
    args.remove_unused_columns = False  # the transforms read the raw columns
    class_weights = None
    if recipe["class_weighted_loss"]:
        class_weights = balanced_class_weights(
            None, len(label_names), counts=task.class_counts(dataset, len(label_names))
        )
    trainer = UsfmaeTrainer(
        model=model,
        args=args,
        train_dataset=processed["train"],
        eval_dataset=processed.get("validation"),
        processing_class=task.image_processor(image_size),
        layer_decay=recipe["layer_decay"],
        callbacks=[StartSummary(task.prog, recipe, {split: len(rows) for split, rows in dataset.items()})],
        **task.trainer_options(model, label_names, recipe, class_weights),
    )
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()

    results = dict(train_result.metrics)
    reports = task.evaluate(trainer, dataset, processed, label_names)
    if trainer.is_world_process_zero():
        for split, report in reports.items():
            results.update(task.flat_results(split, report))
        results.update(recipe=recipe, world_size=args.world_size, **task.run_results(label_names))
        write_results(args.output_dir, results)
        write_training_arguments(args)
        export_merged_model(trainer, peft_args)
        label = dataset_label(
            card_dataset_name=data_args.card_dataset_name,
            task_name=task.task_name(),
            dataset_name=data_args.dataset_name,
            train_dir=data_args.train_dir,
        )
        write_card(
            task.card_kind,
            trainer.model,
            model_name_or_path=task.model_args.model_name_or_path,
            license=task.model_args.license,
            recipe=recipe,
            results=task.card_results(reports, label),
            training_args=args,
            state=trainer.state,
            evaluation_notes=task.evaluation_notes,
            warnings=[warning for report in reports.values() for warning in report.get("warnings", ())],
        )
        if push:
            push_output(args)
        print_end_summary(
            task.prog,
            results,
            metrics=task.card_metrics,
            splits=list(reports),
            steps=trainer.state.global_step,
            output_dir=args.output_dir,
            pushed_to=args.hub_model_id if push else None,
        )
    trainer.accelerator.wait_for_everyone()
    return results


def entry_point(task_type: type[FineTuningTask], description: str) -> Callable[..., int]:
    """The command-line ``main(argv=None, description=...)`` of ``task_type``: parse its flags (every
    ``TrainingArguments`` and :class:`PeftArguments` flag included) and run it; expected failures print one
    line and return 2."""

    def main(argv: Sequence[str] | None = None, description: str = description) -> int:
        from usfmae_hf.launch import run_from_command_line

        return run_from_command_line(
            (task_type.model_arguments, task_type.data_arguments, TrainingArguments, PeftArguments),
            lambda model_args, data_args, training_args, peft_args: run_task(
                task_type(model_args, data_args, training_args), peft_args
            ),
            prog=task_type.prog,
            description=description,
            argv=argv,
        )

    main.__doc__ = f"Parse the {task_type.prog} flags and fine-tune; expected failures print one line and return 2."
    return main
