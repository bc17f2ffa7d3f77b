"""The one file-system layer: every file a run reads or writes in its workdir goes through here.

A workdir is a local folder or an object-store prefix (gs://bucket/run). Both are `etils.epath.Path`s, which Orbax
uses too, so checkpoints, config.json, palette.npy, metrics.jsonl, TensorBoard events and later outputs land in the
same place. gs:// goes through gcsfs (`EPATH_USE_TF=false`, set in igpt_jax/__init__.py): TensorFlow's gfile client,
epath's default when TensorFlow is installed, cannot be pointed at an emulator, so the tests could not reach the
code that pods run.

Object stores differ from disks in three ways this module hides: an object is written whole (so every write here is
atomic: local files go through a temporary file and a rename), objects cannot be appended to (`AppendOnlyFile` keeps
the content and rewrites the object), and creating an object only if it is absent needs the store's precondition
(`create_exclusive`, for the workdir lock).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Iterator

from etils import epath

from igpt_jax import errors

Path = epath.Path

# The OS's words for a storage failure, as they appear inside other libraries' errors (TensorFlow, tensorstore).
OS_FAILURES = re.compile(
    r"No space left on device|Disk quota exceeded|Permission denied|Read-only file system|Input/output error"
)


def path(location: str | os.PathLike) -> epath.Path:
    """An epath.Path for a local path (made absolute) or a URI such as gs://bucket/run."""
    text = os.fspath(location)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def is_remote(location: str | os.PathLike) -> bool:
    """True for object-store URIs (gs://, s3://, ...), False for local paths."""
    return "://" in os.fspath(location)


def _scheme(location: epath.Path) -> str:
    return urllib.parse.urlparse(os.fspath(location)).scheme


@contextlib.contextmanager
def _named(location: epath.Path) -> Iterator[None]:
    """OS errors from writes into an open file carry no file name: give them the path, so a full disk is reported
    as "cannot write <path>: No space left on device"."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), os.fspath(location)) from e
        raise


def write_bytes(location: epath.Path, data: bytes) -> None:
    """Writes `location` whole: readers see the old content or the new one, never a part.

    Local files: a temporary file in the same folder, flushed to disk, then renamed over the target. Objects are
    replaced whole by the store itself."""
    with _named(location):
        location.parent.mkdir(parents=True, exist_ok=True)
        if is_remote(location):
            location.write_bytes(data)
            return
        tmp = location.parent / f".{location.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, location)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def storage_failure(error: BaseException | None) -> OSError | None:
    """The storage failure behind `error`, if any: the first OSError in its chain of causes, or an error whose text
    names one (TensorFlow and tensorstore wrap them in their own types), as an OSError without a file name."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        found = OS_FAILURES.search(str(error))
        if found:
            return OSError(None, found.group(0))
        error = error.__cause__ or error.__context__
    return None


def kvstore(location: epath.Path) -> dict:
    """A tensorstore key-value store for `location` (arrays too large for whole-file writes: probe features). Local
    paths are files; gs:// goes through tensorstore's own GCS client, which an emulator reaches through
    TENSORSTORE_GCS_HTTP_URL, as Orbax's checkpoint arrays do."""
    text = os.fspath(location)
    if not is_remote(text):
        return {"driver": "file", "path": text}
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme != "gs":
        raise NotImplementedError(f"{location}: arrays are stored on local paths and gs:// only")
    return {"driver": "gcs", "bucket": parsed.netloc, "path": parsed.path.lstrip("/")}


# How long a gs:// location may take to answer the first question asked of it (does its bucket exist?) before the
# run stops: gcsfs retries a failing request for a minute and a half, with a traceback a retry.
REACH_SECONDS = 20.0
_NO_CREDENTIALS = re.compile(r"\b401\b|[Cc]redentials|Unauthori[sz]ed|[Aa]nonymous caller|invalid_grant")
_FORBIDDEN = re.compile(r"\b403\b|Forbidden|does not have storage\.")


class UnreachableError(errors.RunFailedError, OSError):
    """A gs:// location that cannot be used: the service cannot be reached, the credentials are missing or refused,
    or the bucket does not exist. Raised before anything is written."""


def check_reachable(location: str | os.PathLike, what: str = "--workdir") -> None:
    """For a gs:// location: stops within a few seconds (REACH_SECONDS at most) when it cannot be used, naming it and
    the likely cause; nothing for local paths. Asks the network first (a name lookup, or a connection to the
    emulator of STORAGE_EMULATOR_HOST), then whether the bucket exists."""
    text = os.fspath(location)
    if _scheme(epath.Path(text)) != "gs":
        return
    bucket = urllib.parse.urlparse(text).netloc
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    host, port = ("storage.googleapis.com", 443)
    if emulator:
        parsed = urllib.parse.urlparse(emulator if "://" in emulator else f"http://{emulator}")
        host, port = parsed.hostname, parsed.port or 80
    try:
        socket.create_connection((host, port), timeout=min(REACH_SECONDS, 10.0)).close()
    except OSError as e:
        raise UnreachableError(
            f"{what}={text}: cannot reach the storage service at {host}:{port} ({e.strerror or e}): no network, "
            f"no DNS{', or the emulator in STORAGE_EMULATOR_HOST is not running' if emulator else ''}. Nothing was "
            "written."
        ) from None
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reach")
    try:
        exists = pool.submit(_bucket_exists, bucket).result(timeout=REACH_SECONDS)
    except concurrent.futures.TimeoutError:
        raise UnreachableError(
            f"{what}={text}: the storage service gave no answer about bucket {bucket} in {REACH_SECONDS:.0f} s. "
            "Nothing was written."
        ) from None
    except Exception as e:  # noqa: BLE001 - classed below by its words; gcsfs and google-auth raise many types
        words = " ".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)
        if _NO_CREDENTIALS.search(words):
            why = "no valid credentials (gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS)"
        elif _FORBIDDEN.search(words):
            why = f"these credentials may not use bucket {bucket}"
        else:
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        raise UnreachableError(f"{what}={text}: {why}. Nothing was written.") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if not exists:
        raise UnreachableError(f"{what}={text}: bucket {bucket} does not exist (or these credentials cannot see it)")


def _bucket_exists(bucket: str) -> bool:
    return epath.Path(f"gs://{bucket}").exists()


def write_text(location: epath.Path, text: str) -> None:
    write_bytes(location, text.encode())


def create_exclusive(location: epath.Path, data: bytes) -> bool:
    """Creates `location` with `data` if nothing is there; False if something is. Atomic against other hosts:
    O_EXCL on local disks, an if-generation-match=0 precondition on GCS."""
    if is_remote(location) and _scheme(location) != "gs":  # refused before anything is touched
        raise NotImplementedError(f"{location}: exclusive create is implemented for local paths and gs:// only")
    location.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(location):
        try:
            fd = os.open(location, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    import fsspec

    try:
        fsspec.filesystem("gcs").pipe_file(os.fspath(location), data, mode="create")
    except FileExistsError:
        return False
    return True


class AppendOnlyFile:
    """A file that only grows (metrics.jsonl, TensorBoard events), on a disk or in an object store.

    Local: opened for append and flushed at every `flush`. Object stores cannot append (gcsfs's "a" mode
    overwrites), so the content is kept in memory and the object rewritten at `flush`, at most every
    `min_flush_seconds` unless forced, since each rewrite uploads the whole file. `flush(force=True)` is called
    before each checkpoint save and at close, so every record up to a saved step is durable.
    """

    def __init__(self, location: epath.Path, *, min_flush_seconds: float = 10.0):
        self.location = location
        self.remote = is_remote(location)
        self.min_flush_seconds = min_flush_seconds
        location.parent.mkdir(parents=True, exist_ok=True)
        if self.remote:
            self._content = bytearray(location.read_bytes() if location.exists() else b"")
            self._dirty = False
            self._last_flush = time.monotonic()
        else:
            self._file = open(location, "ab")  # noqa: SIM115 - closed in close()

    def append(self, data: bytes) -> None:
        if self.remote:
            self._content += data
            self._dirty = True
        else:
            with _named(self.location):
                self._file.write(data)

    def flush(self, *, force: bool = False) -> None:
        with _named(self.location):
            if not self.remote:
                self._file.flush()
            elif self._dirty and (force or time.monotonic() - self._last_flush >= self.min_flush_seconds):
                self.location.write_bytes(bytes(self._content))
                self._dirty = False
                self._last_flush = time.monotonic()

    def close(self) -> None:
        try:
            self.flush(force=True)
        finally:
            if not self.remote:
                with contextlib.suppress(OSError):
                    self._file.close()  # a flush that failed above would fail here again: reported once
