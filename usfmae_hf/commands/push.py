"""``usfmae push``: validate a model directory and publish it to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="validate a model directory and upload it to the Hugging Face Hub",
        description=(
            "Validate DIR (config, image processor and safetensors weights load; no pickle files; "
            "model card metadata valid), create the Hub repository if needed and upload the folder. "
            "Unchanged files are skipped, so pushing the same folder again succeeds. The token comes "
            "from --token, HF_TOKEN or `hf auth login`, and is never printed."
        ),
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="model directory (e.g. the output of `usfmae convert`)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, as NAMESPACE/NAME")
    parser.add_argument(
        "--private", action="store_true", help="create the repository as private (if it does not exist)"
    )
    parser.add_argument(
        "--revision", metavar="BRANCH", help="branch to push to; created from main if missing (default: main)"
    )
    parser.add_argument(
        "--create-pr", action="store_true", help="open a pull request against main instead of committing to it"
    )
    parser.add_argument(
        "--commit-message", metavar="MSG", help="commit title (default: 'Upload DIR with usfmae-hf VERSION')"
    )
    parser.add_argument("--token", help="Hub access token with write access (default: HF_TOKEN or the saved login)")
    parser.add_argument(
        "--endpoint", metavar="URL", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)"
    )
    parser.add_argument(
        "--max-retries", type=int, default=3, help="retries of transient failures (5xx, 429, network; default: 3)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_hf.publishing.hub import push_model_dir

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per HTTP request is noise here
    commit = push_model_dir(
        args.dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        token=args.token,
        endpoint=args.endpoint,
        max_retries=args.max_retries,
    )
    print(f"Pushed {args.dir} to {args.repo_id}: {commit.commit_url}")
    if commit.pr_url:
        print(f"Pull request: {commit.pr_url}")
    return 0
