"""Pickles of protocol 0 and 1 (no header) are found by content; text files never are; nothing runs."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_checkpoints import _RunsCode  # pickles as a call to `touch MARKER`

from usfmae_hf.publishing.hub import PublishError, validate_model_dir
from usfmae_hf.publishing.pickles import find_pickle

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = (".md", ".json", ".txt", ".csv", ".py", ".cfg", ".toml", ".yaml", ".yml", ".html", ".sh")


OBJECTS = {
    "dict": {"looks": "harmless", "n": 3},
    "list": [1, 2.5, "x", None, True],
    "string": "plain words",
    "int": 7,
    "none": None,
    "nested": {"a": [(1, 2), {"b": b"bytes"}]},
}


@pytest.mark.parametrize("protocol", [0, 1])
@pytest.mark.parametrize("kind", list(OBJECTS))
@pytest.mark.parametrize("name", ["notes.txt", "config.json", "table.csv", "README.md", "weights"])
def test_headerless_pickles_are_found_whatever_their_name(tmp_path, protocol, kind, name):
    data = pickle.dumps(OBJECTS[kind], protocol=protocol)
    assert data[0] != 0x80  # no PROTO header at these protocols: only the opcodes give it away
    assert pickle.loads(data) == OBJECTS[kind]  # a real pickle
    (tmp_path / name).write_bytes(data)
    found = find_pickle(tmp_path / name)
    assert found is not None and found.format == "pickle" and "protocol 0 or 1" in found.description


@pytest.mark.parametrize("protocol", [0, 1])
def test_a_code_running_pickle_is_found_and_never_run(tmp_path, protocol):
    marker = tmp_path / "PWNED"
    data = pickle.dumps({"x": _RunsCode(marker)}, protocol=protocol)
    assert b"system" in data  # it names os.system (posix.system): loading it would run the command
    (tmp_path / "innocent.txt").write_bytes(data)
    assert find_pickle(tmp_path / "innocent.txt").format == "pickle"
    assert not marker.exists()


def test_a_pickle_longer_than_the_part_read_is_found(tmp_path):
    data = pickle.dumps(list(range(300_000)), protocol=0)  # "I123\naI124\na..." for about 2.5 MB
    assert len(data) > 2 << 20
    (tmp_path / "big.txt").write_bytes(data)
    assert find_pickle(tmp_path / "big.txt") is not None


def test_a_pickle_must_end_in_stop_within_the_file(tmp_path):
    data = pickle.dumps({"a": [1, 2, 3]}, protocol=0)
    (tmp_path / "followed.txt").write_bytes(data + b"anything after STOP\n")  # as torch's legacy files are
    (tmp_path / "cut.txt").write_bytes(data[:-1])
    assert find_pickle(tmp_path / "followed.txt") is not None
    assert find_pickle(tmp_path / "cut.txt") is None


TEXTS = {
    "README.md": "# USF-MAE\n\nA model card.\n",
    "card.md": "---\nlicense: mit\ntags:\n- ultrasound\n---\n# Model\n",
    "config.json": json.dumps({"model_type": "vit_mae", "hidden_size": 32}, indent=2),
    "list.json": "[1, 2, 3]\n",
    "string.json": '"a json string"\n',
    "number.json": "42\n",
    "null.json": "null\n",
    "table.csv": "path,label\nI1.png,benign\n",
    "numbers.csv": "1,2,3\n4,5,6\n",
    "integer-first.txt": "I1\nsome notes after an integer line\n",
    "letters.txt": "Lorem ipsum dolor sit amet.\n",
    "capital-i.txt": "I think so.\n",
    "n-slash-a.txt": "N/A\n",
    "parenthesis.txt": "(see below)\n",
    "brackets.txt": "]]\n",
    "empty.txt": "",
    "script.py": '"""A module."""\n\nimport os\n',
}


@pytest.mark.parametrize("name", list(TEXTS))
def test_text_files_are_not_pickles(tmp_path, name):
    (tmp_path / name).write_text(TEXTS[name])
    assert find_pickle(tmp_path / name) is None


def test_no_text_file_of_this_repository_is_a_pickle():
    texts = [
        path
        for path in REPO.rglob("*")
        if path.suffix in TEXT_SUFFIXES
        and path.is_file()
        and not {".git", ".venv", ".venv-tf4", "node_modules"} & set(path.relative_to(REPO).parts)
    ]
    assert len(texts) > 100
    assert [str(path) for path in texts if find_pickle(path) is not None] == []


def test_push_refuses_a_headerless_pickle_named_like_text(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    validate_model_dir(model_dir)  # the converted directory itself is publishable
    (model_dir / "notes.txt").write_bytes(pickle.dumps({"optimizer": [1.0, 2.0]}, protocol=1))
    with pytest.raises(PublishError, match=r"refusing to publish pickles.*notes\.txt is a pickle \(protocol 0 or 1"):
        validate_model_dir(model_dir)


def test_detection_reads_without_importing_anything_new(tmp_path):
    """A GLOBAL opcode naming an unimported module: reading the stream must not import it."""
    data = b"cusfmae_never_imported_module\nfunction\n(tR."
    (tmp_path / "x.txt").write_bytes(data)
    code = (
        "import sys; from usfmae_hf.publishing.pickles import find_pickle; "
        f"print(find_pickle({str(tmp_path / 'x.txt')!r}) is not None, 'usfmae_never_imported_module' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False"]
