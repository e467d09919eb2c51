"""The scripts in examples/ run end to end, in reduced size, on tiny models and tiny images."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ("feature_retrieval", "finetune_folders", "reconstruction_figures")


def run_example(name: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("USFMAE_DEBUG", None)
    command = [sys.executable, str(EXAMPLES / f"{name}.py"), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


PATTERNS = {
    "rows": lambda y, x: 255 * y / 39,
    "columns": lambda y, x: 255 * x / 47,
    "disc": lambda y, x: np.where((y - 20) ** 2 + (x - 24) ** 2 < 144, 230.0, 30.0),
}


def noisy(pattern: str, seed: int) -> Image.Image:
    """A 40x48 grey image of ``pattern`` with a little Gaussian noise (different per ``seed``)."""
    y, x = np.mgrid[0:40, 0:48].astype(np.float64)
    noise = np.random.default_rng(seed).normal(0, 6, (40, 48))
    return Image.fromarray(np.clip(PATTERNS[pattern](y, x) + noise, 0, 255).astype(np.uint8), mode="L")


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_the_example_command(name, capsys):
    module = load_example(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"python examples/{name}.py" in out and "Reduced size" in out


def test_feature_retrieval_finds_the_near_duplicates(tiny_model_dir, tmp_path):
    scans = tmp_path / "scans"
    (scans / "sub").mkdir(parents=True)
    for index, pattern in enumerate(PATTERNS):
        noisy(pattern, 2 * index).save(scans / f"{pattern}_a.png")
        noisy(pattern, 2 * index + 1).save(scans / "sub" / f"{pattern}_b.png")
    (scans / "broken.png").write_bytes(b"not a png")
    query = tmp_path / "disc_query.png"
    noisy("disc", 99).save(query)
    output = tmp_path / "retrieval"

    result = run_example("feature_retrieval", "--model", tiny_model_dir, "--images", scans, "--k", "2", "-o", output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "broken.png" in result.stderr and "indexed 6 frame(s)" in result.stdout
    rows = read_csv(output / "neighbours.csv")
    assert len(rows) == 6 * 2 and all(row["path"] != row["query_path"] for row in rows)
    # each image's nearest neighbour is the other noisy copy of its pattern
    for row in rows:
        if row["rank"] == "1":
            assert Path(row["path"]).stem[:-2] == Path(row["query_path"]).stem[:-2], row
    # the distances are cosine distances of the saved features, recomputed here
    table = pq.read_table(output / "features.parquet").to_pydict()
    features = {path: np.asarray(f, dtype=np.float64) for path, f in zip(table["path"], table["features"])}
    for row in rows:
        a, b = features[row["query_path"]], features[row["path"]]
        cosine = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert float(row["cosine_distance"]) == pytest.approx(cosine, abs=1e-5)

    result = run_example(
        "feature_retrieval", "--model", tiny_model_dir, "--images", scans, "--query", query, "--k", "1",
        "-o", output, "--overwrite",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_csv(output / "neighbours.csv")
    assert row["query_path"] == str(query) and Path(row["path"]).stem.startswith("disc_")


def test_finetune_folders_trains_and_reports(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    for split, count in (("train", 6), ("validation", 3), ("test", 3)):
        for label, pattern in enumerate(("rows", "disc")):
            folder = data / split / pattern
            folder.mkdir(parents=True)
            for index in range(count):
                noisy(pattern, 100 * label + 10 * count + index).save(folder / f"{index}.png")
    output = tmp_path / "run"
    result = run_example(
        "finetune_folders", "--model", tiny_model_dir, "--data", data, "--output-dir", output,
        "--max-steps", "3", "--batch-size", "4", "--learning-rate", "1e-3", "--cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test: accuracy" in result.stdout
    results = json.loads((output / "all_results.json").read_text())
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["test_num_samples"] == 6
    predictions = read_csv(output / "test_predictions.csv")
    assert len(predictions) == 6 and {row["label_name"] for row in predictions} == {"rows", "disc"}
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "test_roc.png"):
        assert (output / name).is_file(), name

    result = run_example("finetune_folders", "--model", tiny_model_dir, "--data", tmp_path / "nothing", "-o", output)
    assert result.returncode == 2 and "no such folder" in result.stderr.strip().splitlines()[-1]


def test_reconstruction_figures_per_image_and_ratio(tiny_model_dir, tiny_vit_dir, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a_broken.png").write_bytes(b"not a png")
    for pattern in ("disc", "rows", "columns"):
        noisy(pattern, 0).save(scans / f"{pattern}.png")
    output = tmp_path / "figures"
    result = run_example(
        "reconstruction_figures", scans, "--model", tiny_model_dir, "-o", output,
        "--mask-ratio", "0.5", "0.75", "--max-images", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "a_broken.png" in result.stderr
    rows = read_csv(output / "summary.csv")
    assert [(Path(row["path"]).name, float(row["mask_ratio"])) for row in rows] == [
        ("columns.png", 0.5),
        ("columns.png", 0.75),
        ("disc.png", 0.5),
        ("disc.png", 0.75),
    ]
    for row in rows:
        # 16 patches: exactly 8 or 12 hidden
        assert float(row["masked_fraction"]) == float(row["mask_ratio"])
        assert 0.0 < float(row["masked_mse"]) < 255.0**2
        with Image.open(output / row["figure"]) as figure:
            assert figure.format == "PNG" and figure.size == (1200, 300)  # one row of four panels
    assert sorted(p.name for p in output.glob("*.png")) == sorted(row["figure"] for row in rows)

    result = run_example("reconstruction_figures", scans, "--model", tiny_vit_dir, "-o", tmp_path / "vit")
    assert result.returncode == 2 and "need the MAE decoder" in result.stderr.strip().splitlines()[-1]
