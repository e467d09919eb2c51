"""What a build writes about itself: the Markdown summary of its ingest report, and its dataset card.

The card is the Jinja template ``dataset.md`` of :mod:`usfmae_hf.publishing.templates` (the
top-level ``model_cards/`` folder), rendered by :meth:`huggingface_hub.DatasetCard.from_template`;
its schema (``dataset_info.features``) is :func:`usfmae_hf.ingest.decode.ingest_features`.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from usfmae_hf.ingest.decode import ingest_features

__all__ = ["render_dataset_card", "render_summary"]


def render_summary(report: dict[str, Any]) -> str:
    """``ingest_report.md``: one table row per dataset, then skipped folders, unreadable files, exclusions."""
    lines = [
        "# Ingest report",
        "",
        f"ROOT: `{report['root']}`; options: {report['options']}; {report['rows']} rows in all.",
        "",
        "| dataset | folder | rules | files | skipped by rules | frames | exact dups | near dups | unreadable | rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in report["datasets"]:
        name = d["dataset"] if d["in_catalogue"] else f"{d['dataset']} (not in catalogue)"
        counts = [d["files"], sum(d["excluded_by_rules"].values()), d["frames_read"], d["exact_duplicates"]]
        counts += [d["near_duplicates"], len(d["unreadable"]), d["rows"]]
        lines.append(f"| {name} | {d['folder']} | {d['layout_rules']} | " + " | ".join(map(str, counts)) + " |")
    if report["skipped_folders"]:
        lines += ["", "## Skipped folders", ""] + [f"- {s['folder']}: {s['reason']}" for s in report["skipped_folders"]]
    unreadable = [e for d in report["datasets"] for e in d["unreadable"]]
    if unreadable:
        lines += ["", "## Unreadable files (skipped)", ""] + [f"- `{e['path']}`: {e['reason']}" for e in unreadable]
    lines += ["", "## Excluded by the layout rules (examples)", ""]
    for d in report["datasets"]:
        for reason, examples in d["excluded_examples"].items():
            lines.append(f"- {d['dataset']}: {d['excluded_by_rules'][reason]} x {reason}, e.g. `{examples[0]}`")
    lines += ["", "Every duplicate, with the row it duplicates, is listed in `ingest_report.json`.", ""]
    return "\n".join(lines)


def render_dataset_card(report: dict[str, Any]) -> str:
    """``README.md`` of a build: Hub metadata (schema, Parquet config, sizes) and what the build holds."""
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        license="other",
        task_categories=["image-feature-extraction"],
        tags=["ultrasound", "medical-imaging", "openus-46", "usf-mae"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
        dataset_info={
            # datasets' own card serialisation of the features, the form it reads back.
            "features": ingest_features()._to_yaml_list(),
            # datasets caches a local folder under a hash of this YAML (not of the files): sizes that
            # change with the content keep a rebuilt or another same-named build from hitting a stale cache.
            "splits": [{"name": "train", "num_bytes": report["parquet_bytes"], "num_examples": report["rows"]}],
            "download_size": report["parquet_bytes"],
            "dataset_size": report["parquet_bytes"],
        },
    )
    # The file of usfmae_hf.publishing.templates, reached from the package root: no import of publishing.
    template = resources.files("usfmae_hf").joinpath("publishing", "templates", "dataset.md")
    card = DatasetCard.from_template(
        data, template_str=template.read_text(encoding="utf-8"), report=report, options=report["options"]
    )
    return str(card)
