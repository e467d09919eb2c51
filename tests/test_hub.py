"""Publishing: validation before upload, and pushes against a real local HTTP server speaking the Hub API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from usfmae_hf.cli import main
from usfmae_hf.publishing.hub import PublishError, push_model_dir, validate_model_dir

SECRET = "hf_usfmaeTestTokenThatMustNeverBePrinted"
REPO_ID = "tester/usf-mae-tiny"


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the converted tiny model that a test may modify."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "usf-mae-tiny"))


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---- validation ------------------------------------------------------------------------------


def test_converted_directory_is_valid(tiny_model_dir, tiny_vit_dir):
    assert validate_model_dir(tiny_model_dir) == tiny_model_dir.resolve()
    assert validate_model_dir(tiny_vit_dir) == tiny_vit_dir.resolve()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "extra/optimizer.pt", "ckpt.pth", "last.ckpt", "data.pkl"])
def test_pickle_files_are_refused(model_dir, name):
    (model_dir / name).parent.mkdir(exist_ok=True)
    (model_dir / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(PublishError, match=f"refusing to publish pickle files.*{name}"):
        validate_model_dir(model_dir)


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
    with pytest.raises(PublishError, match="model-00002-of-00002.safetensors is not a readable safetensors file"):
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
    from usfmae_hf.publishing.cards import REPO_ID_PLACEHOLDER

    assert f'repo_id = "{REPO_ID_PLACEHOLDER}"' in (model_dir / "README.md").read_text()  # as the converter wrote it
    commit = push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET, private=True)
    # The card's snippet now loads the repository it was published to, on disk and on the Hub alike.
    assert f'repo_id = "{REPO_ID}"' in (model_dir / "README.md").read_text()
    assert commit.commit_url == f"{hub_server.url}/{REPO_ID}/commit/{commit.oid}"
    remote = hub_server.files(REPO_ID)
    assert set(remote) == {".gitattributes", *local_files(model_dir)}
    for name, data in local_files(model_dir).items():
        assert remote[name] == data, name
    assert hub_server.repos[("model", REPO_ID)].private
    pushes = hub_server.requests_to("/api/repos/") + hub_server.requests_to(f"/api/models/{REPO_ID}/")
    assert pushes and all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in pushes)

    again = push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET)
    assert again.oid == commit.oid  # nothing changed, so no new commit
    assert len(hub_server.requests_to("/commit/")) == 1


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
    with pytest.raises(PublishError, match="500") as error:
        push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET, max_retries=0)
    assert SECRET not in str(error.value)
    assert set(hub_server.files(REPO_ID)) == {".gitattributes"}
    # ... and running it again completes it.
    push_model_dir(model_dir, REPO_ID, endpoint=hub_server.url, token=SECRET, max_retries=0)
    remote = hub_server.files(REPO_ID)
    assert all(remote[name] == data for name, data in local_files(model_dir).items())


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
    assert "card validation failed (ConnectError); retrying" in caplog.text


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

    (model_dir / "pytorch_model.bin").write_bytes(b"pickle")
    assert main(argv) == 2
    refused_out, refused_err = capsys.readouterr()
    assert "usfmae push: error: refusing to publish pickle files" in refused_err
    (model_dir / "pytorch_model.bin").unlink()

    hub_server.fail_next(1, path_contains="/api/validate-yaml", status=401, retry_after=None)
    assert main(argv) == 2
    failed_out, failed_err = capsys.readouterr()
    assert "error: the Hub refused the push" in failed_err
    for text in (out, err, refused_out, refused_err, failed_out, failed_err, caplog.text):
        assert SECRET not in text


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
