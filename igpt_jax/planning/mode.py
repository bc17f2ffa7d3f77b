"""--mode=compile: the report (and the search's ranking) printed, written to the workdir's compile.json and as a
metrics row, under the workdir's lock; exit status 3 (report.DoesNotFit) when neither the step nor any searched
setting fits."""

from __future__ import annotations

import json

import jax
import ml_collections

from igpt_jax import hardware, metrics
from igpt_jax.planning import report as report_lib
from igpt_jax.planning import search
from igpt_jax.workdir import layout, run_lock, storage


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The report, printed, in workdir/compile.json and metrics.jsonl. The workdir's lock is held throughout, as
    every mode that writes there holds it: two runs never append to metrics.jsonl at once, and a workdir another run
    holds is refused before minutes of compiling."""
    directory = storage.path(workdir)
    lock = run_lock.acquire_everywhere(directory)
    try:
        report = report_lib.plan(config)
        if config.compile.search:
            devices = hardware.topology_devices(config.compile.topology, config.compile.num_slices)
            report["search"] = search.search(config, devices, configured=report)
        if jax.process_index() == 0:
            storage.write_text(directory / layout.COMPILE_REPORT, json.dumps(report, indent=2) + "\n")
            row = {k: v for k, v in report_lib.flat(report).items() if k != "search"}
            metrics.append_row(directory, {"mode": "compile", "step": 0, **row}, config)
            print(report_lib.table(report), flush=True)
            if "search" in report:
                print(search.table(report["search"], report["bytes_per_device"]["hbm"] / hardware.GIB), flush=True)
    finally:
        lock.release()
    if not report["fits"] and not any(r["fits"] for r in report.get("search", ())):
        raise report_lib.DoesNotFit(report_lib.verdict(report))
    return report
