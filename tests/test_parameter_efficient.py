"""Parameter-efficient fine-tuning: LoRA (peft) and frozen layers on tiny cls / mean / DPT models, Trainer included."""

from __future__ import annotations

import json
import logging
import shlex

import pytest
import torch
from conftest import TINY_MAE_KWARGS
from safetensors.torch import load_file
from torch import nn

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.finetuning import build_classifier
from usfmae_hf.finetuning.parameter_efficient import (
    PeftArguments,
    merge_and_export,
    prepare_model,
    resolve_head_modules,
    trainable_parameters,
)

LABELS = ("benign", "malignant", "normal")
HIDDEN = TINY_MAE_KWARGS["hidden_size"]
INTERMEDIATE = TINY_MAE_KWARGS["intermediate_size"]
DEPTH = TINY_MAE_KWARGS["num_hidden_layers"]
# (in_features, out_features) of each linear layer of a ViT block, by its transformers >= 5.9 name.
BLOCK_LINEARS = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, HIDDEN),
    "v_proj": (HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "fc1": (HIDDEN, INTERMEDIATE),
    "fc2": (INTERMEDIATE, HIDDEN),
}
HEAD_PARAMETERS = {
    "cls": HIDDEN * len(LABELS) + len(LABELS),  # classifier
    "mean": 2 * HIDDEN + HIDDEN * len(LABELS) + len(LABELS),  # fc_norm + classifier
}


def pixels(seed: int = 0, batch: int = 2) -> torch.Tensor:
    size = TINY_MAE_KWARGS["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


def lora_model(model_dir, head: str, **overrides) -> nn.Module:
    """A LoRA-wrapped tiny classifier whose adapters and head are random (fresh LoRA B is zero: a no-op)."""
    model = prepare_model(
        build_classifier(model_dir, LABELS, head=head),
        PeftArguments(peft="lora", **overrides),
        base_model_name_or_path=str(model_dir),
    )
    return randomise_trainable(model)


def randomise_trainable(model: nn.Module) -> nn.Module:
    """Give every trainable parameter seeded random values, as training would move them."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def parse(flags: str) -> PeftArguments:
    from transformers import HfArgumentParser, TrainingArguments

    from usfmae_hf.finetuning.run import DataArguments, ModelArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, PeftArguments))
    argv = ["--model_name_or_path", "m", "--output_dir", "out", *shlex.split(flags)]
    return parser.parse_args_into_dataclasses(args=argv)[-1]


def test_flags_parse_beside_the_fine_tuning_arguments():
    args = parse("--peft lora --lora_rank 4 --lora_target_modules q_proj k_proj v_proj")
    assert (args.peft, args.lora_rank, args.lora_target_modules) == ("lora", 4, ["q_proj", "k_proj", "v_proj"])
    assert parse("").options() == {}
    assert parse("--freeze_layers 0").options() == {"freeze_layers": 0}


@pytest.mark.parametrize(
    "flags",
    [
        "--peft lora --freeze_backbone",
        "--peft lora --freeze_layers 1",
        "--freeze_backbone --freeze_layers 1",
        "--export_merged",
        "--peft lora --lora_rank 0",
        "--peft lora --lora_dropout 1",
        "--freeze_layers -1",
    ],
)
def test_conflicting_or_invalid_flags_fail_in_one_line(flags):
    with pytest.raises(UsfmaeError) as error:
        parse(flags)
    assert "\n" not in str(error.value) and "--" in str(error.value)


@pytest.mark.parametrize("head", ["cls", "mean"])
@pytest.mark.parametrize("targets", [None, ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], ["all-linear"]])
def test_lora_trains_exactly_the_adapters_and_the_head(tiny_model_dir, head, targets, caplog):
    rank = 4
    with caplog.at_level(logging.INFO, logger="usfmae_hf.finetuning.parameter_efficient"):
        model = prepare_model(
            build_classifier(tiny_model_dir, LABELS, head=head),
            PeftArguments(peft="lora", lora_rank=rank, lora_target_modules=targets),
        )
    # The default: the LoRA paper's query/value projections; all-linear: every linear layer but the head.
    adapted = {None: ["q_proj", "v_proj"], ("all-linear",): list(BLOCK_LINEARS)}.get(
        targets and tuple(targets), targets
    )
    expected = DEPTH * sum(rank * sum(BLOCK_LINEARS[name]) for name in adapted) + HEAD_PARAMETERS[head]
    trainable, _ = trainable_parameters(model)
    assert trainable == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert f"trainable parameters: {expected} of" in caplog.text
    lora_a = {name for name, p in model.named_parameters() if "lora_A" in name}
    assert len(lora_a) == DEPTH * len(adapted)
    heads = ("classifier",) if head == "cls" else ("fc_norm", "classifier")
    trained_outside_lora = {
        n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n
    }
    assert trained_outside_lora == set(heads)


def test_lora_rejects_unknown_or_unsupported_targets(tiny_model_dir):
    model = build_classifier(tiny_model_dir, LABELS)
    with pytest.raises(UsfmaeError, match="matches no module"):
        prepare_model(model, PeftArguments(peft="lora", lora_target_modules=["query_proj"]))
    with pytest.raises(UsfmaeError, match="linear or conv"):
        prepare_model(model, PeftArguments(peft="lora", lora_target_modules=["attention"]))
    with pytest.raises(UsfmaeError, match="no module 'decode_head'"):
        prepare_model(model, PeftArguments(freeze_backbone=True), head_modules=["decode_head"])


def test_head_modules_are_inferred_or_reduced_to_the_outermost(tiny_model_dir):
    assert resolve_head_modules(build_classifier(tiny_model_dir, LABELS)) == ["classifier"]
    mean = build_classifier(tiny_model_dir, LABELS, head="mean")
    assert resolve_head_modules(mean) == ["classifier", "fc_norm"]
    assert resolve_head_modules(mean, ["vit.layers.1.mlp", "classifier", "vit.layers.1"]) == [
        "classifier",
        "vit.layers.1",
    ]


def one_step_changes(model: nn.Module) -> dict[str, bool]:
    """Run one AdamW step over every parameter (frozen ones included) and report which parameters moved."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.train()
    output = model(pixel_values=pixels(), labels=torch.tensor([0, 2]))
    output.loss.backward()
    optimizer.step()
    return {name: not torch.equal(before[name], p.detach()) for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("head", "options", "frozen_prefixes"),
    [
        ("cls", {"freeze_backbone": True}, ("vit.",)),
        ("mean", {"freeze_backbone": True}, ("vit.",)),
        ("cls", {"freeze_layers": 0}, ("vit.embeddings.",)),
        ("mean", {"freeze_layers": 1}, ("vit.embeddings.", "vit.layers.0.")),
        ("cls", {"freeze_layers": 2}, ("vit.embeddings.", "vit.layers.0.", "vit.layers.1.")),
    ],
)
def test_frozen_parameters_do_not_move_and_the_others_do(tiny_model_dir, head, options, frozen_prefixes):
    model = prepare_model(build_classifier(tiny_model_dir, LABELS, head=head), PeftArguments(**options))
    changed = one_step_changes(model)
    for name, parameter in model.named_parameters():
        frozen = name.startswith(frozen_prefixes)
        assert parameter.requires_grad is not frozen, name
        # A key bias shifts every attention logit of a query equally: softmax cancels it, its gradient is 0.
        if not name.endswith("k_proj.bias"):
            assert changed[name] is not frozen, name


def test_freeze_layers_out_of_range_fails_in_one_line(tiny_model_dir):
    model = build_classifier(tiny_model_dir, LABELS)
    with pytest.raises(UsfmaeError, match=f"out of range: the encoder has {DEPTH} blocks"):
        prepare_model(model, PeftArguments(freeze_layers=DEPTH + 1))


@pytest.fixture
def tiny_dpt():
    from transformers import DPTConfig, DPTForSemanticSegmentation

    torch.manual_seed(0)
    config = DPTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=HIDDEN,
        num_hidden_layers=DEPTH,
        num_attention_heads=2,
        intermediate_size=INTERMEDIATE,
        backbone_out_indices=[0, 1],
        neck_hidden_sizes=[8, 16],
        reassemble_factors=[4, 2],
        fusion_hidden_size=16,
        use_auxiliary_head=True,
        num_labels=2,
    )
    return DPTForSemanticSegmentation(config)


def test_segmentation_model_heads_are_inferred_and_lora_finds_legacy_names(tiny_dpt):
    head_parameters = sum(
        p.numel() for name in ("neck", "head", "auxiliary_head") for p in tiny_dpt.get_submodule(name).parameters()
    )
    model = prepare_model(tiny_dpt, PeftArguments(peft="lora"))
    adapters = {name for name, _ in model.named_parameters() if "lora_A" in name}
    # DPT's ViT keeps the legacy names: the default falls back to attention.attention.query / value.
    assert adapters == {
        f"base_model.model.dpt.encoder.layer.{i}.attention.attention.{proj}.lora_A.default.weight"
        for i in range(DEPTH)
        for proj in ("query", "value")
    }
    assert trainable_parameters(model)[0] == DEPTH * 2 * 8 * (HIDDEN + HIDDEN) + head_parameters
    output = model(pixel_values=pixels(), labels=torch.zeros(2, 32, 32, dtype=torch.long))
    output.loss.backward()


def test_head_names_matching_other_modules_by_suffix_are_refused(tiny_dpt):
    with pytest.raises(UsfmaeError, match="also match auxiliary_head"):
        prepare_model(tiny_dpt, PeftArguments(peft="lora"), head_modules=["neck", "head"])


def test_dpt_adapter_wraps_each_head_once_and_loads_back(tiny_dpt, tmp_path):
    """peft wraps every module whose name ends with a head's: DPT's ``head`` would also take ``head.head`` inside it
    (and ``auxiliary_head.head``), and an adapter with a wrapper inside another does not load back."""
    import copy

    from peft import PeftModel
    from peft.utils.other import ModulesToSaveWrapper

    base = copy.deepcopy(tiny_dpt)  # the same weights the adapter is trained on
    model = randomise_trainable(prepare_model(tiny_dpt, PeftArguments(peft="lora")))
    wrapped = [name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    assert wrapped == [f"base_model.model.{name}" for name in ("neck", "head.head", "auxiliary_head.head")]
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == [
        "auxiliary_head.head",
        "head.head",
        "neck",
    ]
    expected = logits(model, pixels())
    assert not torch.allclose(logits(base, pixels()), expected, atol=1e-3)
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(logits(reloaded, pixels()), expected, atol=1e-6, rtol=0)


def test_segmentation_freeze_layers_uses_the_encoder_block_list(tiny_dpt):
    prepare_model(tiny_dpt, PeftArguments(freeze_layers=1))
    frozen = {name for name, p in tiny_dpt.named_parameters() if not p.requires_grad}
    expected = {
        name for name, _ in tiny_dpt.named_parameters() if name.startswith(("dpt.embeddings.", "dpt.encoder.layer.0."))
    }
    assert frozen == expected


@pytest.mark.parametrize("head", ["cls", "mean"])
def test_adapter_round_trip_through_peft_from_pretrained(tiny_model_dir, tmp_path, head):
    from peft import PeftModel

    model = lora_model(tiny_model_dir, head)
    model.save_pretrained(tmp_path / "adapter")
    saved = sorted(path.name for path in (tmp_path / "adapter").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(saved) and "model.safetensors" not in saved
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    heads = ["classifier"] if head == "cls" else ["classifier", "fc_norm"]
    assert sorted(config["modules_to_save"]) == heads

    torch.manual_seed(123)  # a differently initialised new head: the adapter must bring the trained one
    base = build_classifier(tiny_model_dir, LABELS, head=head)
    untrained = logits(base, pixels())
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    expected = logits(model, pixels())
    assert not torch.allclose(untrained, expected, atol=1e-3)
    torch.testing.assert_close(logits(reloaded, pixels()), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("head", ["cls", "mean"])
def test_merged_export_is_a_plain_model_with_the_adapter_outputs(tiny_model_dir, tmp_path, head):
    from transformers import AutoModelForImageClassification, ViTForImageClassification

    from usfmae_hf.finetuning import UsfmaeForImageClassification

    model = lora_model(tiny_model_dir, head)
    expected = logits(model, pixels())
    base_outputs = logits(build_classifier(tiny_model_dir, LABELS, head=head), pixels())
    assert not torch.allclose(base_outputs, expected, atol=1e-3)

    merge_and_export(model, tmp_path / "merged")
    files = {path.name for path in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors"} <= files
    assert not any(name.startswith("adapter_") for name in files)
    assert ("modeling_usfmae.py" in files) is (head == "mean")  # the mean head ships its code
    merged = AutoModelForImageClassification.from_pretrained(tmp_path / "merged")
    assert type(merged) is (ViTForImageClassification if head == "cls" else UsfmaeForImageClassification)
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(logits(merged, pixels(1)), logits(model, pixels(1)), atol=1e-5, rtol=0)
    # The PeftModel given was merged as a copy: it still carries its adapters.
    assert any("lora_A" in name for name, _ in model.named_parameters())

    # From the adapter directory onto a freshly built base.
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UsfmaeError, match="needs the model it was trained on"):
        merge_and_export(tmp_path / "adapter", tmp_path / "merged2")
    base = build_classifier(tiny_model_dir, LABELS, head=head)
    merge_and_export(tmp_path / "adapter", tmp_path / "merged2", base_model=base)
    merged2 = AutoModelForImageClassification.from_pretrained(tmp_path / "merged2")
    torch.testing.assert_close(logits(merged2, pixels()), expected, atol=1e-5, rtol=0)


def test_plain_transformers_loads_the_merged_cls_model_in_a_fresh_process(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    merge_and_export(lora_model(tiny_model_dir, "cls"), tmp_path / "merged")
    torch.save(pixels(), tmp_path / "pixels.pt")
    script = (
        "import sys, torch; from transformers import AutoModelForImageClassification as A; "
        "m = A.from_pretrained(sys.argv[1]).eval(); x = torch.load(sys.argv[2]); "
        "torch.save(m(pixel_values=x).logits.detach(), sys.argv[3])"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "merged"), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
        check=True,
    )
    expected = logits(lora_model(tiny_model_dir, "cls"), pixels())  # the same seeded adapters and head
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-5, rtol=0)


def test_trainer_saves_a_peft_adapter_with_the_head(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import TrainingArguments

    from usfmae_hf.finetuning.recipe import ClassificationCollator, UsfmaeTrainer
    from usfmae_hf.image.processor import build_image_processor

    model = prepare_model(
        build_classifier(tiny_model_dir, LABELS), PeftArguments(peft="lora"), base_model_name_or_path=tiny_model_dir
    )
    dataset = [{"pixel_values": pixels(i, batch=1)[0], "labels": i % len(LABELS)} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
    )
    trainer = UsfmaeTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=ClassificationCollator(len(LABELS)),
        processing_class=build_image_processor(TINY_MAE_KWARGS["image_size"]),
        layer_decay=0.75,
    )
    trainer.train()
    trainer.save_model()
    # The layer-decay optimizer holds exactly the adapters and the head.
    optimized = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    assert optimized == trainable_parameters(model)[0] == DEPTH * 2 * 8 * 2 * HIDDEN + HEAD_PARAMETERS["cls"]
    assert trainer.predict(dataset).label_ids is not None  # labels still found through the PeftModel

    out = tmp_path / "run"
    files = {path.name for path in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "preprocessor_config.json"} <= files
    assert "model.safetensors" not in files
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tiny_model_dir)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["modules_to_save"] == ["classifier"]
    weights = load_file(out / "adapter_model.safetensors")
    trained_head = model.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(weights["base_model.model.classifier.weight"], trained_head.detach(), atol=0, rtol=0)
    lora_b = [value for key, value in weights.items() if "lora_B" in key]
    assert len(lora_b) == 2 * DEPTH and all(value.abs().sum() > 0 for value in lora_b)  # the adapters trained

    reloaded = PeftModel.from_pretrained(build_classifier(config["base_model_name_or_path"], LABELS), out)
    torch.testing.assert_close(logits(reloaded, pixels()), logits(model, pixels()), atol=1e-6, rtol=0)
