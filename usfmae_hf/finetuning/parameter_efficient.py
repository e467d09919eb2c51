"""Parameter-efficient fine-tuning: LoRA adapters (``peft``) or frozen encoder layers, for any fine-tuning head.

:func:`prepare_model` takes a freshly built model (a classifier, a segmentation model) and either
freezes part of its encoder or wraps it in a ``peft`` LoRA model whose head modules train in full
(``modules_to_save``). The Trainer then saves a LoRA model as an adapter in the standard ``peft``
format (``adapter_config.json`` + ``adapter_model.safetensors``, head included), which loads with
``PeftModel.from_pretrained(base, dir)``; :func:`merge_and_export` folds the adapter into the weights
and writes a plain transformers model directory.

``peft`` is imported only when LoRA is used.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from usfmae_hf.atomic import atomic_directory
from usfmae_hf.errors import UsfmaeError

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

PEFT_METHODS: tuple[str, ...] = ("none", "lora")

#: Query/value projections under the names each supported layout gives them, tried in order:
#: transformers >= 5.9 ViT, transformers 4.x ViT and DPT's backbone, VitDet's merged projection.
DEFAULT_LORA_TARGETS: tuple[tuple[str, ...], ...] = (("q_proj", "v_proj"), ("query", "value"), ("qkv",))
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer outside the head
ADAPTER_CONFIG = "adapter_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"

_BLOCK_LISTS = ("layers", "layer")  # the encoder's block ModuleList: ``vit.layers`` (5.x), ``encoder.layer``


@dataclass
class PeftArguments:
    """Which parameters train: all (default), the head only, the head and the last blocks, or LoRA adapters."""

    peft: str = field(
        default="none",
        metadata={
            "help": "none: train the parameters the freeze flags leave; lora: freeze the whole model and train "
            "low-rank adapters on --lora_target_modules plus the full head (saved as a peft adapter: "
            "adapter_config.json + adapter_model.safetensors).",
            "choices": list(PEFT_METHODS),
        },
    )
    lora_rank: int = field(
        default=8,
        metadata={
            "help": "LoRA rank r: each targeted linear layer learns W + (alpha/r) B A with A: r x in, B: out x r "
            "(r * (in + out) parameters). 8 is peft's default and, on the query/value projections, the setting "
            "the LoRA paper found as good as larger ranks."
        },
    )
    lora_alpha: float = field(
        default=8.0,
        metadata={"help": "LoRA scaling numerator: the update is multiplied by alpha / r (default = rank: x1)."},
    )
    lora_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on the input of the LoRA branch (0 = off), against overfitting."}
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module-name suffixes that get adapters, e.g. q_proj k_proj v_proj o_proj fc1 fc2, or "
            "'all-linear' (every linear layer outside the head). Default: the query and value projections "
            "(q_proj v_proj on transformers >= 5.9, query value on 4.x and DPT, qkv on VitDet), as in the LoRA paper."
        },
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={"help": "Freeze everything but the head module(s): only the new head trains (without --peft)."},
    )
    freeze_layers: int | None = field(
        default=None,
        metadata={
            "help": "Freeze the patch/position embeddings and the first N encoder blocks (0 = embeddings only); "
            "the remaining blocks, final norm and head train. Without --peft."
        },
    )
    export_merged: bool = field(
        default=False,
        metadata={
            "help": "With --peft lora: after training also write the adapter merged into the weights as a plain "
            "transformers model (config.json + model.safetensors, no peft needed) to <output_dir>/merged."
        },
    )

    def __post_init__(self) -> None:
        if self.peft not in PEFT_METHODS:
            raise UsfmaeError(f"--peft {self.peft!r} is not one of {', '.join(PEFT_METHODS)}")
        if self.peft == "lora":
            if self.freeze_backbone or self.freeze_layers is not None:
                flag = "--freeze_backbone" if self.freeze_backbone else "--freeze_layers"
                raise UsfmaeError(f"{flag} does not combine with --peft lora, which already freezes the whole model")
            if self.lora_rank < 1:
                raise UsfmaeError(f"--lora_rank must be at least 1 (got {self.lora_rank})")
            if self.lora_alpha <= 0:
                raise UsfmaeError(f"--lora_alpha must be positive (got {self.lora_alpha})")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise UsfmaeError(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout})")
            if self.lora_target_modules is not None and not self.lora_target_modules:
                raise UsfmaeError("--lora_target_modules needs at least one module name")
        elif self.export_merged:
            raise UsfmaeError("--export_merged needs --peft lora (without adapters the saved model is already plain)")
        if self.freeze_backbone and self.freeze_layers is not None:
            raise UsfmaeError("--freeze_backbone and --freeze_layers both choose what trains; give one")
        if self.freeze_layers is not None and self.freeze_layers < 0:
            raise UsfmaeError(f"--freeze_layers must be 0 or more (got {self.freeze_layers})")

    def options(self) -> dict[str, Any]:
        """The options in effect, for results files and model cards (nothing when every parameter trains)."""
        if self.peft == "lora":
            return {
                "peft": "lora",
                "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout,
                "lora_target_modules": self.lora_target_modules or "query/value projections",
            }
        if self.freeze_backbone:
            return {"freeze_backbone": True}
        if self.freeze_layers is not None:
            return {"freeze_layers": self.freeze_layers}
        return {}


def prepare_model(
    model: nn.Module,
    args: PeftArguments,
    *,
    head_modules: Sequence[str] | None = None,
    base_model_name_or_path: str | os.PathLike | None = None,
) -> nn.Module:
    """Apply ``args`` to ``model``: freeze part of it in place, or return it wrapped in a LoRA ``PeftModel``.

    ``head_modules``: names (``model.get_submodule`` paths) of the newly initialised modules that always
    train in full and, with LoRA, are saved with the adapter; by default every top-level child except
    the encoder (``model.base_model_prefix``, else ``backbone``): ``classifier`` for
    ``ViTForImageClassification``, ``fc_norm`` + ``classifier`` for the mean head, ``neck`` + ``head``
    (+ ``auxiliary_head``) for DPT, ``decode_head`` + ``auxiliary_head`` for UperNet.
    ``base_model_name_or_path`` is recorded in the adapter's config (default: ``model.name_or_path``,
    empty for a model built from a config). Logs the trainable-parameter count.
    """
    heads = resolve_head_modules(model, head_modules)
    if args.peft == "lora":
        model = _wrap_lora(model, args, heads, base_model_name_or_path)
    elif args.freeze_backbone:
        _freeze_all_but(model, heads)
    elif args.freeze_layers is not None:
        _freeze_first_layers(model, args.freeze_layers, heads)
    trainable, total = trainable_parameters(model)
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model``."""
    counts = [(parameter.numel(), parameter.requires_grad) for parameter in model.parameters()]
    return sum(n for n, trains in counts if trains), sum(n for n, _ in counts)


def resolve_head_modules(model: nn.Module, head_modules: Sequence[str] | None = None) -> list[str]:
    """Check ``head_modules`` (or infer them, see :func:`prepare_model`) and return the outermost ones."""
    if head_modules is None:
        encoder = _encoder_name(model)
        if encoder is None:
            raise UsfmaeError(f"cannot tell the encoder of {type(model).__name__} from its head; name the head modules")
        head_modules = [name for name, child in model.named_children() if name != encoder and _has_parameters(child)]
        if not head_modules:
            raise UsfmaeError(f"{type(model).__name__} has no head module beside its encoder; name the head modules")
    for name in head_modules:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UsfmaeError(f"{type(model).__name__} has no module {name!r} to train as its head") from None
    # A head inside another head is covered by it (and peft would wrap it twice).
    return sorted(
        name for name in set(head_modules) if not any(_inside(name, other) and name != other for other in head_modules)
    )


def merge_and_export(
    source: PeftModel | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    base_model: nn.Module | None = None,
    image_processor: Any = None,
    overwrite: bool = False,
) -> Path:
    """Merge a LoRA adapter into its base weights and save a plain transformers model directory.

    ``source`` is a ``PeftModel`` (left as it is: a copy is merged) or an adapter directory, which
    needs ``base_model``: the model the adapter was trained on, built the same way (e.g.
    ``build_classifier(base_dir, label_names, head=...)``; the adapter is loaded into it). Writes
    ``config.json`` + ``model.safetensors`` (plus the mean head's code) and the image processor
    (``image_processor``, or the adapter directory's), atomically; no peft files.
    """
    from peft import PeftModel

    adapter_dir = None
    if isinstance(source, PeftModel):
        peft_model = copy.deepcopy(source)
    else:
        adapter_dir = Path(source)
        if not (adapter_dir / ADAPTER_CONFIG).is_file():
            raise UsfmaeError(f"{adapter_dir} holds no {ADAPTER_CONFIG}; expected a LoRA adapter directory")
        if base_model is None:
            raise UsfmaeError(
                f"merging the adapter in {adapter_dir} needs the model it was trained on (base_model=, e.g. "
                "build_classifier(<converted dir>, label_names, head=...))"
            )
        peft_model = PeftModel.from_pretrained(base_model, adapter_dir)
    merged = peft_model.merge_and_unload()
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        merged.save_pretrained(staging)
        if image_processor is not None:
            image_processor.save_pretrained(staging)
        elif adapter_dir is not None and (adapter_dir / PREPROCESSOR_CONFIG).is_file():
            shutil.copy2(adapter_dir / PREPROCESSOR_CONFIG, staging / PREPROCESSOR_CONFIG)
    logger.info("merged LoRA model written to %s", output_dir)
    return Path(output_dir)


def export_merged_model(trainer, args: PeftArguments) -> Path | None:
    """With ``--export_merged``: write the trained adapter merged into the weights to ``<output_dir>/merged``."""
    if not args.export_merged:
        return None
    return merge_and_export(
        trainer.model,
        Path(trainer.args.output_dir) / "merged",
        image_processor=trainer.processing_class,
        overwrite=True,
    )


def _wrap_lora(
    model: nn.Module, args: PeftArguments, heads: list[str], base_model_name_or_path: str | os.PathLike | None
) -> PeftModel:
    from peft import LoraConfig, get_peft_model

    modules_to_save = peft_module_names(model, heads)
    targets = _lora_targets(model, args.lora_target_modules, heads)
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
    )
    peft_model = get_peft_model(model, config)
    if base_model_name_or_path is not None:
        # get_peft_model records model.name_or_path, which is empty for a model built from a config (mean head).
        peft_model.peft_config["default"].base_model_name_or_path = str(base_model_name_or_path)
    logger.info("LoRA r=%d alpha=%s on %s; trained in full: %s", args.lora_rank, args.lora_alpha, targets, heads)
    return peft_model


def peft_module_names(model: nn.Module, heads: Sequence[str]) -> list[str]:
    """The ``modules_to_save`` names under which peft wraps exactly the ``heads`` (outermost head modules).

    peft takes every module whose name ends with one of them, as a plain string: ``head`` also takes DPT's
    ``head.head`` inside it and ``auxiliary_head``. A module wrapped inside another wrapped one trains, but its
    adapter no longer loads (peft maps the saved keys twice), so a head that contains (or is) such a match is
    named by its children instead: DPT's ``head`` by ``head.head``. A match outside the heads is refused.
    """
    names = [name for name, _ in model.named_modules() if name]

    def matches(target: str) -> list[str]:
        return [name for name in names if name.endswith(target)]

    targets = sorted(heads)
    while True:
        matched = sorted({name for target in targets for name in matches(target)})
        stray = next((name for name in matched if not any(_inside(name, head) for head in heads)), None)
        if stray is not None:
            raise UsfmaeError(
                f"head module names {list(heads)} also match {stray} (peft matches them by suffix); "
                "name that module as a head too"
            )
        outer = next((a for a in matched if any(b != a and _inside(b, a) for b in matched)), None)
        if outer is None:
            return targets
        refined = []
        for target in targets:
            if not outer.endswith(target):
                refined.append(target)
                continue
            module = model.get_submodule(target)
            children = [f"{target}.{name}" for name, child in module.named_children() if _has_parameters(child)]
            if any(True for _ in module.parameters(recurse=False)) or not children:
                raise UsfmaeError(
                    f"head module {target} of {type(model).__name__} cannot be named apart from {outer} for peft "
                    "(it matches by name suffix); name other head modules"
                )
            refined += children
        targets = sorted(refined)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _lora_targets(model: nn.Module, requested: Sequence[str] | None, heads: list[str]) -> list[str] | str:
    """The ``target_modules`` for peft: ``requested`` checked against the encoder, or the default query/value pair."""
    if requested is not None and list(requested) == [ALL_LINEAR]:
        return ALL_LINEAR
    names = {
        name: module
        for name, module in model.named_modules()
        if name and not any(_inside(name, head) for head in heads)
    }

    def matches(target: str) -> list[str]:
        return [name for name in names if name == target or name.endswith(f".{target}")]

    if requested is None:
        for candidates in DEFAULT_LORA_TARGETS:
            if all(matches(target) for target in candidates):
                return list(candidates)
        raise UsfmaeError(
            f"found no query/value projections in {type(model).__name__} for LoRA; name them with --lora_target_modules"
        )
    for target in requested:
        found = matches(target)
        if not found:
            raise UsfmaeError(
                f"--lora_target_modules {target!r} matches no module of {type(model).__name__} outside the head; "
                f"give linear-layer name suffixes such as {' '.join(_linear_suffixes(names))}"
            )
        unsupported = [name for name in found if not isinstance(names[name], nn.Linear | nn.Conv2d)]
        if unsupported:
            raise UsfmaeError(
                f"--lora_target_modules {target!r} matches {unsupported[0]} ({type(names[unsupported[0]]).__name__}); "
                "LoRA adapts linear or conv layers only"
            )
    return list(requested)


def _linear_suffixes(modules: dict[str, nn.Module]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in modules.items() if isinstance(module, nn.Linear)})


def _freeze_all_but(model: nn.Module, trainable_modules: Sequence[str]) -> None:
    _freeze(model, lambda name: not any(_inside(name, module) for module in trainable_modules))


def _freeze(model: nn.Module, frozen: Callable[[str], bool]) -> None:
    """Turn off gradients of the parameters whose names ``frozen`` accepts; leave the others as they are."""
    for name, parameter in model.named_parameters():
        if frozen(name):
            parameter.requires_grad_(False)


def _freeze_first_layers(model: nn.Module, num_layers: int, heads: list[str]) -> None:
    """Freeze the embeddings and encoder blocks ``0 .. num_layers - 1``."""
    outside_heads = [
        (name, module) for name, module in model.named_modules() if not any(_inside(name, head) for head in heads)
    ]
    embeddings = [name for name, _ in outside_heads if name.rsplit(".", 1)[-1] == "embeddings"]
    blocks = next(
        (
            (name, module)
            for name, module in outside_heads
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS
        ),
        None,
    )
    if not embeddings or blocks is None:
        raise UsfmaeError(f"--freeze_layers: found no embeddings and encoder block list in {type(model).__name__}")
    blocks_name, block_list = blocks
    if num_layers > len(block_list):
        raise UsfmaeError(f"--freeze_layers {num_layers} is out of range: the encoder has {len(block_list)} blocks")
    frozen = embeddings + [f"{blocks_name}.{index}" for index in range(num_layers)]
    _freeze(model, lambda name: any(_inside(name, module) for module in frozen))


def _inside(name: str, module: str) -> bool:
    """Whether the parameter or module ``name`` is ``module`` or belongs to it."""
    return name == module or name.startswith(f"{module}.")


def _encoder_name(model: nn.Module) -> str | None:
    children = dict(model.named_children())
    for name in (getattr(model, "base_model_prefix", ""), "backbone"):
        if name and name in children:
            return name
    return None
