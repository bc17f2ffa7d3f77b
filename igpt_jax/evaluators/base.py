"""The evaluator protocol: built from its config entry and the run's runtime, `run(params, step, stop)` returns a
Result, and writes nothing itself.

Nothing is written while an evaluator runs: its files, metrics row and TensorBoard pictures come back in the Result
and the runner writes them once it has finished, so an evaluator abandoned half-way (a stop request, a crash, a
SIGKILL) leaves no half-written output and no row, and is run again when the run is relaunched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import ml_collections

# Asked at every batch boundary of an evaluator: True once the run has been asked to stop (on every process at the
# same boundary, see interrupts.StopRequest.agreed).
StopCheck = Callable[[], bool]


def never() -> bool:
    return False


class Abandoned(Exception):  # noqa: N818 - not an error: the stop the user asked for
    """A stop request arrived while an evaluator ran; it stopped at a batch boundary and wrote nothing."""


def check(stop: StopCheck) -> None:
    """Raises Abandoned when a stop was requested: call it between batches."""
    if stop():
        raise Abandoned


@dataclasses.dataclass
class Result:
    row: dict  # the metrics.jsonl row: {"mode", "evaluator", "step", ...}; its scalars also go to TensorBoard
    summary: str  # one line for the terminal
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)  # path relative to the workdir -> content
    images: dict[str, bytes] = dataclasses.field(default_factory=dict)  # TensorBoard tag -> PNG
    shown: list[str] = dataclasses.field(default_factory=list)  # files a run names as its picture when it ends


class Evaluator(Protocol):
    name: str
    entry: ml_collections.ConfigDict  # config.evals.<name>: kind, schedule, settings

    def run(self, params, step: int, stop: StopCheck) -> Result: ...

    def data_problems(self) -> list[str]:
        """What is wrong with the data this evaluator will read (data sets, splits), one line each, found before
        the first training step rather than after it. Opens the data; does not run the model."""
        ...
