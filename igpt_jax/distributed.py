"""Multi-process start-up and the guards against silent multi-host hangs.

`initialize` must run before anything touches a JAX backend (jax.devices(), an array, a jit): it starts
`jax.distributed` only when there are several processes, from explicit flags or from JAX's own detection of TPU
pods, SLURM and Open MPI; a single process starts nothing. CPU runs use gloo collectives.

Hangs: the coordination service's heartbeat makes every process fail when one dies (`heartbeat_timeout`); a
`Watchdog` turns a process that is alive but stuck (a deadlocked collective, a dead filesystem) into a dead one, which
the heartbeat then reports everywhere; `check_same_program` stops a run whose processes lowered different train
steps, which would otherwise hang in the first collective.
"""

from __future__ import annotations

import faulthandler
import hashlib
import logging
import os
import re
import sys
import threading
import time

import jax
import numpy as np

from igpt_jax import errors

log = logging.getLogger(__name__)

# How a collective or the coordination service reports that another process of the run is gone (killed, crashed,
# preempted): gloo's and NCCL's broken connections, the coordination service's heartbeat and barriers. An operation
# that failed this way failed because of that process, not because of anything this one can fix.
_LOST_PROCESS = re.compile(
    r"Gloo \w+ failed|NCCL (error|failure)|another task died|task (has )?(died|disconnected)|"
    r"[Bb]arrier (timed out|failed)|coordination service"
)


def lost_a_process(error_text: str) -> bool:
    """True when an error's text says another process of a multi-process run is gone (no single-process error
    speaks of gloo, NCCL, tasks or the coordination service)."""
    return _LOST_PROCESS.search(error_text) is not None


# Environment variables by which JAX's cluster detection recognises a multi-process launch.
_AUTO_DETECTED = {
    "SLURM": lambda env: int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env,
    "Open MPI": lambda env: int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1,
    "TPU pod": lambda env: "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env,
}


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout: int = 60,
    initialization_timeout: int = 300,
) -> str:
    """Starts jax.distributed when this is one of several processes; returns how the processes were found."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects the CPU backend
    timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout, initialization_timeout=initialization_timeout)
    if coordinator_address or num_processes or process_id is not None:
        missing = [
            n
            for n, v in (
                ("--coordinator_address", coordinator_address),
                ("--num_processes", num_processes),
                ("--process_id", process_id),
            )
            if v is None
        ]
        if missing:
            raise ValueError(f"multi-process flags come together: {', '.join(missing)} missing")
        if num_processes == 1:
            return "single process (--num_processes=1)"
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
        return f"flags: process {process_id} of {num_processes}, coordinator {coordinator_address}"
    env = os.environ
    for name, detected in _AUTO_DETECTED.items():
        if detected(env):
            jax.distributed.initialize(**timeouts)
            return f"{name} (detected by JAX): process {jax.process_index()} of {jax.process_count()}"
    return "single process"


class Watchdog:
    """Exits the process (status 3, after dumping every thread's stack) when `kick` is not called for `timeout`
    seconds. 0 turns it off. Dying is the point: the other processes' heartbeats then fail with a clear error
    instead of all of them waiting forever."""

    def __init__(self, timeout: float, what: str = "training"):
        self.timeout = timeout
        self.what = what
        self._last = time.monotonic()
        self._where = "start-up"
        self._stop = threading.Event()
        if timeout > 0:
            threading.Thread(target=self._watch, daemon=True, name="watchdog").start()

    def kick(self, where: str) -> None:
        self._last, self._where = time.monotonic(), where

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                print(
                    f"igpt: process {jax.process_index()}: no {self.what} progress for {idle:.0f}s after "
                    f"{self._where} (watchdog {self.timeout:.0f}s); exiting so the other processes stop too",
                    file=sys.stderr,
                    flush=True,
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os._exit(3)

    def close(self) -> None:
        self._stop.set()


class ProgramMismatchError(errors.UsageError, RuntimeError):
    """Processes lowered different programs: they would hang in their first collective."""


def fingerprint(lowered: jax.stages.Lowered) -> str:
    """sha256 of the lowered program's text without source locations (paths may differ between hosts)."""
    return hashlib.sha256(lowered.as_text(debug_info=False).encode()).hexdigest()


def check_same_program(digest: str, what: str = "train step") -> None:
    """Every process compares its fingerprint with every other's; any difference stops all of them."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    digests = [bytes(row).hex()[:12] for row in every]
    if len(set(digests)) > 1:
        raise ProgramMismatchError(
            f"processes lowered different {what}s (fingerprints by process: {digests}): check that every host runs "
            "the same code, config and flags"
        )
