"""``usfmae push``: check a model directory and publish it to the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from usfmae_hf.publishing.hub import MAX_FILE_BYTES, TRAINER_STATE_FILES

    parser = subparsers.add_parser(
        "push",
        help="check a model directory and upload it to the Hugging Face Hub",
        description=(
            "Check DIR, create the Hub repository if needed and upload the folder's files. Refused before "
            "anything is uploaded: symlinks leading out of DIR (or dangling, or looping), anything not a "
            "regular file, pickles (recognised by content, whatever the file is called), files over the "
            f"Hub's {MAX_FILE_BYTES / 1e9:g} GB per-file limit, and folders whose config, image processor, "
            "safetensors weights or model card metadata do not load. A symlink to a file inside DIR is "
            "uploaded under its own name with the content of the file it points to; a symlink to a folder "
            "inside DIR is not "
            "followed (that folder's files are uploaded once, under their own path). A fine-tuning output "
            "folder can be pushed as it is: the Trainer's state pickles "
            f"({', '.join(TRAINER_STATE_FILES)}) are left out, and so are checkpoint-*/ folders unless "
            "--include-checkpoints; each left-out item is named in the output. Nothing in DIR is modified: "
            "a card whose usage snippet loads a placeholder repository id is uploaded loading --repo-id "
            "(--update-local-card writes it to DIR too). Unchanged files are skipped, so pushing the same "
            "folder again succeeds. The token comes from --token, HF_TOKEN or `hf auth login`, and is "
            "never printed."
        ),
    )
    parser.add_argument(
        "dir", type=Path, metavar="DIR", help="model directory (e.g. the output of `usfmae convert` or of fine-tuning)"
    )
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
        "--include-checkpoints",
        action="store_true",
        help="also upload the Trainer's checkpoint-*/ folders (their state pickles are still left out)",
    )
    parser.add_argument(
        "--update-local-card",
        action="store_true",
        help="after a successful push, write the card as uploaded (usage snippet loading --repo-id) to DIR/README.md",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="retries of card validation and repository/branch creation on transient failures (5xx, 429, "
        "network; default: 3); huggingface_hub retries the uploads themselves",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usfmae_hf.publishing.hub import push_model_dir

    commit = push_model_dir(
        args.dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        token=args.token,
        endpoint=args.endpoint,
        include_checkpoints=args.include_checkpoints,
        update_local_card=args.update_local_card,
        max_retries=args.max_retries,
    )
    print(f"Pushed {args.dir} to {args.repo_id}: {commit.commit_url}")
    if commit.pr_url:
        print(f"Pull request: {commit.pr_url}")
    return 0
