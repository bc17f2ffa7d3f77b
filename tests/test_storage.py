"""The file layer a workdir's every file goes through, on a local disk and on a GCS API (the emulator, reached from
this process): whole writes that leave the old content on failure, exclusive creation, append-only files that keep
what was there, tensorstore arrays, storage errors found inside other libraries' errors, and the reachability check
that stops a run before it writes anything."""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest
from gcs_emulator import BUCKET, free_port

from igpt_jax.workdir import storage


def test_a_failed_write_keeps_the_old_content_and_names_the_file(tmp_path, monkeypatch):
    """A full disk during the write: the error names the file (the OS's own error for a write into an open file
    names none), the old content stays whole, and no temporary file is left beside it."""
    target = storage.path(tmp_path / "config.json")
    storage.write_text(target, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as failed:
        storage.write_text(target, "new")
    assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, os.fspath(target))
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_an_error_that_names_its_file_is_left_as_it_is(tmp_path):
    missing = storage.path(tmp_path / "no" / "such")
    with pytest.raises(FileNotFoundError) as failed, storage._named(storage.path(tmp_path / "other")):
        open(missing)  # noqa: SIM115
    assert failed.value.filename == os.fspath(missing)


def test_a_storage_failure_is_found_along_causes_and_contexts():
    disk = OSError(errno.EIO, "Input/output error")
    assert storage.storage_failure(disk) is disk
    try:
        try:
            raise disk
        except OSError as e:
            raise RuntimeError("restore failed") from e
    except RuntimeError as e:
        assert storage.storage_failure(e) is disk
    try:
        try:
            raise ValueError("tensorstore: Read-only file system [checkpoints/10]")
        except ValueError:
            raise KeyError("state")  # noqa: B904 - the ValueError is only its context, not its cause
    except KeyError as e:
        found = storage.storage_failure(e)
    assert isinstance(found, OSError) and (found.errno, found.strerror) == (None, "Read-only file system")
    assert storage.storage_failure(None) is None


def test_local_and_remote_locations():
    assert storage.is_remote("gs://bucket/run") and storage.is_remote("s3://b/r")
    assert not storage.is_remote("/tmp/run") and not storage.is_remote("run")
    assert os.fspath(storage.path("run")) == os.path.join(os.getcwd(), "run")
    with pytest.raises(NotImplementedError, match="s3://b/r: arrays are stored on local paths and gs:// only"):
        storage.kvstore(storage.path("s3://b/r"))


def test_a_local_append_only_file_keeps_what_was_there_and_is_on_disk_at_each_flush(tmp_path):
    location = storage.path(tmp_path / "sub" / "metrics.jsonl")
    location.parent.mkdir()
    location.write_bytes(b"row 1\n")
    appended = storage.AppendOnlyFile(location)
    appended.append(b"row 2\n")
    appended.flush()
    assert location.read_bytes() == b"row 1\nrow 2\n"  # readable by another process before close
    appended.append(b"row 3\n")
    appended.close()
    assert location.read_bytes() == b"row 1\nrow 2\nrow 3\n"


def _tensorstore_round_trip(location: storage.Path) -> np.ndarray:
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": storage.kvstore(location)}
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = ts.open(spec, create=True, dtype=ts.float32, shape=data.shape).result()
    array.write(data).result()
    return ts.open(spec).result().read().result()


def test_tensorstore_arrays_live_under_a_local_location(tmp_path):
    location = storage.path(tmp_path / "features")
    np.testing.assert_array_equal(_tensorstore_round_trip(location), np.arange(12).reshape(3, 4))
    assert "zarr.json" in os.listdir(tmp_path / "features")


# --- on a GCS API


def test_gcs_writes_are_whole_objects_and_exclusive_creation_has_one_winner(gcs_here):
    config = storage.path(f"{gcs_here}/sub/config.json")
    storage.write_text(config, "old")
    storage.write_text(config, "new")
    assert config.read_text() == "new"
    lock = storage.path(f"{gcs_here}/lock.json")
    assert storage.create_exclusive(lock, b"first")
    assert not storage.create_exclusive(lock, b"second")
    assert lock.read_bytes() == b"first"


def test_a_gcs_append_only_file_keeps_the_object_and_uploads_at_forced_or_spaced_flushes(gcs_here):
    location = storage.path(f"{gcs_here}/metrics.jsonl")
    location.write_bytes(b"row 1\n")
    appended = storage.AppendOnlyFile(location, min_flush_seconds=3600)
    appended.append(b"row 2\n")
    appended.flush()
    assert location.read_bytes() == b"row 1\n"  # a rewrite uploads the whole object: not at every flush
    appended.flush(force=True)
    assert location.read_bytes() == b"row 1\nrow 2\n"
    appended.close()
    spaced = storage.AppendOnlyFile(location, min_flush_seconds=0.2)
    spaced.append(b"row 3\n")
    time.sleep(0.3)
    spaced.flush()
    assert location.read_bytes() == b"row 1\nrow 2\nrow 3\n"
    location.write_bytes(b"changed elsewhere\n")
    spaced.flush(force=True)  # nothing new since the last upload: the object is not rewritten
    assert location.read_bytes() == b"changed elsewhere\n"
    spaced.append(b"row 4\n")
    spaced.close()
    assert location.read_bytes() == b"row 1\nrow 2\nrow 3\nrow 4\n"


def test_tensorstore_arrays_live_under_a_gcs_location(gcs_here, gcs):
    fs, _, _ = gcs
    location = storage.path(f"{gcs_here}/features")
    np.testing.assert_array_equal(_tensorstore_round_trip(location), np.arange(12).reshape(3, 4))
    assert fs.exists(f"{gcs_here.removeprefix('gs://')}/features/zarr.json")


def test_a_usable_gcs_location_passes_the_reachability_check(gcs_here):
    storage.check_reachable(gcs_here)
    storage.check_reachable("/not/a/bucket/at/all")  # local paths are not asked about


def test_a_missing_bucket_and_an_unreachable_service_are_named(gcs_here, monkeypatch):
    with pytest.raises(storage.UnreachableError) as missing:
        storage.check_reachable("gs://no-such-bucket/run", "--config.data.palette")
    assert str(missing.value) == (
        "--config.data.palette=gs://no-such-bucket/run: bucket no-such-bucket does not exist (or these credentials "
        "cannot see it)"
    )
    closed = free_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{closed}")
    start = time.monotonic()
    with pytest.raises(storage.UnreachableError) as unreachable:
        storage.check_reachable(f"gs://{BUCKET}/run")
    assert str(unreachable.value).startswith(
        f"--workdir=gs://{BUCKET}/run: cannot reach the storage service at 127.0.0.1:{closed} ("
    )
    assert str(unreachable.value).endswith(
        "no network, no DNS, or the emulator in STORAGE_EMULATOR_HOST is not running. Nothing was written."
    )
    assert time.monotonic() - start < 5


def test_a_service_that_does_not_answer_is_given_up_on_after_reach_seconds(monkeypatch):
    """Connected, but the bucket question hangs: the check stops after REACH_SECONDS, not after gcsfs's retries."""
    monkeypatch.setattr(storage.socket, "create_connection", lambda *a, **k: type("C", (), {"close": lambda s: 0})())
    threads = []

    def hang(bucket):
        threads.append(threading.current_thread().name)  # named for a stack dump
        time.sleep(5)

    monkeypatch.setattr(storage, "_bucket_exists", hang)
    monkeypatch.setattr(storage, "REACH_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(storage.UnreachableError) as failed:
        storage.check_reachable("gs://b/run")
    assert time.monotonic() - start < 2 and threads[0].startswith("reach")
    assert str(failed.value) == (
        "--workdir=gs://b/run: the storage service gave no answer about bucket b in 0 s. Nothing was written."
    )


def test_files_are_created_with_every_missing_parent_folder(tmp_path):
    deep = tmp_path / "a" / "b"
    storage.write_text(storage.path(deep / "config.json"), "{}")
    assert storage.create_exclusive(storage.path(tmp_path / "c" / "d" / "lock.json"), b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "c" / "d" / "lock.json").stat().st_mode & 0o777 == 0o644 & ~umask  # a plain file, not executable
    storage.AppendOnlyFile(storage.path(tmp_path / "e" / "f" / "metrics.jsonl")).close()
    assert (deep / "config.json").exists() and (tmp_path / "e" / "f" / "metrics.jsonl").exists()


def test_a_write_that_cannot_even_start_reports_its_own_error(tmp_path, monkeypatch):
    """The temporary file could not be created: the error is that failure, not a second one about the temporary
    file that is not there to remove."""

    def refused(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "open", refused, raising=False)
    with pytest.raises(OSError) as failed:
        storage.write_text(storage.path(tmp_path / "config.json"), "new")
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == os.fspath(tmp_path / "config.json")


class _FullDisk:
    """A file object whose writes, flushes and close fail as a full disk's do: with no file name."""

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    flush = close = lambda self: _FullDisk.write(self, b"")


def test_a_full_disk_under_an_append_only_file_is_reported_once_naming_it(tmp_path):
    location = storage.path(tmp_path / "metrics.jsonl")
    appended = storage.AppendOnlyFile(location)
    appended._file.close()
    appended._file = _FullDisk()
    for action in (lambda: appended.append(b"row\n"), appended.flush, appended.close):
        with pytest.raises(OSError) as failed:
            action()
        assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, os.fspath(location))


def test_other_object_stores_are_refused_before_anything_is_touched():
    with pytest.raises(NotImplementedError) as refused:
        storage.create_exclusive(storage.path("s3://b/lock.json"), b"x")
    assert str(refused.value) == "s3://b/lock.json: exclusive create is implemented for local paths and gs:// only"
    spec = storage.kvstore(storage.path("gs://bucket/run/probe_features"))
    assert spec == {"driver": "gcs", "bucket": "bucket", "path": "run/probe_features"}  # relative to the bucket
    assert storage.kvstore(storage.path("gs://bucket/XL/run"))["path"] == "XL/run"  # only the leading slash goes


def test_a_gcs_append_only_file_uploads_after_min_flush_seconds_and_rewrites_only_what_changed(gcs_here, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(storage.time, "monotonic", lambda: now[0])
    location = storage.path(f"{gcs_here}/events")
    fresh = storage.AppendOnlyFile(location)  # a new object: empty, nothing to upload yet
    fresh.append(b"a")
    now[0] += 9.9
    fresh.flush()
    assert not location.exists()
    now[0] += 0.1  # 10 s after it opened: the default spacing
    fresh.flush()
    assert location.read_bytes() == b"a"
    every = storage.AppendOnlyFile(location, min_flush_seconds=0)  # uploads at every flush, clock stopped or not
    for row in (b"b", b"c"):
        every.append(row)
        every.flush()
        assert location.read_bytes().endswith(row)
    every.close()
    untouched = storage.AppendOnlyFile(location)
    location.write_bytes(b"replaced by another writer")
    untouched.close()  # nothing appended: the object is not rewritten
    assert location.read_bytes() == b"replaced by another writer"


def test_check_reachable_asks_googles_service_with_a_bounded_wait_unless_an_emulator_is_named(monkeypatch):
    asked = []

    def unreachable(address, timeout=None):
        asked.append((address, timeout))
        raise OSError("Temporary failure in name resolution")  # no errno, no strerror: the text is the cause

    monkeypatch.setattr(storage.socket, "create_connection", unreachable)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    with pytest.raises(storage.UnreachableError) as failed:
        storage.check_reachable("gs://bucket/run")
    assert asked == [(("storage.googleapis.com", 443), 10.0)]
    assert str(failed.value) == (
        "--workdir=gs://bucket/run: cannot reach the storage service at storage.googleapis.com:443 (Temporary "
        "failure in name resolution): no network, no DNS. Nothing was written."
    )
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1")
    with pytest.raises(storage.UnreachableError):
        storage.check_reachable("gs://bucket/run")
    assert asked[-1] == (("127.0.0.1", 80), 10.0)  # an emulator's URL without a port: HTTP's


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (RuntimeError("HTTP 401"), "no valid credentials (gcloud auth application-default login, or "
                                   "GOOGLE_APPLICATION_CREDENTIALS)"),
        (RuntimeError(""), "RuntimeError: "),
        (RuntimeError("x" * 300 + "\nsecond line"), "RuntimeError: " + "x" * 200),
    ],
)  # fmt: skip
def test_the_cause_of_a_refused_bucket_is_one_line(monkeypatch, error, why):
    monkeypatch.setattr(storage.socket, "create_connection", lambda *a, **k: type("C", (), {"close": lambda s: 0})())
    error.__cause__ = ValueError("wrapped")  # gcsfs's errors come wrapped: the words are searched in the chain

    def refuse(bucket):
        raise error

    monkeypatch.setattr(storage, "_bucket_exists", refuse)
    with pytest.raises(storage.UnreachableError) as failed:
        storage.check_reachable("gs://b/run")
    assert str(failed.value) == f"--workdir=gs://b/run: {why}. Nothing was written."
