"""The workdir lock (run_lock.py) as a second run and the holder see it: what lock.json says, the line that refuses a
run, when a lock counts as its dead holder's and is taken over, a live holder's heartbeat, and the same protocol
on a GCS bucket. Each holder that is not this test is written by hand with the fields a real holder writes."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import psutil
import pytest

from igpt_jax.workdir import run_lock, storage

DEAD_PID = 2**22 + 12345  # above the kernel's largest pid_max: no such process
BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _lock(tmp_path, **kwargs) -> run_lock.RunLock:
    return run_lock.RunLock(storage.path(tmp_path), **kwargs)


def _read(tmp_path) -> dict:
    return json.loads((tmp_path / "lock.json").read_text())


def _write_holder(tmp_path, **fields) -> dict:
    """A holder on this host, this boot, this test's (live) pid, that beat just now, unless `fields` say otherwise."""
    holder = {"host": socket.gethostname(), "boot_id": BOOT_ID, "pid": os.getpid(), "process_start": None}
    holder |= {"started": time.time(), "heartbeat": time.time(), "token": "another run"} | fields
    (tmp_path / "lock.json").write_text(json.dumps(holder))
    return holder


@pytest.fixture
def now(monkeypatch) -> float:
    """The lock's clock, stopped: the ages it reports are the ones the test wrote, however slow the machine."""
    from types import SimpleNamespace

    stopped = float(int(time.time()))  # whole seconds: etils gives a file's mtime in whole seconds
    clock = SimpleNamespace(time=lambda: stopped, strftime=time.strftime, localtime=time.localtime)
    monkeypatch.setattr(run_lock, "time", clock)
    return stopped


def _takes_over(tmp_path, caplog, **kwargs) -> str:
    """Acquires over the lock in place and returns the reason the warning gave."""
    lock = _lock(tmp_path, **kwargs)
    with caplog.at_level(logging.WARNING, logger="igpt_jax.workdir.run_lock"):
        lock.acquire()
    try:
        assert _read(tmp_path)["token"] == lock._token
    finally:
        lock.release()
    (record,) = [r for r in caplog.records if r.getMessage().startswith("taking over the lock")]
    caplog.clear()
    prefix = f"taking over the lock {tmp_path / 'lock.json'}: "
    assert record.getMessage().startswith(prefix)
    return record.getMessage()[len(prefix) :]


def test_lock_json_names_this_process_by_host_boot_pid_and_kernel_start_time(tmp_path):
    before = time.time()
    lock = _lock(tmp_path, heartbeat_seconds=3600)
    lock.acquire()
    after = time.time()
    try:
        record = _read(tmp_path)
        assert set(record) == {"host", "boot_id", "pid", "process_start", "started", "heartbeat", "token"}
        assert (record["host"], record["boot_id"], record["pid"]) == (socket.gethostname(), BOOT_ID, os.getpid())
        # the kernel's start time in clock ticks since boot, as psutil turns it into seconds since the epoch
        ticks = int(record["process_start"]) / os.sysconf("SC_CLK_TCK")
        assert psutil.boot_time() + ticks == pytest.approx(psutil.Process().create_time(), abs=0.02)  # 2 ticks
        assert before <= record["started"] <= record["heartbeat"] <= after
        assert record["token"] == lock._token and len(lock._token) == 32
        assert _lock(tmp_path)._token != lock._token
        (beat,) = [t for t in threading.enumerate() if t.name == "workdir-lock"]  # the name a stack dump shows
        assert beat.daemon  # never keeps a finished run's process alive
    finally:
        lock.release()
    assert not (tmp_path / "lock.json").exists() and not beat.is_alive()


def test_the_start_time_is_read_past_a_process_name_with_parentheses_and_spaces(tmp_path):
    """/proc/PID/stat's second field is the process name in parentheses, and a name may hold both."""
    program = tmp_path / "a) b c) d"
    program.symlink_to(sys.executable)
    child = subprocess.Popen([str(program), "-c", "import time; time.sleep(30)"])
    try:
        for _ in range(100):  # the name is the program's once it has exec'ed
            if psutil.Process(child.pid).name() == "a) b c) d":
                break
            time.sleep(0.02)
        ticks = int(run_lock._process_start(child.pid)) / os.sysconf("SC_CLK_TCK")
        assert psutil.boot_time() + ticks == pytest.approx(psutil.Process(child.pid).create_time(), abs=0.02)
    finally:
        child.kill()
        child.wait()
    assert run_lock._process_start(DEAD_PID) is None


def test_a_second_run_is_refused_in_one_line_naming_the_holder_and_the_ways_on(tmp_path, now):
    started = datetime.datetime(2026, 3, 1, 9, 30, 15).timestamp()
    _write_holder(tmp_path, host="pod-worker-7", pid=4242, started=started, heartbeat=now - 42.2)
    with pytest.raises(run_lock.WorkdirLockedError) as refused:
        _lock(tmp_path, stale_seconds=300).acquire()
    assert str(refused.value) == (
        f"workdir {tmp_path} is in use by another run: host pod-worker-7 pid 4242 since 2026-03-01 09:30:15 "
        "(heartbeat 42s ago). One run per workdir: stop that run or use another --workdir. A lock whose holder "
        f"died is taken over once its heartbeat is 300s old (at once on the same host); to release it by hand, "
        f"delete {tmp_path / 'lock.json'}."
    )
    assert _read(tmp_path)["host"] == "pod-worker-7"  # left as it was


def test_a_lock_whose_holder_is_gone_from_this_host_is_taken_over_at_once(tmp_path, caplog):
    _write_holder(tmp_path, pid=DEAD_PID)
    assert _takes_over(tmp_path, caplog) == f"its holder, pid {DEAD_PID} on this host, is gone"
    # the pid is alive but is another process than the holder's (the kernel gave the pid out again)
    _write_holder(tmp_path, process_start=str(int(run_lock._process_start(os.getpid())) - 1))
    assert _takes_over(tmp_path, caplog) == f"its holder, pid {os.getpid()} on this host, is gone"


def test_a_live_holder_on_this_host_keeps_its_lock_however_old_its_heartbeat(tmp_path, monkeypatch, now):
    for start in (run_lock._process_start(os.getpid()), None):  # None: a holder on a kernel without /proc
        _write_holder(tmp_path, process_start=start, heartbeat=now - 10_000)
        with pytest.raises(run_lock.WorkdirLockedError, match="heartbeat 10000s ago"):
            _lock(tmp_path, stale_seconds=300).acquire()

    def not_ours(pid, signal):  # a holder run by another user: signal 0 is refused, but the process exists
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(run_lock.os, "kill", not_ours)
    _write_holder(tmp_path, pid=1, process_start="1")
    with pytest.raises(run_lock.WorkdirLockedError, match="pid 1 since"):
        _lock(tmp_path, stale_seconds=300).acquire()


def test_another_hosts_or_boots_lock_is_judged_by_its_heartbeats_age(tmp_path, caplog, now):
    elsewhere = [{"host": "pod-worker-7", "pid": 4242}, {"boot_id": "before-the-reboot"}]  # same name, other boot
    for where in elsewhere:
        who = f"{where.get('host', socket.gethostname())} pid {where.get('pid', os.getpid())}"
        _write_holder(tmp_path, **where, heartbeat=now - 290)
        with pytest.raises(run_lock.WorkdirLockedError, match=f"host {who} since .* \\(heartbeat 290s ago\\)"):
            _lock(tmp_path, stale_seconds=300).acquire()
        _write_holder(tmp_path, **where, heartbeat=now - 310)
        reason = _takes_over(tmp_path, caplog, stale_seconds=300)
        assert reason == f"its holder ({who}) sent no heartbeat for 310s"
    # the default: stale after 300 s (10 missed beats of 30 s), one second past it is enough
    _write_holder(tmp_path, **elsewhere[0], heartbeat=now - 300)
    with pytest.raises(run_lock.WorkdirLockedError, match="heartbeat 300s ago"):
        _lock(tmp_path).acquire()
    _write_holder(tmp_path, **elsewhere[0], heartbeat=now - 301)
    assert _takes_over(tmp_path, caplog) == "its holder (pod-worker-7 pid 4242) sent no heartbeat for 301s"


def test_a_lock_written_without_a_heartbeat_or_start_is_judged_as_never_beating(tmp_path, caplog, now):
    """A holder record cut down to who holds it (another tool, an older writer): no heartbeat is as old as can be."""
    holder = _write_holder(tmp_path, host="pod-worker-7", pid=4242)
    del holder["heartbeat"], holder["started"]
    (tmp_path / "lock.json").write_text(json.dumps(holder))
    reason = _takes_over(tmp_path, caplog, stale_seconds=300)
    assert reason == f"its holder (pod-worker-7 pid 4242) sent no heartbeat for {now:.0f}s"


def test_an_unreadable_lock_is_held_until_it_is_as_old_as_a_stale_heartbeat(tmp_path, caplog, now):
    (tmp_path / "lock.json").write_text('{"host": "pod-wor')  # a holder's write cut short, or garbage
    with pytest.raises(run_lock.WorkdirLockedError) as refused:
        _lock(tmp_path, stale_seconds=300).acquire()
    assert f"in use by another run: a run whose lock {tmp_path / 'lock.json'} is unreadable. " in str(refused.value)
    os.utime(tmp_path / "lock.json", (now - 300, now - 300))  # as old as a stale heartbeat, not older: held
    with pytest.raises(run_lock.WorkdirLockedError):
        _lock(tmp_path, stale_seconds=300).acquire()
    old = now - 400
    os.utime(tmp_path / "lock.json", (old, old))
    assert _takes_over(tmp_path, caplog, stale_seconds=300) == "unreadable and 400s old"


def test_a_lock_that_vanishes_while_read_is_retried_and_one_that_keeps_coming_back_is_refused(
    tmp_path, caplog, monkeypatch
):
    create = storage.create_exclusive
    attempts = []

    def lost_race_once(location, data):  # another run held it a moment ago and has just released it
        attempts.append(location)
        return False if len(attempts) == 1 else create(location, data)

    monkeypatch.setattr(storage, "create_exclusive", lost_race_once)
    assert _takes_over(tmp_path, caplog) == "it disappeared" and len(attempts) == 2

    def always_there(location, data):  # a stale lock, removed, and written again by a relaunch each time
        attempts.append(location)
        _write_holder(tmp_path, pid=DEAD_PID)
        return False

    attempts.clear()
    monkeypatch.setattr(storage, "create_exclusive", always_there)
    with pytest.raises(run_lock.WorkdirLockedError) as refused:
        _lock(tmp_path).acquire()
    assert str(refused.value) == (
        f"{tmp_path / 'lock.json'} keeps reappearing: another run is starting on this workdir right now"
    )
    assert len(attempts) == 3


def test_a_live_holders_heartbeat_advances_so_another_host_never_finds_it_stale(tmp_path):
    lock = _lock(tmp_path, heartbeat_seconds=0.05)
    lock.acquire()
    try:
        first = _read(tmp_path)
        beats = []
        for _ in range(3):
            time.sleep(0.3)
            beats.append(_read(tmp_path))
        assert first["heartbeat"] < beats[0]["heartbeat"] < beats[1]["heartbeat"] < beats[2]["heartbeat"]
        assert time.time() - beats[2]["heartbeat"] < 1.0
        for beat in beats:  # a beat rewrites the heartbeat only
            assert {k: v for k, v in beat.items() if k != "heartbeat"} == {
                k: v for k, v in first.items() if k != "heartbeat"
            }
        # as a run on another host judges it, where only the heartbeat's age can free the lock: 1.2 s after the
        # holder started, a lock stale after 0.5 s without a beat is still held
        assert _lock(tmp_path, stale_seconds=0.5)._stale(_read(tmp_path) | {"host": "another-host"}) is None
    finally:
        lock.release()


def test_a_heartbeat_that_fails_to_write_is_tried_again_at_the_next_beat(tmp_path, monkeypatch, caplog):
    write = storage.write_bytes
    failures = []

    def flaky(location, data):
        if len(failures) < 2:
            failures.append(location)
            raise OSError(5, "Input/output error")
        write(location, data)

    lock = _lock(tmp_path, heartbeat_seconds=0.05)
    lock.acquire()
    first = _read(tmp_path)["heartbeat"]
    monkeypatch.setattr(storage, "write_bytes", flaky)
    try:
        with caplog.at_level(logging.WARNING, logger="igpt_jax.workdir.run_lock"):
            deadline = time.time() + 10
            while _read(tmp_path)["heartbeat"] == first and time.time() < deadline:
                time.sleep(0.02)
        assert _read(tmp_path)["heartbeat"] > first and not lock.lost
        failed = [r.getMessage() for r in caplog.records if "heartbeat failed" in r.getMessage()]
        assert failed == ["workdir lock heartbeat failed: [Errno 5] Input/output error"] * 2
    finally:
        lock.release()


def test_a_holder_whose_lock_was_taken_over_knows_stops_beating_and_leaves_the_new_lock(tmp_path, caplog):
    lock = _lock(tmp_path, heartbeat_seconds=0.05)
    lock.acquire()
    with caplog.at_level(logging.ERROR, logger="igpt_jax.workdir.run_lock"):
        new = _write_holder(tmp_path, host="pod-worker-7", pid=4242)
        deadline = time.time() + 10
        while not lock.lost and time.time() < deadline:
            time.sleep(0.02)
        assert lock.lost
        lock._thread.join(timeout=5)
        assert not lock._thread.is_alive()  # it stopped beating: the new holder's lock is never overwritten
    assert [r.getMessage() for r in caplog.records] == [
        f"lost the workdir lock {tmp_path / 'lock.json'} to pod-worker-7 pid 4242"
    ]
    lock.release()
    assert _read(tmp_path) == new  # not removed: not ours


def test_release_removes_only_this_runs_lock_and_never_raises(tmp_path, monkeypatch, caplog):
    holder = _write_holder(tmp_path, host="pod-worker-7", pid=4242)
    _lock(tmp_path).release()  # never acquired: someone else's lock stays
    assert _read(tmp_path) == holder
    (tmp_path / "lock.json").unlink()

    lock = _lock(tmp_path, heartbeat_seconds=3600)
    lock.acquire()
    monkeypatch.setattr(type(lock.path), "unlink", lambda self, missing_ok=False: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="igpt_jax.workdir.run_lock"):
        lock.release()  # a failure to remove it is logged, never raised over why the run ended
    assert [r.getMessage() for r in caplog.records] == [
        f"could not release the workdir lock {tmp_path / 'lock.json'}: division by zero"
    ]
    assert not lock._thread.is_alive() and _read(tmp_path)["token"] == lock._token


def test_acquire_everywhere_takes_the_lock_in_one_process_and_refuses_with_the_holders_line(tmp_path):
    lock = run_lock.acquire_everywhere(storage.path(tmp_path), stale_seconds=300)
    try:
        assert _read(tmp_path)["token"] == lock._token
        with pytest.raises(run_lock.WorkdirLockedError, match=f"^workdir {tmp_path} is in use by another run: host "):
            run_lock.acquire_everywhere(storage.path(tmp_path))
    finally:
        lock.release()


def test_every_process_learns_process_0s_verdict_and_only_process_0_takes_the_lock(tmp_path, monkeypatch):
    from jax.experimental import multihost_utils

    sent = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: sent.append(int(x)) or np.int32(1))
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # process 0 was refused; this one tried nothing
    with pytest.raises(run_lock.WorkdirLockedError, match=f"^workdir {tmp_path} is in use by another run \\(process 0"):
        run_lock.acquire_everywhere(storage.path(tmp_path))
    assert sent == [0] and not (tmp_path / "lock.json").exists()

    monkeypatch.setattr(jax, "process_index", lambda: 0)  # process 0 takes a free workdir and says so
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: sent.append(int(x)) or x)
    lock = run_lock.acquire_everywhere(storage.path(tmp_path), stale_seconds=7, heartbeat_seconds=1)
    try:
        assert sent == [0, 0] and _read(tmp_path)["token"] == lock._token
        assert (lock.stale_seconds, lock.heartbeat_seconds) == (7, 1)
        _write_holder(tmp_path)  # now another run holds it: process 0 tells the others it was refused
        with pytest.raises(run_lock.WorkdirLockedError, match="in use by another run: host"):
            run_lock.acquire_everywhere(storage.path(tmp_path))
        assert sent == [0, 0, 1]
    finally:
        lock.release()


def test_asking_whether_a_holder_is_alive_sends_it_no_signal(tmp_path):
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert run_lock._alive(child.pid, None)
        time.sleep(0.5)
        assert child.poll() is None  # a real signal (SIGHUP) would have ended it
    finally:
        child.kill()
        child.wait()
    assert not run_lock._alive(child.pid, None)


def test_the_lock_protocol_holds_on_a_gcs_bucket(gcs_here):
    """Exclusive creation by eight racers (the generation precondition lets exactly one win), refusal, heartbeat,
    release and take-over against a GCS API."""
    workdir = storage.path(gcs_here)
    racers = [None] * 8

    def race(i):
        racers[i] = storage.create_exclusive(workdir / "race.json", str(i).encode())

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sum(racers) == 1 and (workdir / "race.json").read_text() == str(racers.index(True))

    lock = run_lock.RunLock(workdir, heartbeat_seconds=0.2, stale_seconds=300)
    lock.acquire()
    first = json.loads((workdir / "lock.json").read_text())
    try:
        with pytest.raises(run_lock.WorkdirLockedError) as refused:
            run_lock.RunLock(workdir).acquire()
        assert str(refused.value).startswith(
            f"workdir {gcs_here} is in use by another run: host {socket.gethostname()} pid {os.getpid()} since "
        )
        time.sleep(1.5)
        beat = json.loads((workdir / "lock.json").read_text())["heartbeat"] - first["heartbeat"]
        assert beat > 0.5  # at least 3 beats of 0.2 s in 1.5 s, however slow the emulator
    finally:
        lock.release()
    assert not (workdir / "lock.json").exists()
    (workdir / "lock.json").write_text(json.dumps(first | {"host": "pod-worker-7", "heartbeat": time.time() - 600}))
    second = run_lock.RunLock(workdir)
    second.acquire()
    assert json.loads((workdir / "lock.json").read_text())["token"] == second._token
    second.release()
