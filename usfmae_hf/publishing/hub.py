"""Publishing to the Hugging Face Hub: a model directory, exactly as :func:`plan_upload` checked it, or a dataset build.

:func:`push_model_dir` checks the folder (:mod:`usfmae_hf.publishing.upload_plan`, whose names are
importable from here too), creates the repository (and branch) if needed and uploads the planned
files; the local folder is left as it is. Re-pushing an unchanged folder is a no-op that succeeds.
:func:`push_build_to_hub` uploads a dataset build of :mod:`usfmae_hf.ingest` to a dataset repository.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.publishing.upload_plan import (
    CHECKPOINT_DIRS,
    MAX_FILE_BYTES,
    README,
    RECOMMENDED_MAX_FILE_BYTES,
    REQUIRED_CARD_FIELDS,
    REQUIRED_FILES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    TRAINER_STATE_FILES,
    PublishError,
    UploadPlan,
    plan_upload,
    validate_model_dir,
)
from usfmae_hf.version import __version__

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

__all__ = [
    "CHECKPOINT_DIRS",
    "MAX_FILE_BYTES",
    "README",
    "RECOMMENDED_MAX_FILE_BYTES",
    "REQUIRED_CARD_FIELDS",
    "REQUIRED_FILES",
    "SAFETENSORS_FILE",
    "SAFETENSORS_INDEX",
    "TRAINER_STATE_FILES",
    "TRANSIENT_STATUS_CODES",
    "PublishError",
    "UploadPlan",
    "plan_upload",
    "push_build_to_hub",
    "push_model_dir",
    "validate_model_dir",
]

T = TypeVar("T")
logger = logging.getLogger(__name__)

TRANSIENT_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})


def _is_transient(error: Exception) -> bool:
    import httpx2  # huggingface_hub 2.x's HTTP client
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code in TRANSIENT_STATUS_CODES
    # The network failures huggingface_hub itself retries.
    return isinstance(error, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError))


def _with_retries(call: Callable[[], T], *, what: str, max_retries: int, retry_wait: float) -> T:
    """Retry ``call`` on transient failures: for the Hub requests huggingface_hub sends only once."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as error:
            if attempt >= max_retries or not _is_transient(error):
                raise
            wait = retry_wait * 2**attempt
            attempt += 1
            logger.warning(
                "%s failed (%s); retrying in %gs [%d/%d]", what, type(error).__name__, wait, attempt, max_retries
            )
            time.sleep(wait)


def _card_for_repo(text: str, repo_id: str) -> str:
    """The card with its placeholder repository id (a card rendered before the id was known) replaced."""
    from usfmae_hf.publishing.cards import REPO_ID_PLACEHOLDER

    return text.replace(f'"{REPO_ID_PLACEHOLDER}"', f'"{repo_id}"')


def _stage(plan: UploadPlan, card: str, staging: Path) -> None:
    """Lay out in ``staging`` what ``upload_folder`` sends: links to the planned files, the card as uploaded.

    The upload reads exactly the checked files (a link's target, not the link) and the local folder
    is never written to.
    """
    for name, source in plan.files.items():
        destination = staging / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if name == README:
            destination.write_bytes(card.encode("utf-8"))
        else:
            destination.symlink_to(source)


def _redact(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message


def push_model_dir(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    include_checkpoints: bool = False,
    update_local_card: bool = False,
    max_retries: int = 3,
    retry_wait: float = 2.0,
) -> CommitInfo:
    """Check ``path`` with :func:`plan_upload` and upload its planned files to the Hub model repository ``repo_id``.

    The plan's notes (what is left out, and why) are logged as warnings. The repository is created if
    needed (``private`` applies only then; otherwise the namespace's default visibility), as is the
    branch ``revision`` (from ``main``) when it does not exist yet. ``create_pr`` opens a pull request
    against ``main`` instead of committing to it (it cannot be combined with ``revision``). Unchanged
    files are not re-uploaded, so pushing the same folder twice succeeds without a new commit.

    Nothing under ``path`` is modified. A usage snippet still loading the placeholder repository id
    of :mod:`usfmae_hf.publishing.cards` (a card rendered before the id was known) loads ``repo_id``
    in the uploaded ``README.md``; ``update_local_card`` writes that card to the local file too, once
    the push succeeded.

    Retries: card validation, repository and branch creation are retried on transient failures
    (HTTP 408/429/5xx, connection errors) up to ``max_retries`` times, waiting ``retry_wait * 2**attempt``
    seconds (``huggingface_hub`` sends those once). The upload itself is ``upload_folder``'s, from a
    temporary folder of links to the planned files: ``huggingface_hub`` retries its requests (preupload,
    Xet transfers, commits: 5 times, 1 to 8 s apart), and a failed push completes when run again.

    ``token`` defaults to ``HF_TOKEN`` or the saved login, ``endpoint`` to ``HF_ENDPOINT``. The
    token is never printed: error messages that could contain it are redacted.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit (a ``str`` equal to its URL); its
        ``pr_url`` is set when a pull request was opened.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    if create_pr and revision not in (None, "main"):
        raise PublishError("--create-pr opens a pull request against main; it cannot be combined with --revision")
    plan = plan_upload(path, include_checkpoints=include_checkpoints)
    for note in plan.notes:
        logger.warning(note)
    readme = plan.files[README]
    local_card = readme.read_bytes().decode("utf-8")  # bytes as they are (no newline translation)
    card = _card_for_repo(local_card, repo_id)
    if card != local_card and not update_local_card:
        logger.info("README.md: the uploaded card loads %s; the local one is unchanged (--update-local-card)", repo_id)
    api = HfApi(endpoint=endpoint, token=token)

    def validate_card() -> None:
        response = http_backoff(
            "POST",
            f"{api.endpoint}/api/validate-yaml",
            json={"repoType": "model", "content": card},
            headers=build_hf_headers(token=token),
            max_retries=max_retries,
            base_wait_time=retry_wait,
        )
        if response.status_code == 400:
            raise PublishError(f"the Hub rejects README.md metadata: {response.text}")
        hf_raise_for_status(response)

    def create_repo() -> None:
        api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)

    def create_branch() -> None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)

    try:
        validate_card()
        _with_retries(create_repo, what="repository creation", max_retries=max_retries, retry_wait=retry_wait)
        if revision not in (None, "main") and not create_pr:
            _with_retries(create_branch, what="branch creation", max_retries=max_retries, retry_wait=retry_wait)
        with tempfile.TemporaryDirectory(prefix="usfmae-push-") as staging:
            _stage(plan, card, Path(staging))
            commit = api.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=staging,
                revision=None if create_pr else revision,
                create_pr=create_pr,
                commit_message=commit_message or f"Upload {plan.folder.name} with usfmae-hf {__version__}",
            )
    except OfflineModeIsEnabled as error:
        raise PublishError("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push") from error
    except HfHubHTTPError as error:
        raise PublishError(_redact(f"the Hub refused the push of {plan.folder} to {repo_id}: {error}", token)) from None
    except Exception as error:
        if not _is_transient(error):
            raise
        raise PublishError(_redact(f"cannot reach {api.endpoint}: {type(error).__name__}: {error}", token)) from None
    if update_local_card and card != local_card:
        from usfmae_hf.atomic import atomic_write_bytes

        atomic_write_bytes(readme, card.encode("utf-8"))
        logger.info("README.md: usage snippet now loads %s", repo_id)
    return commit


def push_build_to_hub(
    output: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload an ingest build (card, reports, Parquet shards) to the dataset repo ``repo_id``; return the commit URL.

    ``output`` is a folder written by :func:`usfmae_hf.ingest.ingest`. Shards that are no longer in
    the build are deleted from the repo in the same commit.
    """
    from huggingface_hub import HfApi

    from usfmae_hf.ingest.build import MANIFEST_DIR

    output = Path(output)
    if not (output / MANIFEST_DIR / "options.json").is_file():
        raise UsfmaeError(f"{output} is not an ingest build")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=output,
        allow_patterns=["README.md", "ingest_report.json", "ingest_report.md", "data/*.parquet"],
        delete_patterns=["data/*.parquet"],
        commit_message="Upload ultrasound ingest build (usfmae ingest)",
    )
    return str(commit)
