"""Publishing: validation before upload, and pushes against a real local HTTP server speaking the Hub API."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from usfmae_hf.cli import main
from usfmae_hf.publishing import upload_plan as hub  # the Hub's limits and file rules live there
from usfmae_hf.publishing.cards import REPO_ID_PLACEHOLDER
from usfmae_hf.publishing.hub import PublishError, plan_upload, push_model_dir, validate_model_dir
from usfmae_hf.publishing.pickles import find_pickle

SECRET = "hf_usfmaeTestTokenThatMustNeverBePrinted"
REPO_ID = "tester/usf-mae-tiny"


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the converted tiny model that a test may modify."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "usf-mae-tiny"))


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def tree_state(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` as ``lstat`` sees it (links not followed): mode, mtime, content or target."""
    state = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                content = path.read_bytes()
            else:
                content = None
            state[path.relative_to(folder).as_posix()] = (info.st_mode, info.st_mtime_ns, content)
    return state


def with_repo_id(card: bytes, repo_id: str = REPO_ID) -> bytes:
    return card.replace(f'"{REPO_ID_PLACEHOLDER}"'.encode(), f'"{repo_id}"'.encode())


# ---- validation ------------------------------------------------------------------------------


def test_converted_directory_is_valid(tiny_model_dir, tiny_vit_dir):
    assert validate_model_dir(tiny_model_dir) == tiny_model_dir.resolve()
    assert validate_model_dir(tiny_vit_dir) == tiny_vit_dir.resolve()


def _torch_bytes(**save_options) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(2)}, buffer, **save_options)
    return buffer.getvalue()


def _optimizer_state() -> bytes:
    import io

    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([parameter])
    parameter.sum().backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return buffer.getvalue()


PICKLES = {
    "innocent.txt": lambda: pickle.dumps({"looks": "harmless"}),
    "data.pkl": lambda: pickle.dumps([1, 2, 3], protocol=5),
    "pytorch_model.bin": _torch_bytes,
    "extra/optimizer.pth.tar": _optimizer_state,
    "legacy.pt": lambda: _torch_bytes(_use_new_zipfile_serialization=False),
    # protocol 1 starts with text, not PROTO: only torch's magic number gives it away
    "weights.json": lambda: _torch_bytes(_use_new_zipfile_serialization=False, pickle_protocol=1),
}


@pytest.mark.parametrize("name", list(PICKLES))
def test_pickles_are_refused_by_content_whatever_their_name(model_dir, name, tmp_path):
    data = PICKLES[name]()
    # the test data are real pickles: torch's and pickle's own loaders read them
    (tmp_path / "probe").write_bytes(data)
    if name in ("legacy.pt", "weights.json"):  # legacy files are pickles in a row, torch's magic number first
        assert pickle.loads(data) == torch.serialization.MAGIC_NUMBER
    elif name.endswith((".txt", ".pkl")):
        assert pickle.loads(data)
    else:
        assert torch.load(tmp_path / "probe", weights_only=True)
    (model_dir / name).parent.mkdir(exist_ok=True)
    (model_dir / name).write_bytes(data)
    with pytest.raises(PublishError, match=f"refusing to publish pickles.*{name} is a") as error:
        validate_model_dir(model_dir)
    assert "\n" not in str(error.value)


def test_safetensors_json_png_markdown_and_raw_binaries_pass(model_dir):
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import save_file

    # A safetensors file starts with its header length (u64, little endian): find one whose first two
    # bytes read like a pickle's PROTO 2 header, which a check of two bytes would wrongly refuse.
    for padding in range(2048):
        save_file({"w": torch.zeros(4)}, model_dir / "extra.safetensors", metadata={"pad": "x" * padding})
        if (model_dir / "extra.safetensors").read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("no header length starting with 0x80 0x02")
    with safe_open(model_dir / "extra.safetensors", framework="pt") as weights:  # safetensors reads it...
        assert list(weights.keys()) == ["w"]
    with pytest.raises(pickle.UnpicklingError):  # ... and no unpickler can
        pickle.loads((model_dir / "extra.safetensors").read_bytes())
    Image.new("L", (8, 8), 128).save(model_dir / "roc.png")
    (model_dir / "all_results.json").write_text(json.dumps({"test_accuracy": 0.5}))
    (model_dir / "NOTES.md").write_text("# Notes\n")
    torch.ones(16).numpy().tofile(model_dir / "raw.bin")  # a .bin that is no pickle
    for name in ("extra.safetensors", "roc.png", "all_results.json", "NOTES.md", "raw.bin", "model.safetensors"):
        assert find_pickle(model_dir / name) is None, name
    assert {"extra.safetensors", "roc.png", "all_results.json", "NOTES.md", "raw.bin"} <= set(
        plan_upload(model_dir).files
    )


def test_missing_files_are_all_listed(model_dir):
    (model_dir / "preprocessor_config.json").unlink()
    (model_dir / "model.safetensors").rename(model_dir / "weights.safetensors")
    with pytest.raises(PublishError) as error:
        validate_model_dir(model_dir)
    assert "missing preprocessor_config.json" in str(error.value)
    assert "no weights" in str(error.value)


def test_sharded_weights_need_every_shard(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PublishError, match="model-00002-of-00002.safetensors, listed in .*, is missing"):
        validate_model_dir(model_dir)
    shutil.copy(model_dir / "model-00001-of-00002.safetensors", model_dir / "model-00002-of-00002.safetensors")
    validate_model_dir(model_dir)


def test_corrupt_weights_are_refused(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PublishError, match="model.safetensors is not a readable safetensors file"):
        validate_model_dir(model_dir)


@pytest.mark.parametrize(
    ("readme", "message"),
    [
        ("# No metadata at all\n", "lacks license, library_name, pipeline_tag"),
        ("---\nlicense: mit\nlibrary_name: transformers\n---\n# x\n", "lacks pipeline_tag"),
        ("---\nlicense: [mit\n---\n# x\n", "metadata is invalid"),
        ("---\nlicense: mit\nmodel-index:\n- name: x\n  results: [{task: 1}]\n---\n", "metadata is invalid"),
    ],
)
def test_invalid_card_metadata_is_refused(model_dir, readme, message):
    (model_dir / "README.md").write_text(readme)
    with pytest.raises(PublishError, match=message):
        validate_model_dir(model_dir)


def test_config_and_processor_must_load(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    (model_dir / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(PublishError) as error:
        validate_model_dir(model_dir)
    assert "config.json does not load with AutoConfig" in str(error.value)
    assert "preprocessor_config.json does not load with AutoImageProcessor" in str(error.value)


# ---- pushing -------------------------------------------------------------------------------


def test_push_uploads_files_byte_for_byte_and_twice_is_a_noop(model_dir, hub_server):  # noqa: F811
    local_card = (model_dir / "README.md").read_bytes()
    assert f'repo_id = "{REPO_ID_PLACEHOLDER}"'.encode() in local_card  # as the converter wrote it
    before = tree_state(model_dir)
    commit = push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET, private=True)
    assert tree_state(model_dir) == before  # nothing local changed, the card included
    assert commit.commit_url == f"{hub_server.url}/{REPO_ID}/commit/{commit.oid}"
    remote = hub_server.files(REPO_ID)
    assert set(remote) == {".gitattributes", *local_files(model_dir)}
    # The published card's snippet loads the repository it was published to; every other file is as on disk.
    assert remote["README.md"] == with_repo_id(local_card) != local_card
    for name, data in local_files(model_dir).items():
        if name != "README.md":
            assert remote[name] == data, name
    assert hub_server.repos[("model", REPO_ID)].private
    pushes = hub_server.requests_to("/api/repos/") + hub_server.requests_to(f"/api/models/{REPO_ID}/")
    assert pushes and all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in pushes)

    again = push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET)
    assert again.oid == commit.oid  # nothing changed, so no new commit
    assert len(hub_server.requests_to("/commit/")) == 1

    push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET, update_local_card=True)
    assert (model_dir / "README.md").read_bytes() == remote["README.md"]  # asked for: the local card now matches


def test_push_to_new_branch_and_as_pull_request(model_dir, hub_server):  # noqa: F811
    push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET)
    (model_dir / "README.md").write_text((model_dir / "README.md").read_text() + "\nRevised.\n")

    push_model_dir(
        model_dir, REPO_ID, revision="v2", endpoint=hub_server.url, token=SECRET, commit_message="Revise card"
    )
    assert hub_server.files(REPO_ID, "v2")["README.md"].endswith(b"Revised.\n")
    assert not hub_server.files(REPO_ID, "main")["README.md"].endswith(b"Revised.\n")
    assert (
        hub_server.repos[("model", REPO_ID)].commits[hub_server.repos[("model", REPO_ID)].refs["v2"]].message
        == "Revise card"
    )

    commit = push_model_dir(model_dir, REPO_ID, create_pr=True, endpoint=hub_server.url, token=SECRET)
    assert commit.pr_url.endswith(f"{REPO_ID}/discussions/1")
    assert hub_server.files(REPO_ID, "refs/pr/1")["README.md"].endswith(b"Revised.\n")
    assert not hub_server.files(REPO_ID, "main")["README.md"].endswith(b"Revised.\n")

    with pytest.raises(PublishError, match="cannot be combined with --revision"):
        push_model_dir(model_dir, REPO_ID, create_pr=True, revision="v2", endpoint=hub_server.url)


def test_interrupted_push_completes_when_rerun(model_dir, hub_server):  # noqa: F811
    # More failures than huggingface_hub's own 5 retries of the commit request: the push fails...
    hub_server.fail_next(6, path_contains="/commit/")
    before = tree_state(model_dir)
    with pytest.raises(PublishError, match="500") as error:
        push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET)
    assert SECRET not in str(error.value)
    assert len(hub_server.requests_to("/commit/")) == 6  # huggingface_hub's retries only, none stacked on top
    assert set(hub_server.files(REPO_ID)) == {".gitattributes"}
    assert tree_state(model_dir) == before  # a failed push changes nothing locally either
    # ... and running it again completes it.
    push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET)
    remote = hub_server.files(REPO_ID)
    assert all(remote[name] == data for name, data in local_files(model_dir).items() if name != "README.md")
    assert tree_state(model_dir) == before


def test_transient_errors_are_retried(model_dir, hub_server):  # noqa: F811
    hub_server.fail_next(2, path_contains="/api/repos/create", status=503)
    push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET, max_retries=2, retry_wait=0.01)
    assert [r.status for r in hub_server.requests_to("/api/repos/create")] == [503, 503, 200]
    assert "README.md" in hub_server.files(REPO_ID)


def test_offline_mode_is_one_clear_error(model_dir):
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set"):
        push_model_dir(model_dir, REPO_ID, endpoint="http://127.0.0.1:9", token=SECRET)


def test_unreachable_hub_is_one_clear_error(model_dir, caplog, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(PublishError, match="cannot reach http://127.0.0.1:9: ConnectError"):
        push_model_dir(model_dir, REPO_ID, endpoint="http://127.0.0.1:9", token=SECRET, max_retries=1, retry_wait=0.01)
    assert "validate-yaml" in caplog.text and "Retrying in 0.01s [Retry 1/1]" in caplog.text  # huggingface_hub's


def test_hub_side_card_validation_blocks_the_upload(model_dir, hub_server):  # noqa: F811
    readme = model_dir / "README.md"
    readme.write_text(readme.read_text().replace("- ultrasound\n", "- ultrasound\n- {not: a string}\n", 1))
    with pytest.raises(PublishError, match='"tags" must be a list of strings'):
        push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET)
    assert not hub_server.repos


def test_cli_push_prints_commit_url_never_the_token(model_dir, hub_server, capsys, caplog):  # noqa: F811
    argv = ["push", str(model_dir), "--repo-id", REPO_ID, "--token", SECRET, "--endpoint", hub_server.url]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    commit_oid = hub_server.repos[("model", REPO_ID)].refs["main"]
    assert f"{hub_server.url}/{REPO_ID}/commit/{commit_oid}" in out

    (model_dir / "pytorch_model.bin").write_bytes(_torch_bytes())
    assert main(argv) == 2
    refused_out, refused_err = capsys.readouterr()
    assert "usfmae push: error: " in refused_err and "refusing to publish pickles" in refused_err
    (model_dir / "pytorch_model.bin").unlink()

    hub_server.fail_next(1, path_contains="/api/validate-yaml", status=401, retry_after=None)
    assert main(argv) == 2
    failed_out, failed_err = capsys.readouterr()
    assert "error: the Hub refused the push" in failed_err
    for text in (out, err, refused_out, refused_err, failed_out, failed_err, caplog.text):
        assert SECRET not in text


# ---- what leaves the machine ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_symlink_out_of_the_folder_is_refused_and_nothing_is_uploaded(model_dir, hub_server, tmp_path, kind):  # noqa: F811
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("private notes")
    (model_dir / "notes").symlink_to(outside / "secret.txt" if kind == "file" else outside)
    before = tree_state(model_dir)
    with pytest.raises(PublishError, match=r"notes is a symlink to .*outside") as error:
        push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET)
    assert "\n" not in str(error.value)
    assert hub_server.requests == [] and not hub_server.repos
    assert tree_state(model_dir) == before


def test_links_inside_the_folder(model_dir, hub_server, caplog):  # noqa: F811
    (model_dir / "sub").mkdir()
    (model_dir / "sub" / "labels.json").write_text('{"0": "benign"}')
    (model_dir / "copy_of_config.json").symlink_to("config.json")  # a link to a file inside: its content, its name
    (model_dir / "alias").symlink_to("sub", target_is_directory=True)  # a link to a folder inside: not followed
    before = tree_state(model_dir)
    push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET)
    remote = hub_server.files(REPO_ID)
    assert remote["copy_of_config.json"] == (model_dir / "config.json").read_bytes()
    assert remote["sub/labels.json"] == b'{"0": "benign"}'
    assert not any(name.startswith("alias") for name in remote)
    assert "alias links to the folder sub/ and is not followed" in caplog.text
    assert tree_state(model_dir) == before


@pytest.mark.parametrize("kind", ["dangling", "loop", "fifo"])
def test_dangling_links_loops_and_special_files_are_one_clear_line(model_dir, kind):
    if kind == "dangling":
        (model_dir / "gone.json").symlink_to(model_dir / "nowhere.json")
        expected = "gone.json is a dangling symlink"
    elif kind == "loop":
        (model_dir / "a").symlink_to("b")
        (model_dir / "b").symlink_to("a")
        expected = "a is a symlink loop; b is a symlink loop"
    else:
        os.mkfifo(model_dir / "pipe")  # reading it would block the push forever
        expected = "pipe is not a regular file"
    with pytest.raises(PublishError, match=expected) as error:
        validate_model_dir(model_dir)
    assert "\n" not in str(error.value)


def test_trainer_file_names_are_transformers_own():
    from transformers import trainer

    names = {trainer.TRAINING_ARGS_NAME, trainer.OPTIMIZER_NAME, trainer.SCHEDULER_NAME, trainer.SCALER_NAME}
    assert names | {"rng_state*.pth"} == set(hub.TRAINER_STATE_FILES)
    assert hub.CHECKPOINT_DIRS == f"{trainer.PREFIX_CHECKPOINT_DIR}-*"


@pytest.fixture
def finetuning_output(model_dir, tmp_path) -> Path:
    """A folder laid out as fine-tuning writes it, Trainer pickles and checkpoints included."""
    from PIL import Image
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(model_dir), hub_token=SECRET, report_to=[])
    torch.save(args, model_dir / "training_args.bin")  # what Trainer.save_model writes
    (model_dir / "training_args.json").write_text(args.to_json_string())
    (model_dir / "all_results.json").write_text(json.dumps({"test_accuracy": 0.75}))
    (model_dir / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (model_dir / "test_predictions.csv").write_text("id,label,label_name,prediction\n0,1,malignant,1\n")
    Image.new("RGB", (16, 16), "white").save(model_dir / "test_roc.png")
    checkpoint = model_dir / "checkpoint-2"
    checkpoint.mkdir()
    shutil.copy(model_dir / "model.safetensors", checkpoint)
    shutil.copy(model_dir / "trainer_state.json", checkpoint)
    shutil.copy(model_dir / "training_args.bin", checkpoint)
    (checkpoint / "optimizer.pt").write_bytes(_optimizer_state())
    torch.save({"cpu": torch.random.get_rng_state()}, checkpoint / "rng_state.pth")
    return model_dir


def test_finetuning_output_pushes_as_it_is(finetuning_output, hub_server, caplog):  # noqa: F811
    assert find_pickle(finetuning_output / "training_args.bin").format == "torch-zip"  # refused if it were sent
    before = tree_state(finetuning_output)
    push_model_dir(finetuning_output, REPO_ID, endpoint=hub_server.url, token=SECRET)
    remote = hub_server.files(REPO_ID)
    assert set(remote) == {
        ".gitattributes",
        "README.md",
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
        "all_results.json",
        "trainer_state.json",
        "training_args.json",
        "test_predictions.csv",
        "test_roc.png",
    }
    assert SECRET.encode() not in remote["training_args.json"]  # TrainingArguments redacts tokens in JSON
    assert "left out training_args.bin: Trainer state pickles" in caplog.text
    assert "left out checkpoint-2/: Trainer checkpoints (--include-checkpoints" in caplog.text
    assert tree_state(finetuning_output) == before


def test_cli_push_with_checkpoints_leaves_their_state_pickles_out(finetuning_output, hub_server, caplog):  # noqa: F811
    argv = ["push", str(finetuning_output), "--repo-id", REPO_ID, "--endpoint", hub_server.url, "--include-checkpoints"]
    assert main([*argv, "--token", SECRET]) == 0
    remote = hub_server.files(REPO_ID)
    assert remote["checkpoint-2/model.safetensors"] == (finetuning_output / "model.safetensors").read_bytes()
    assert "checkpoint-2/trainer_state.json" in remote
    left_out = ["checkpoint-2/optimizer.pt", "checkpoint-2/rng_state.pth", "checkpoint-2/training_args.bin"]
    assert not set(left_out) & set(remote) and "training_args.bin" not in remote
    assert f"left out {', '.join(left_out)}, training_args.bin: Trainer state pickles" in caplog.text
    assert SECRET not in caplog.text


def test_files_over_the_hub_limit_are_refused_before_uploading(model_dir, hub_server, monkeypatch, caplog):  # noqa: F811
    size = (model_dir / "model.safetensors").stat().st_size
    monkeypatch.setattr(hub, "MAX_FILE_BYTES", size - 1)
    with pytest.raises(PublishError, match=r"model.safetensors is [0-9.e-]+ GB, over the Hub's limit") as error:
        push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET)
    assert "\n" not in str(error.value)
    assert hub_server.requests == []

    monkeypatch.setattr(hub, "MAX_FILE_BYTES", size)
    monkeypatch.setattr(hub, "RECOMMENDED_MAX_FILE_BYTES", size - 1)
    push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET)
    assert "model.safetensors is" in caplog.text and "the Hub recommends files under" in caplog.text
    assert "model.safetensors" in hub_server.files(REPO_ID)


def test_hub_server_lfs_upload_listing_and_download(model_dir, tmp_path, monkeypatch):
    """The test server's Git LFS path (used by e.g. ``datasets``' push_to_hub) and its listings."""
    from hub_server import HubServer
    from huggingface_hub import HfApi, constants, hf_hub_download

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # hf_xet would use the Xet protocol for LFS files
    with HubServer(lfs_patterns=["*.safetensors"]) as server:
        api = HfApi(endpoint=server.url, token=SECRET)
        api.create_repo(REPO_ID)
        api.upload_folder(repo_id=REPO_ID, folder_path=model_dir, path_in_repo="weights")
        assert len(server.requests_to("/lfs-upload/", method="PUT")) == 1
        assert server.files(REPO_ID)["weights/model.safetensors"] == (model_dir / "model.safetensors").read_bytes()
        tree = {f.path: f for f in api.list_repo_tree(REPO_ID, recursive=True)}
        assert set(tree) == {".gitattributes", "weights", *(f"weights/{name}" for name in local_files(model_dir))}
        assert tree["weights/model.safetensors"].lfs is not None and tree["weights/config.json"].lfs is None
        assert [f.path for f in api.list_repo_tree(REPO_ID)] == [".gitattributes", "weights"]
        assert sorted(f.path for f in api.get_paths_info(REPO_ID, ["weights", "weights/README.md", "absent"])) == [
            "weights",
            "weights/README.md",
        ]
        path = hf_hub_download(REPO_ID, "weights/model.safetensors", endpoint=server.url, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == (model_dir / "model.safetensors").read_bytes()


@pytest.fixture
def custom_code_classifier_dir(tiny_vit_dir, tmp_path) -> Path:
    """A mean-head classifier as fine-tuning saves it: its own modeling code, config ``auto_map``, a card."""
    from transformers import AutoImageProcessor

    from usfmae_hf.finetuning import build_classifier
    from usfmae_hf.publishing.cards import render_model_card

    folder = tmp_path / "classifier"
    model = build_classifier(tiny_vit_dir, ["benign", "malignant"], head="mean")
    model.save_pretrained(folder)
    AutoImageProcessor.from_pretrained(tiny_vit_dir).save_pretrained(folder)
    render_model_card("classifier", config=model.config).save(folder / "README.md")
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    return folder


def test_from_pretrained_downloads_what_was_pushed(model_dir, custom_code_classifier_dir, hub_server, tmp_path):  # noqa: F811
    """In a fresh process (nothing registered) pointed at the server with HF_ENDPOINT: the pushed models load
    with the Auto classes, and a custom-code classifier directory validates (its code is trusted)."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForImageClassification

    classifier_repo = "tester/usf-mae-classifier"
    push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET)
    push_model_dir(custom_code_classifier_dir, classifier_repo, endpoint=hub_server.url, token=SECRET)
    assert "modeling_usfmae.py" in hub_server.files(classifier_repo)
    script = textwrap.dedent(
        f"""
        from safetensors.torch import save_file
        from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification
        from usfmae_hf.publishing.hub import validate_model_dir

        validate_model_dir({str(custom_code_classifier_dir)!r})
        model = AutoModel.from_pretrained({REPO_ID!r})
        processor = AutoImageProcessor.from_pretrained({REPO_ID!r})
        assert processor.size == {{"height": 32, "width": 32}}, processor.size
        classifier = AutoModelForImageClassification.from_pretrained({classifier_repo!r}, trust_remote_code=True)
        for name, loaded in (("mae", model), ("classifier", classifier)):
            save_file({{k: v.contiguous() for k, v in loaded.state_dict().items()}}, {str(tmp_path)!r} + f"/{{name}}.safetensors")
        print(type(model).__name__, type(classifier).__name__)
        """
    )
    env = {**os.environ, "HF_ENDPOINT": hub_server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_TOKEN", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ViTMAEModel UsfmaeForImageClassification"
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub_server.requests_to(f"/{REPO_ID}/resolve/", method="GET")}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= fetched

    for name, expected in (
        ("mae", AutoModel.from_pretrained(model_dir)),
        ("classifier", AutoModelForImageClassification.from_pretrained(custom_code_classifier_dir)),
    ):
        got, reference = load_file(tmp_path / f"{name}.safetensors"), expected.state_dict()
        assert got.keys() == reference.keys(), name
        for key, tensor in reference.items():
            assert torch.equal(got[key], tensor), f"{name}: {key}"
