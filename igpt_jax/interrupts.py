"""SIGTERM (preemption, `tpu_pod.sh stop`, SLURM) and Ctrl-C both ask the run to save and stop.

The handler only records the request; the loop asks `agreed()` once per step, which is true on every process as soon
as any process got a signal (an allgather of one flag), so all of them save the same step and stop together. A
second Ctrl-C while that save runs raises KeyboardInterrupt: the save is abandoned (the checkpoint before it is
intact) and the run exits at once. A SIGINT that the parent process ignores (background jobs of a shell script) stays
ignored.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}  # 130: the shell's convention for Ctrl-C, after the save


class Stopped(Exception):  # noqa: N818 - not an error: the stop the user asked for
    """The run stopped on request (after saving, when training); `code` is the exit status, the message says how to
    continue."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StopRequest:
    """Remembers SIGTERM and SIGINT while installed (between `__init__` and `restore`)."""

    def __init__(self):
        self.signal: signal.Signals | None = None
        self.stopping = False  # every process agreed to stop (set by `agreed`)
        self.saving = False  # set by the loop while the final save runs: a second Ctrl-C then aborts it
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        sig = signal.Signals(signum)
        if self.signal is None:
            self.signal = sig
            more = " (Ctrl-C again to stop without saving)" if sig == signal.SIGINT else ""
            log.warning("%s received: saving at the next step, then exiting%s", sig.name, more)
        elif sig == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C")

    @property
    def received(self) -> bool:
        return self.signal is not None

    def agreed(self) -> bool:
        """True on every process once any process has been asked to stop (a collective: every process asks at the
        same point of the run); `stopping` remembers the answer."""
        if not self.stopping:
            if jax.process_count() == 1:
                self.stopping = self.received
            else:
                self.stopping = bool(multihost_utils.process_allgather(np.int32(self.received)).max())
        return self.stopping

    def exit_code(self) -> int:
        """0 after SIGTERM (or a stop another process received), 130 after Ctrl-C."""
        return EXIT_CODES.get(self.signal, 0)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class StoppedOutsideTheWork(BaseException):  # noqa: N818 - not an error: the stop the user asked for
    """Raised by `outside_the_work`'s handler wherever the main thread is. A BaseException, as KeyboardInterrupt is,
    so that no `except Exception` on the way out (a logging handler's, a library's) swallows it."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def outside_the_work(what: str = "the run") -> Iterator[None]:
    """While a mode starts up (imports done: the mesh, the restore, compiles) and winds down, before and after its
    StopRequest is installed: SIGTERM or Ctrl-C stops the process where it is (StoppedOutsideTheWork), so it exits with
    one line and its usual status (0, or 130 after Ctrl-C) and every `finally` on the way out runs (the workdir's
    lock is released). Nothing is lost: no step has trained since the checkpoint it resumed, or every one is saved."""

    def handle(signum, frame):
        sig = signal.Signals(signum)
        raise StoppedOutsideTheWork(
            f"stopped on request ({sig.name}) while {what} was starting or finishing: nothing was lost (no step "
            "had trained since its checkpoint); relaunch the same command to continue",
            EXIT_CODES[sig],
        )

    previous = {
        sig: signal.signal(sig, handle)
        for sig in (signal.SIGTERM, signal.SIGINT)
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
