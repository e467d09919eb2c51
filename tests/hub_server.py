"""A small in-memory Hugging Face Hub for tests: a real HTTP server on 127.0.0.1.

It speaks enough of the Hub's HTTP API for ``huggingface_hub``'s own client code to run unchanged
against it (point ``HfApi(endpoint=server.url)`` or ``HF_ENDPOINT`` at it):

* upload: ``create_repo``, ``create_branch``, ``upload_folder`` / ``create_commit`` (``preupload``
  answers ``uploadMode: "regular"`` with the remote blob id so unchanged files are skipped; commits
  are NDJSON with base64 file bodies), ``create_pull_request``, ``validate-yaml``, ``whoami-v2``;
* optionally Git LFS for files matching ``lfs_patterns`` (``preupload`` answers ``"lfs"``, then the
  LFS batch API and a basic ``PUT`` upload; commits reference them by sha256), which clients such as
  ``datasets``' ``push_to_hub`` need. ``huggingface_hub`` sends LFS files through the Xet protocol
  when ``hf_xet`` is installed, which this server does not speak: set ``HF_HUB_DISABLE_XET=1``
  (in-process: ``monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)``);
* download: ``model_info`` / ``repo_info`` (with ``revision``), ``list_repo_tree``,
  ``list_repo_refs``, ``get_paths_info`` and ``resolve`` (HEAD and GET, with the ``X-Repo-Commit``,
  ``ETag`` and ``Content-Length`` headers ``hf_hub_download`` checks, and byte ranges), which is what
  ``snapshot_download`` and ``from_pretrained(repo_id)`` use.

Repositories live in memory as immutable commit snapshots, so tests can compare what the server
received with the files on disk byte for byte. ``fail_next`` makes the next matching requests fail
(e.g. a 500 on ``/commit/``) to exercise retries and interrupted pushes; every request is recorded.

Anything else is answered 404, e.g. ``huggingface_hub``'s best-effort ``/api/agent-harnesses``
lookup, which then caches nothing.

Import the ``hub_server`` fixture into a test module or ``conftest.py``: it starts a server per test
and, for that test only, lets ``huggingface_hub`` leave offline mode and points its default
endpoint at the server (so nothing can reach the real Hub).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

USER = "tester"
INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
# /api/{type}s/{namespace}/{name}/{action}[/{rest}] ; {rest} stays URL-encoded (a revision may hold %2F)
API_REPO_RE = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/([^/]+)(?:/(.*))?)?$")
RESOLVE_RE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
LFS_BATCH_RE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)\.git/info/lfs/objects/batch$")
LFS_UPLOAD_PREFIX = "/lfs-upload/"


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as the id (and ETag) of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or "refs/pr/N" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: dict[int, dict[str, Any]] = field(default_factory=dict)

    def commit(self, ref: str, message: str, files: dict[str, bytes]) -> Commit:
        """Record a new commit holding ``files`` (the full snapshot) on ``ref``."""
        oid = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        self.commits[oid] = Commit(oid, message, dict(files))
        self.refs[ref] = oid
        return self.commits[oid]

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        return self.commits.get(revision)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    status: int = 0


@dataclass
class _Failure:
    remaining: int
    method: str | None
    path_contains: str
    status: int
    retry_after: int | None


class HubServer:
    """An in-memory Hub served over HTTP on 127.0.0.1 (free port) from a background thread."""

    def __init__(self, lfs_patterns: Sequence[str] = ()) -> None:
        self.lfs_patterns = list(lfs_patterns)  # fnmatch patterns of paths stored with Git LFS
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[RecordedRequest] = []
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- test helpers ------------------------------------------------------------------------
    def fail_next(
        self,
        count: int,
        *,
        path_contains: str = "/commit/",
        method: str | None = "POST",
        status: int = 500,
        retry_after: int | None = 0,
    ) -> None:
        """Answer the next ``count`` requests whose path contains ``path_contains`` with ``status``.

        ``retry_after`` is sent as a ``Retry-After`` header (``huggingface_hub`` then waits that
        many seconds plus one before retrying, instead of its exponential backoff).
        """
        with self._lock:
            self._failures.append(_Failure(count, method, path_contains, status, retry_after))

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision``, as the server stores them."""
        with self._lock:
            commit = self.repos[(repo_type, repo_id)].resolve(revision)
            if commit is None:
                raise KeyError(f"{repo_id} has no revision {revision!r}")
            return dict(commit.files)

    def requests_to(self, path_contains: str, method: str | None = None) -> list[RecordedRequest]:
        """Recorded requests whose path contains ``path_contains`` (and with ``method``, if given)."""
        with self._lock:
            return [r for r in self.requests if path_contains in r.path and (method is None or r.method == method)]

    def is_lfs(self, path: str) -> bool:
        return any(fnmatch(path, pattern) for pattern in self.lfs_patterns)

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.remaining > 0 and failure.path_contains in path and failure.method in (None, method):
                    failure.remaining -= 1
                    return failure
        return None


class _Reply(Exception):
    """Raised by a route to answer with an error (status, message, optional X-Error-Code)."""

    def __init__(
        self, status: int, message: str, error_code: str | None = None, headers: dict | None = None, **payload
    ):
        super().__init__(message)
        self.status, self.message, self.error_code, self.headers = status, message, error_code, headers or {}
        self.payload = {"error": message, **payload}


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        server_hub = hub

    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every reply sets Content-Length
    server_hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # the hub records requests itself; stderr noise would clutter test output

    # ---- plumbing ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        hub = self.server_hub
        split = urlsplit(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        record = RecordedRequest(method, split.path, parse_qs(split.query), headers)
        with hub._lock:
            hub.requests.append(record)
        self.body = self._read_body() if method in ("POST", "PUT") else b""
        self.query = record.query
        try:
            failure = hub._take_failure(method, split.path)
            if failure is not None:
                headers = {} if failure.retry_after is None else {"Retry-After": str(failure.retry_after)}
                raise _Reply(failure.status, "Injected failure", headers=headers)
            status, headers, payload = self._route(method, split.path)
        except _Reply as reply:
            status, payload = reply.status, json.dumps(reply.payload).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": reply.message, **reply.headers}
            if reply.error_code:
                headers["X-Error-Code"] = reply.error_code
        record.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def _json(self, data: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.server_hub.repos.get((repo_type, repo_id))
        if repo is None:
            raise _Reply(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _Reply(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.server_hub.url}/{prefix}{repo.repo_id}"

    # ---- routes ------------------------------------------------------------------------------
    def _route(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        with self.server_hub._lock:
            if path == "/api/whoami-v2" and method == "GET":
                return self._whoami()
            if path == "/api/repos/create" and method == "POST":
                return self._create_repo()
            if path == "/api/validate-yaml" and method == "POST":
                return self._validate_yaml()
            match = API_REPO_RE.match(path)
            if match:
                plural, namespace, name, action, rest = match.groups()
                return self._repo_api(method, REPO_TYPES[plural], f"{unquote(namespace)}/{unquote(name)}", action, rest)
            match = LFS_BATCH_RE.match(path)
            if match and method == "POST":
                return self._lfs_batch()
            if path.startswith(LFS_UPLOAD_PREFIX) and method == "PUT":
                return self._lfs_upload(path[len(LFS_UPLOAD_PREFIX) :])
            match = RESOLVE_RE.match(path)
            if match and method in ("GET", "HEAD"):
                plural, namespace, name, revision, filename = match.groups()
                repo_type = REPO_TYPES[plural] if plural else "model"
                return self._resolve(
                    method, repo_type, f"{unquote(namespace)}/{unquote(name)}", unquote(revision), unquote(filename)
                )
        raise _Reply(404, f"No route for {method} {path}")

    def _repo_api(self, method: str, repo_type: str, repo_id: str, action: str | None, rest: str | None):
        repo = self._repo(repo_type, repo_id)
        if method == "GET" and action is None:
            return self._repo_info(repo, "main")
        if method == "GET" and action == "revision" and rest:
            return self._repo_info(repo, unquote(rest))
        if method == "GET" and action == "tree" and rest:
            revision, _, subpath = rest.partition("/")
            return self._tree(repo, unquote(revision), unquote(subpath))
        if method == "GET" and action == "refs":
            branches = [
                {"name": ref, "ref": f"refs/heads/{ref}", "targetCommit": oid}
                for ref, oid in repo.refs.items()
                if not ref.startswith("refs/")
            ]
            return self._json({"branches": branches, "tags": [], "converts": []})
        if method == "POST" and action == "paths-info" and rest:
            return self._paths_info(repo, unquote(rest))
        if method == "POST" and action == "branch" and rest:
            return self._create_branch(repo, unquote(rest))
        if method == "POST" and action == "preupload" and rest:
            return self._preupload(repo, unquote(rest))
        if method == "POST" and action == "commit" and rest:
            return self._create_commit(repo, unquote(rest))
        if method == "POST" and action == "discussions" and not rest:
            return self._create_pull_request(repo)
        if method == "GET" and action == "discussions" and rest:
            return self._json(self._pull_request_details(repo, int(rest)))
        raise _Reply(404, f"No route for {method} {self.path}")

    def _whoami(self):
        if not self.headers.get("Authorization"):
            raise _Reply(401, "Invalid credentials in Authorization header")
        return self._json({"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def _create_repo(self):
        payload = json.loads(self.body)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        key = (repo_type, repo_id)
        if key in self.server_hub.repos:
            # The Hub answers 409 with the existing repository's URL, which create_repo(exist_ok=True) returns.
            raise _Reply(409, "You already created this repo", url=self._repo_url(self.server_hub.repos[key]))
        repo = Repo(repo_id, repo_type, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.commit("main", "initial commit", {".gitattributes": INITIAL_GITATTRIBUTES})
        self.server_hub.repos[key] = repo
        return self._json({"url": self._repo_url(repo), "name": repo_id, "id": uuid.uuid4().hex})

    def _validate_yaml(self):
        content = json.loads(self.body).get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            return 400, {"Content-Type": "text/plain"}, f"Invalid YAML metadata: {error}".encode()
        problems = []
        if not isinstance(metadata, dict):
            problems.append("metadata must be a mapping")
        else:
            if "license" in metadata and not isinstance(metadata["license"], str):
                problems.append('"license" must be a string')
            for key in ("tags", "datasets"):
                if key in metadata and not (
                    isinstance(metadata[key], list) and all(isinstance(v, str) for v in metadata[key])
                ):
                    problems.append(f'"{key}" must be a list of strings')
            for entry in metadata.get("model-index") or []:
                for result in entry.get("results", []):
                    if not {"task", "dataset", "metrics"} <= result.keys():
                        problems.append('"model-index" results need task, dataset and metrics')
        if problems:
            return 400, {"Content-Type": "text/plain"}, "; ".join(problems).encode()
        return self._json({"errors": [], "warnings": []})

    def _repo_info(self, repo: Repo, revision: str):
        commit = self._commit(repo, revision)
        return self._json(
            {
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _entry(self, path: str, data: bytes) -> dict[str, Any]:
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
        if self.server_hub.is_lfs(path):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _tree(self, repo: Repo, revision: str, subpath: str):
        commit = self._commit(repo, revision)
        recursive = self.query.get("recursive", ["False"])[0].lower() == "true"
        prefix = f"{subpath.rstrip('/')}/" if subpath else ""
        entries, folders = [], set()
        for path, data in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(self._entry(path, data))
        if subpath and not entries and not folders:
            raise _Reply(404, f"{subpath} does not exist on {revision}", "EntryNotFound")
        entries += [
            {"type": "directory", "path": folder, "oid": git_blob_id(folder.encode())} for folder in sorted(folders)
        ]
        return self._json(entries)

    def _paths_info(self, repo: Repo, revision: str):
        commit = self._commit(repo, revision)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(self.body).get("paths", [])
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        entries = []
        for path in paths:
            if path in commit.files:
                entries.append(self._entry(path, commit.files[path]))
            elif any(name.startswith(path.rstrip("/") + "/") for name in commit.files):
                entries.append({"type": "directory", "path": path.rstrip("/"), "oid": git_blob_id(path.encode())})
        return self._json(entries)

    def _create_branch(self, repo: Repo, branch: str):
        if branch in repo.refs:
            raise _Reply(409, f"Branch {branch} already exists")
        starting_point = json.loads(self.body or b"{}").get("startingPoint") or "main"
        repo.refs[branch] = self._commit(repo, starting_point).oid
        return self._json({})

    def _preupload(self, repo: Repo, revision: str):
        # With create_pr the revision is the PR's base branch; files are compared against it.
        commit = self._commit(repo, revision)
        files = []
        for entry in json.loads(self.body)["files"]:
            existing = commit.files.get(entry["path"])
            lfs = self.server_hub.is_lfs(entry["path"])
            # The client compares this oid with its own: sha256 for LFS files, the git blob id otherwise.
            oid = None if existing is None else hashlib.sha256(existing).hexdigest() if lfs else git_blob_id(existing)
            files.append(
                {"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return self._json({"files": files, "commitOid": commit.oid})

    def _create_commit(self, repo: Repo, revision: str):
        parent = self._commit(repo, revision)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != parent.oid:
            raise _Reply(412, "A commit has happened since; parentCommit is not the head of the revision")
        files = dict(parent.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _Reply(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.server_hub.lfs_objects:
                    raise _Reply(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = self.server_hub.lfs_objects[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
            else:
                raise _Reply(400, f"Unsupported commit operation {key!r}")
        commit = repo.commit(revision, header.get("summary", ""), files)
        return self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "pullRequestUrl": None,
            }
        )

    def _lfs_batch(self):
        payload = json.loads(self.body)
        if payload.get("operation") != "upload":
            raise _Reply(400, "This server only accepts LFS uploads (downloads go through resolve)")
        objects = []
        for obj in payload["objects"]:
            reply = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.server_hub.lfs_objects:
                reply["actions"] = {
                    "upload": {"href": f"{self.server_hub.url}{LFS_UPLOAD_PREFIX}{obj['oid']}", "header": {}}
                }
            objects.append(reply)
        return self._json({"transfer": "basic", "objects": objects})

    def _lfs_upload(self, oid: str):
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise _Reply(400, f"Uploaded content does not match sha256 {oid}")
        self.server_hub.lfs_objects[oid] = self.body
        return self._json({})

    def _create_pull_request(self, repo: Repo):
        payload = json.loads(self.body)
        if not payload.get("pullRequest"):
            raise _Reply(400, "This server only supports pull requests, not plain discussions")
        num = len(repo.pull_requests) + 1
        repo.refs[f"refs/pr/{num}"] = repo.refs["main"]
        repo.pull_requests[num] = {"title": payload.get("title", ""), "description": payload.get("description", "")}
        return self._json({"num": num, "url": f"{self._repo_url(repo)}/discussions/{num}"})

    def _pull_request_details(self, repo: Repo, num: int) -> dict[str, Any]:
        if num not in repo.pull_requests:
            raise _Reply(404, f"Discussion {num} not found")
        return {
            "num": num,
            "title": repo.pull_requests[num]["title"],
            "author": {"name": USER},
            "createdAt": "2026-01-01T00:00:00.000Z",
            "status": "draft",
            "repo": {"name": repo.repo_id, "type": repo.repo_type},
            "isPullRequest": True,
            "events": [],
            "changes": {"base": "refs/heads/main"},
            "filesWithConflicts": [],
        }

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, filename: str):
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        if filename not in commit.files:
            raise _Reply(404, f"{filename} does not exist", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        data = commit.files[filename]
        etag = hashlib.sha256(data).hexdigest() if self.server_hub.is_lfs(filename) else git_blob_id(data)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{etag}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status = 200
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if byte_range and method == "GET":
            start = int(byte_range.group(1))
            end = int(byte_range.group(2)) if byte_range.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        headers["Content-Length"] = str(len(data))
        return status, headers, data


@pytest.fixture
def hub_server(monkeypatch):
    """A running :class:`HubServer`; during the test ``huggingface_hub`` may go online, to it only."""
    from huggingface_hub import constants

    with HubServer() as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        yield server
