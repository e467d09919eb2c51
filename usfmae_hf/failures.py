"""How every ``usfmae`` command and ``training/`` script fails: one line, exit status 2 or 1.

* Expected failures (:class:`~usfmae_hf.errors.UsfmaeError`, environmental ``OSError`` such as a
  missing file, a permission problem, a file where a folder should be, a full disk or a read-only
  file system, a model that is neither a folder nor on the Hub, and ``MemoryError``) print
  ``PROG: error: ...`` and return 2. So do command-line mistakes: :class:`OneLineArgumentErrors`
  gives an ``argparse`` parser one-line errors instead of the whole usage text.
* Anything else prints one line naming the exception and the file the full traceback was written
  to, and returns 1; with ``--debug`` or ``USFMAE_DEBUG=1`` the traceback is printed instead.
* ``KeyboardInterrupt`` prints ``PROG: interrupted`` and returns 130.
* A closed output pipe (``usfmae datasets list | head``) ends the command silently, as it ends
  ``cat``: status 141 (128 + SIGPIPE).

Only the standard library is imported here: this module runs before (and after) any heavy import.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_EXPECTED = 2
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
DEBUG_ENVIRONMENT_VARIABLE = "USFMAE_DEBUG"

# Paragraphs/sentences of torch's ``weights_only`` error text that are advice, not a diagnosis. The
# advice (re-run with weights_only=False) would execute an untrusted pickle, so it is never shown.
_TORCH_ADVICE = re.compile(
    r"weights.only load failed|in pytorch 2\.6|re-running|weights_only`? set to|weights_only\s*=\s*false"
    r"|trusted source|arbitrary code|check the documentation|please file an issue|safe_globals",
    re.IGNORECASE,
)


def debug_requested(flag: bool = False) -> bool:
    """``True`` if ``--debug`` was given (``flag``) or ``USFMAE_DEBUG`` is set to a true value."""
    value = os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "").strip().lower()
    return flag or value not in ("", "0", "false", "no", "off")


def without_torch_advice(text: str) -> str:
    """``text`` without torch's advice to disable ``weights_only`` (and its other boilerplate)."""
    kept = []
    for line in str(text).splitlines():
        # torch puts its advice on the same line as the diagnosis ("... use case: WeightsUnpickler error: ...").
        line = line.split("WeightsUnpickler error:")[-1]
        sentences = [s for s in re.split(r"(?<=[.:])\s+", line.strip()) if s and not _TORCH_ADVICE.search(s)]
        if sentences:
            kept.append(" ".join(sentences))
    return "\n".join(kept)


def one_line(text: str) -> str:
    """``text`` (advice stripped) on one line: its lines joined with spaces."""
    return " ".join(line.strip() for line in without_torch_advice(text).splitlines() if line.strip())


def describe_expected(error: BaseException) -> str | None:
    """The one-line message of an expected failure, or ``None`` if ``error`` is unexpected."""
    from usfmae_hf.errors import UsfmaeError

    if isinstance(error, UsfmaeError):
        return one_line(str(error)) or type(error).__name__
    if isinstance(error, MemoryError):
        return "out of memory (MemoryError): use smaller inputs or a smaller --batch-size, or free memory"
    if type(error).__name__ == "OutOfMemoryError" and type(error).__module__.startswith("torch"):
        return f"out of GPU memory: use a smaller --batch-size or another device ({_first_line(error)})"
    if not isinstance(error, OSError):
        return None
    model = _model_not_found(error)
    if model is not None:
        return model
    where = _paths(error) or _first_line(error)
    if isinstance(error, FileNotFoundError):
        return f"no such file or directory: {where} (check the path)"
    if isinstance(error, PermissionError):
        return f"permission denied: {where} (check its permissions, or choose another path)"
    if isinstance(error, (NotADirectoryError, FileExistsError)):
        in_the_way = None if error.filename is None else _file_in_the_way(os.fsdecode(error.filename))
        if in_the_way is not None:
            target = "" if in_the_way == os.path.abspath(where) else f": cannot create {where}"
            return f"{in_the_way} is a file, not a folder{target} (choose another path)"
        if isinstance(error, FileExistsError):
            return f"already exists: {where} (remove it, or choose another path)"
        return f"not a folder: {where} (choose another path)"
    if isinstance(error, IsADirectoryError):
        return f"is a folder, not a file: {where} (choose a file name)"
    if error.errno == errno.ENOSPC or error.errno == getattr(errno, "EDQUOT", None):
        target = f" while writing {_paths(error)}" if _paths(error) else ""
        return f"no space left on device{target} (free some space, or write to another disk)"
    if error.errno == errno.EROFS:
        return f"read-only file system: {where} (write to a writable location)"
    if error.errno == errno.ELOOP:
        return f"symbolic link loop: {where} (fix or remove the link)"
    if error.errno == errno.ENAMETOOLONG:
        return f"file name too long: {where} (choose a shorter name)"
    return None


# huggingface_hub's errors for a model name that is no folder here and no model on the Hub (or in its
# cache, offline); transformers re-raises them as a bare OSError.
_MODEL_NOT_FOUND = {
    "HFValidationError": "no such model folder, and not a valid Hub model id",
    "RepositoryNotFoundError": "no such model folder, and no such model on the Hub",
    "RevisionNotFoundError": "no such revision of the Hub model",
    "GatedRepoError": "the Hub model is gated: accept its terms on the Hub and log in",
    "LocalEntryNotFoundError": "no such model folder, and not in the Hub cache (offline, or the Hub unreachable)",
    "EntryNotFoundError": "the model folder or Hub model lacks a file it needs",
}


def _model_not_found(error: BaseException) -> str | None:
    """The message for a model that could not be found (a huggingface_hub error in ``error``'s chain), or None."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        # by name, most specific first (RemoteEntryNotFoundError is an EntryNotFoundError): no import needed
        kinds = [kind.__name__ for kind in type(cause).__mro__ if kind.__module__.startswith("huggingface_hub")]
        kind = next((name for name in kinds if name in _MODEL_NOT_FOUND), None)
        if kind is not None:
            what = _MODEL_NOT_FOUND[kind]
            quoted = re.findall(r"'([^']+)'", str(cause))
            if kind == "HFValidationError" and quoted:
                # it names the rejected id last: "... 'namespace/repo_name': '/path/to/model'."
                return f"{quoted[-1]}: {what} (check the path)"
            return f"{what} (check the path or model id): {_first_line(error)}"
        cause = cause.__cause__ or cause.__context__
    return None


def _file_in_the_way(path: str) -> str | None:
    """The nearest existing ancestor of ``path`` (or ``path`` itself) if it is not a folder, else None."""
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent
    return None if os.path.isdir(current) else current


class OneLineArgumentErrors:
    """Mixin for :class:`argparse.ArgumentParser` (and subclasses such as ``HfArgumentParser``): a command-line
    mistake prints ``PROG: error: MESSAGE (--help lists the options)`` and exits 2, instead of the whole usage
    text first. Put it before the parser class: ``class Parser(OneLineArgumentErrors, argparse.ArgumentParser)``.
    Sub-parsers made by ``add_subparsers`` inherit it (argparse makes them of the parser's own class)."""

    prog: str

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (--help lists the options)", file=sys.stderr)
        sys.exit(EXIT_EXPECTED)


def report_failure(error: BaseException, prog: str, *, debug: bool = False) -> int:
    """Print how ``error`` ended ``prog`` (one line, or a traceback when debugging); return the exit status."""
    if isinstance(error, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(error, BrokenPipeError):
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    debug = debug_requested(debug)
    message = describe_expected(error)
    if message is not None:
        if debug:
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_EXPECTED
    summary = f"{type(error).__name__}: {_first_line(error)}" if str(error).strip() else type(error).__name__
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        print(f"{prog}: unexpected error: {summary}", file=sys.stderr)
        return EXIT_UNEXPECTED
    written = write_traceback(error)
    where = (
        f"the full traceback is in {written}"
        if written
        else f"rerun with --debug or {DEBUG_ENVIRONMENT_VARIABLE}=1 for the traceback"
    )
    print(f"{prog}: unexpected error: {summary} ({where}; please report it)", file=sys.stderr)
    return EXIT_UNEXPECTED


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (captured): nothing will be flushed into the pipe
        pass


def run_reporting_failures(call: Callable[[], Any], prog: str, *, debug: bool = False) -> int:
    """Call ``call()`` and return its exit status (``None``: 0), or report how it failed."""
    try:
        return int(call() or 0)
    except (Exception, KeyboardInterrupt) as error:  # SystemExit passes through unchanged
        return report_failure(error, prog, debug=debug)


def traceback_path() -> str:
    """Where the traceback of an unexpected failure of this process is written."""
    return os.path.join(tempfile.gettempdir(), f"usfmae-traceback-{os.getpid()}.txt")


def write_traceback(error: BaseException) -> str | None:
    """Write ``error``'s full traceback atomically to :func:`traceback_path`; ``None`` if that fails."""
    path = traceback_path()
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".usfmae-traceback-", suffix=".tmp", dir=os.path.dirname(path))
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(f"{' '.join(sys.argv)}\n\n{text}")
        os.replace(tmp, path)
        return path
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return None


def _paths(error: OSError) -> str:
    return " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in without_torch_advice(str(error)).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
