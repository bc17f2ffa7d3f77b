"""Builds a run's evaluators from config.evals and runs them: in the train loop when due, or as a mode.

Every evaluator is checked against the config it runs under (the checkpoint's recipe, for modes) before any of them
runs. What an evaluator returns is written when it has finished: its files (process 0, through the storage layer),
its TensorBoard pictures, then its metrics row, last, so a row in metrics.jsonl means the evaluator completed at that
step. A relaunch runs again the evaluators due at the step it resumes from that have no row there (`pending`): one
abandoned by a stop request, or killed, runs again.
"""

from __future__ import annotations

import importlib
import logging

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from igpt_jax import config_checks, evaluators, interrupts, metrics, runtime
from igpt_jax.data import sources
from igpt_jax.evaluators import base
from igpt_jax.workdir import storage

log = logging.getLogger(__name__)


def build(rt: runtime.Runtime, names: list[str]) -> list[base.Evaluator]:
    """The named evaluators of rt.config.evals, each checked for what it needs (ConfigError, one line per problem)."""
    config = rt.config
    problems = [
        problem
        for name in names
        for problem in evaluators.KINDS[config.evals[name].kind].needs(config, name, config.evals[name])
    ]
    if problems:
        raise config_checks.ConfigError("\n".join(problems))
    out = []
    for name in names:
        entry = config.evals[name]
        module = importlib.import_module(f"igpt_jax.evaluators.kinds.{entry.kind}")
        out.append(module.Evaluator(name, entry, rt))
    return out


def check_data(rt: runtime.Runtime, chosen: list[base.Evaluator], splits: dict[str, str] | None = None) -> None:
    """Every split the run will read, its own (`splits`: config key -> split of rt.source) and its evaluators',
    checked before the first step: ConfigError (exit 2) naming each key that does not work."""
    problems = [sources.split_problem(rt.source, key, split) for key, split in (splits or {}).items()]
    problems += [problem for evaluator in chosen for problem in evaluator.data_problems()]
    problems = [p for p in problems if p]
    if problems:
        raise config_checks.ConfigError("\n".join(problems))


def for_training(rt: runtime.Runtime) -> list[base.Evaluator]:
    """The evaluators training runs: those with a schedule."""
    return build(rt, [name for name, entry in rt.config.evals.items() if evaluators.scheduled(entry)])


def due(chosen: list[base.Evaluator], step: int, total_steps: int) -> list[base.Evaluator]:
    return [e for e in chosen if evaluators.due(e.entry, step, total_steps)]


def row_evaluator(row: dict) -> str | None:
    """The evaluator a metrics row belongs to (rows written before rows named theirs: by their mode)."""
    return row.get("evaluator") or evaluators.LEGACY_ROWS.get(row.get("mode"))


def pending(chosen: list[base.Evaluator], directory: epath.Path, step: int, total_steps: int) -> list[base.Evaluator]:
    """The evaluators due at `step` that have no row at that step in metrics.jsonl: a relaunch runs them first.
    Decided on process 0 and the same on every process."""
    candidates = due(chosen, step, total_steps)
    if not candidates:
        return []
    missing = np.zeros(len(candidates), np.int32)
    if jax.process_index() == 0:
        done = {(row_evaluator(r), r.get("step")) for r in metrics.read_rows(directory)}
        missing = np.asarray([(e.name, step) not in done for e in candidates], np.int32)
    if jax.process_count() > 1:
        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    return [e for e, m in zip(candidates, missing, strict=True) if m]


def run(
    chosen: list[base.Evaluator],
    params,
    step: int,
    directory: epath.Path,
    writer: metrics.MetricsWriter,
    stop: base.StopCheck = base.never,
) -> list[base.Result]:
    """Runs each evaluator and writes what it returns; raises base.Abandoned (nothing of that evaluator written)
    when `stop` says so at one of its batch boundaries."""
    results = []
    for evaluator in chosen:
        base.check(stop)
        result = evaluator.run(params, step, stop)
        write(result, step, directory, writer)
        results.append(result)
    return results


def write(result: base.Result, step: int, directory: epath.Path, writer: metrics.MetricsWriter) -> None:
    """Files (process 0), TensorBoard pictures, then the metrics row: a row means the rest is in place."""
    if jax.process_index() == 0:
        for relative, content in result.files.items():
            storage.write_bytes(directory / relative, content)
    writer.images(step, result.images)
    writer.write(result.row)
    if jax.process_index() == 0:
        print(result.summary, flush=True)


def run_mode(mode: str, config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """--mode=eval|probe|sample: the config's evaluators of the mode's kind on the newest checkpoint (or
    config.checkpoint_step), whatever their schedule. Returns their metrics rows."""
    kind = evaluators.mode_kind(mode)
    with runtime.for_checkpoint(config, workdir) as rt:
        chosen = build(rt, evaluators.of_kind(rt.config, kind))
        check_data(rt, chosen)
        stop_request = interrupts.StopRequest()
        writer = metrics.MetricsWriter(rt.directory, config=rt.config)
        try:
            results = run(chosen, rt.params, rt.step, rt.directory, writer, stop_request.agreed)
        except base.Abandoned:
            raise interrupts.Stopped(
                f"stopped on request: --mode={mode} on checkpoint {rt.step} was abandoned at a batch boundary; "
                "what it had finished is written, the rest is not",
                stop_request.exit_code(),
            ) from None
        finally:
            writer.close()
            stop_request.restore()
    return [r.row for r in results]


def eval_mode(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    return run_mode("eval", config, workdir)


def probe_mode(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    return run_mode("probe", config, workdir)


def sample_mode(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    return run_mode("sample", config, workdir)
