"""One run per workdir: `workdir/lock.json`, created only if absent, names the run that holds the workdir.

Two runs writing the same checkpoints destroy each other's saves, so a second run is refused with one line naming
the holder. Creation is atomic on every storage the workdir can live on (O_EXCL locally, a generation precondition
on GCS). The holder rewrites its heartbeat every `heartbeat_seconds`. A lock is stale, and is taken over with a
warning, when its holder is gone: on the same machine (host name and boot id) when its process no longer exists
(kill -9, then relaunch), elsewhere when its heartbeat is older than `stale_seconds` (a pod VM that vanished). A
holder that finds someone else's lock in its place (it was taken over while this run was stuck) sets `lost`, and the
loop stops.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from etils import epath

from igpt_jax import errors
from igpt_jax.workdir import layout, storage

log = logging.getLogger(__name__)


class WorkdirLockedError(errors.UsageError, RuntimeError):
    """Another run holds the workdir."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), which tells a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    """This kernel's boot id: with the host name, it tells this machine from another with the same name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return start is None or _process_start(pid) in (None, start)


class RunLock:
    def __init__(self, workdir: epath.Path, *, stale_seconds: float = 300.0, heartbeat_seconds: float = 30.0):
        self.path = workdir / layout.LOCK
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.lost = False
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, started: float) -> bytes:
        pid = os.getpid()
        return json.dumps(
            {
                "host": socket.gethostname(),
                "boot_id": _boot_id(),
                "pid": pid,
                "process_start": _process_start(pid),
                "started": started,
                "heartbeat": time.time(),
                "token": self._token,
            }
        ).encode()

    def acquire(self) -> None:
        """Takes the lock (replacing a stale one) or raises WorkdirLockedError naming the holder."""
        self._started = time.time()
        for _ in range(3):  # a stale lock removed, then created again: another relaunch may race us to it
            if storage.create_exclusive(self.path, self._record(self._started)):
                self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
                self._thread.start()
                return
            holder = self._holder()
            why_stale = self._stale(holder)
            if why_stale is None:
                raise WorkdirLockedError(self._describe(holder))
            log.warning("taking over the lock %s: %s", self.path, why_stale)
            self.path.unlink(missing_ok=True)
        raise WorkdirLockedError(f"{self.path} keeps reappearing: another run is starting on this workdir right now")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, OSError):
            return None  # being written, or unreadable: judged by age

    def _stale(self, holder: dict | None) -> str | None:
        """Why the lock is stale, or None while its holder may still run."""
        if holder == {}:
            return "it disappeared"
        if holder is None:
            age = time.time() - self.path.stat().mtime
            return f"unreadable and {age:.0f}s old" if age > self.stale_seconds else None
        if holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id():
            # this machine: the process table decides, whatever the heartbeat says (a stopped process still holds)
            alive = _alive(int(holder["pid"]), holder.get("process_start"))
            return None if alive else f"its holder, pid {holder['pid']} on this host, is gone"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_seconds:
            return f"its holder ({holder.get('host')} pid {holder.get('pid')}) sent no heartbeat for {age:.0f}s"
        return None

    def _describe(self, holder: dict | None) -> str:
        workdir = self.path.parent
        if holder is None:
            who = f"a run whose lock {self.path} is unreadable"
        else:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
            beat = time.time() - float(holder.get("heartbeat", 0))
            who = f"host {holder.get('host')} pid {holder.get('pid')} since {started} (heartbeat {beat:.0f}s ago)"
        return (
            f"workdir {workdir} is in use by another run: {who}. One run per workdir: stop that run or use another "
            f"--workdir. A lock whose holder died is taken over once its heartbeat is {self.stale_seconds:.0f}s "
            f"old (at once on the same host); to release it by hand, delete {self.path}."
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                holder = self._holder()
                if holder and holder.get("token") != self._token:
                    self.lost = True
                    log.error("lost the workdir lock %s to %s pid %s", self.path, holder.get("host"), holder.get("pid"))
                    return
                storage.write_bytes(self.path, self._record(self._started))
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                log.warning("workdir lock heartbeat failed: %s", e)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still this run's."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=10)
        try:
            holder = self._holder()
            if holder and holder.get("token") == self._token:
                self.path.unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001 - never hide why the run ended; a stale lock is taken over later
            log.warning("could not release the workdir lock %s: %s", self.path, e)


def acquire_everywhere(workdir: epath.Path, **kwargs) -> RunLock:
    """Process 0 takes the lock; every process learns whether it did, and all raise WorkdirLockedError if not."""
    lock = RunLock(workdir, **kwargs)
    message = ""
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            message = str(e)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(message))))
        if refused and not message:
            message = f"workdir {workdir} is in use by another run (process 0 names it)"
    if message:
        raise WorkdirLockedError(message)
    return lock
