"""Publishing model directories to the Hugging Face Hub: validate first, then upload safely.

``validate_model_dir`` refuses anything a Hub reviewer would (missing files, configs or processors
that do not load, pickled weights, invalid card metadata) before a byte leaves the machine;
``push_model_dir`` creates the repository (and branch) if needed, uploads with ``upload_folder``
and retries transient failures. Re-pushing an unchanged folder is a no-op that succeeds.
``push_build_to_hub`` uploads a dataset build of :mod:`usfmae_hf.ingest` to a dataset repository.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from usfmae_hf.errors import UsfmaeError
from usfmae_hf.version import __version__

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

T = TypeVar("T")
logger = logging.getLogger(__name__)

REQUIRED_FILES = ("config.json", "preprocessor_config.json", "README.md")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Weights or objects that execute code when unpickled: the Hub flags them, we refuse them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
REQUIRED_CARD_FIELDS = ("license", "library_name", "pipeline_tag")
TRANSIENT_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})


class PublishError(UsfmaeError):
    """A model directory cannot be published (invalid content, or the Hub refused it)."""


def _uploaded_files(path: Path) -> list[str]:
    """The relative paths ``upload_folder`` would upload (it skips ``.git`` and its own cache)."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    files = (file.relative_to(path).as_posix() for file in sorted(path.rglob("*")) if file.is_file())
    return list(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def _weight_problems(path: Path) -> list[str]:
    from safetensors import safe_open

    index_path = path / SAFETENSORS_INDEX
    if (path / SAFETENSORS_FILE).is_file():
        shards = [SAFETENSORS_FILE]
    elif index_path.is_file():
        try:
            shards = sorted(set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            return [f"{SAFETENSORS_INDEX} is not a valid index ({error})"]
    else:
        return [f"no weights: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}"]
    problems = []
    for shard in shards:
        try:
            with safe_open(path / shard, framework="pt") as weights:
                weights.keys()
        except Exception as error:  # safetensors raises its own, untyped errors on corrupt files
            problems.append(f"{shard} is not a readable safetensors file ({error})")
    return problems


def _card_problems(readme: Path) -> list[str]:
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(readme)
    except Exception as error:  # YAML and model-index errors surface as various exception types
        return [f"README.md metadata is invalid: {error}"]
    missing = [key for key in REQUIRED_CARD_FIELDS if not getattr(card.data, key, None)]
    return [f"README.md metadata lacks {', '.join(missing)}"] if missing else []


def _loading_problems(path: Path) -> list[str]:
    from transformers import AutoConfig, AutoImageProcessor

    try:
        # A model with its own code (config "auto_map") loads only with trust_remote_code; it is the
        # code being published, and the Hub will ask every user to trust it the same way.
        remote_code = "auto_map" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        remote_code = False  # the loader below reports what is wrong with config.json
    problems = []
    for name, loader in (("config.json", AutoConfig), ("preprocessor_config.json", AutoImageProcessor)):
        if not (path / name).is_file():
            continue  # already reported as missing
        try:
            loader.from_pretrained(path, trust_remote_code=remote_code)
        except Exception as error:  # any failure to load is a reason to refuse the upload
            problems.append(f"{name} does not load with {loader.__name__}: {error}")
    return problems


def validate_model_dir(path: str | Path) -> Path:
    """Check that ``path`` is a model directory fit for the Hub; return it resolved.

    Refused, with every problem listed in one :class:`PublishError`: a missing ``config.json``,
    ``preprocessor_config.json``, ``README.md`` or safetensors weights (single file or a complete
    sharded index); pickle files anywhere (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``,
    ``*.pickle``); weights safetensors cannot read; a config or image processor that
    ``AutoConfig``/``AutoImageProcessor`` cannot load; card metadata that does not parse or lacks
    ``license``, ``library_name`` or ``pipeline_tag``. A directory with its own model code (config
    ``auto_map``) is loaded with ``trust_remote_code=True``, i.e. that code runs.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise PublishError(f"{path} is not a directory")
    pickles = [name for name in _uploaded_files(path) if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PublishError(f"refusing to publish pickle files (convert them to safetensors): {', '.join(pickles)}")
    problems = [f"missing {name}" for name in REQUIRED_FILES if not (path / name).is_file()]
    problems += _weight_problems(path)
    if (path / "README.md").is_file():
        problems += _card_problems(path / "README.md")
    problems += _loading_problems(path)
    if problems:
        raise PublishError(f"{path} cannot be published: " + "; ".join(problems))
    return path


def _is_transient(error: Exception) -> bool:
    import httpx2  # huggingface_hub 2.x's HTTP client
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code in TRANSIENT_STATUS_CODES
    # The network failures huggingface_hub itself retries.
    return isinstance(error, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError))


def _with_retries(call: Callable[[], T], *, what: str, max_retries: int, retry_wait: float) -> T:
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


def _fill_in_repo_id(readme: Path, repo_id: str) -> None:
    """Replace the card's placeholder repository id (a card rendered before the id was known) in place."""
    from usfmae_hf.atomic import atomic_write_text
    from usfmae_hf.publishing.cards import REPO_ID_PLACEHOLDER

    text = readme.read_text(encoding="utf-8")
    if f'"{REPO_ID_PLACEHOLDER}"' in text:
        atomic_write_text(readme, text.replace(f'"{REPO_ID_PLACEHOLDER}"', f'"{repo_id}"'))
        logger.info("README.md: usage snippet now loads %s", repo_id)


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
    max_retries: int = 3,
    retry_wait: float = 2.0,
) -> CommitInfo:
    """Validate ``path`` and upload it to the Hub model repository ``repo_id``.

    The repository is created if needed (``private`` applies only then; otherwise the namespace's
    default visibility), as is the branch
    ``revision`` (from ``main``) when it does not exist yet. ``create_pr`` opens a pull request
    against ``main`` instead of committing to it (it cannot be combined with ``revision``).
    A usage snippet still loading the placeholder repository id of :mod:`usfmae_hf.publishing.cards` (a card
    rendered before the id was known) is updated in ``README.md`` to load ``repo_id``, so the
    published card runs as shown. Unchanged files are not re-uploaded, so pushing the same folder
    twice succeeds without a new commit. Transient failures (HTTP 408/429/5xx, connection errors) are retried up to
    ``max_retries`` times, waiting ``retry_wait * 2**attempt`` seconds; ``huggingface_hub`` also
    retries individual upload requests itself.

    ``token`` defaults to ``HF_TOKEN`` or the saved login, ``endpoint`` to ``HF_ENDPOINT``. The
    token is never printed: error messages that could contain it are redacted.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit (a ``str`` equal to its URL); its
        ``pr_url`` is set when a pull request was opened.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if create_pr and revision not in (None, "main"):
        raise PublishError("--create-pr opens a pull request against main; it cannot be combined with --revision")
    folder = validate_model_dir(path)
    _fill_in_repo_id(folder / "README.md", repo_id)
    api = HfApi(endpoint=endpoint, token=token)

    def validate_card() -> None:
        response = get_session().post(
            f"{api.endpoint}/api/validate-yaml",
            json={"repoType": "model", "content": (folder / "README.md").read_text(encoding="utf-8")},
            headers=build_hf_headers(token=token),
        )
        if response.status_code == 400:
            raise PublishError(f"the Hub rejects README.md metadata: {response.text}")
        hf_raise_for_status(response)

    def upload() -> CommitInfo:
        return api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            revision=None if create_pr else revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload {folder.name} with usfmae-hf {__version__}",
        )

    steps: list[tuple[str, Callable[[], object]]] = [
        ("card validation", validate_card),
        (
            "repository creation",
            lambda: api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True),
        ),
    ]
    if revision not in (None, "main") and not create_pr:
        steps.append(("branch creation", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True)))
    try:
        for what, step in steps:
            _with_retries(step, what=what, max_retries=max_retries, retry_wait=retry_wait)
        return _with_retries(upload, what="upload", max_retries=max_retries, retry_wait=retry_wait)
    except OfflineModeIsEnabled as error:
        raise PublishError("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push") from error
    except HfHubHTTPError as error:
        raise PublishError(_redact(f"the Hub refused the push of {folder} to {repo_id}: {error}", token)) from None
    except Exception as error:
        if not _is_transient(error):
            raise
        raise PublishError(_redact(f"cannot reach {api.endpoint}: {type(error).__name__}: {error}", token)) from None


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
