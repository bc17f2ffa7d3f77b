"""Mutation score of a module against the tests that claim to guard it, with mutmut.

    .venv/bin/python tools/mutation_score.py igpt_jax/optim.py tests/test_optim.py [--rev REV] [--out FILE]
    .venv/bin/python tools/mutation_score.py --all [--rev REV] [--out FILE]   # every module of GUARDS, in turn
    .venv/bin/python tools/mutation_score.py igpt_jax/finetune.py --sample 60   # a seeded random 60 of its mutants

The tracked files at REV (default HEAD: commit what is to be measured) are copied into a temporary folder, so
mutmut's `mutants/` never lands in the checkout; mutmut (the `mutation` extra) mutates only MODULE, maps each mutant
to the listed tests that reach its function, and runs them, two at a time (each in a process forked from a server
that has imported the heavy libraries, PRELOAD, but started no JAX backend). The tests run as in the default test
run (`-m "not slow"` from setup.cfg).

Prints one JSON object per module: killed, survived, no_tests (mutants in functions that none of the tests reach in
the pytest process itself: code reached only inside a subprocess the test starts counts here too), the score
killed / (killed + survived + no_tests), the survivors' names and the seconds it took; `mutmut show NAME` in the
printed folder shows a survivor's diff. Slow and outside the test run: optim.py's 118 mutants take under 4 minutes
on 2 cores, the whole table hours.

--sample N runs a seeded random N of the module's mutants (Acree's and Budd's mutant sampling: the score of a random
sample estimates the whole's; the JSON gives its 95% interval). It is for modules whose tests
are whole runs (finetune.py's: about a minute a mutant on 2 cores, 6 hours for all 363).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each module the README reports a score for, with the test files that claim to guard it. A file that does not exist
# at the measured revision is left out (and said so), so an older commit can be measured with the same table.
GUARDS: dict[str, tuple[str, ...]] = {
    "igpt_jax/workdir/checkpoint.py": ("tests/test_checkpoint.py", "tests/test_recovery.py"),
    "igpt_jax/defaults.py": (
        "tests/test_defaults.py",
        "tests/test_config_and_cli.py",
        "tests/test_presets.py",
        "tests/test_resume_rules.py",
    ),
    "igpt_jax/finetune.py": ("tests/test_finetune.py",),
    "igpt_jax/metrics.py": ("tests/test_metrics.py", "tests/test_workdir_files.py"),
    "igpt_jax/optim.py": ("tests/test_optim.py",),
    "igpt_jax/planning/compiled.py": ("tests/test_planner.py",),
    "igpt_jax/planning/report.py": ("tests/test_planner.py",),
    "igpt_jax/probe/linear.py": ("tests/test_probe.py", "tests/test_streamed_probe.py", "tests/test_probe_features.py"),
    "igpt_jax/probe/streamed.py": ("tests/test_streamed_probe.py", "tests/test_probe_features.py"),
    "igpt_jax/workdir/resume.py": ("tests/test_resume_rules.py", "tests/test_resume_process.py"),
    "igpt_jax/workdir/run_lock.py": ("tests/test_run_lock.py", "tests/test_workdir_files.py"),
    "igpt_jax/sampling.py": ("tests/test_sampling.py",),
    "igpt_jax/sharding.py": ("tests/test_sharding_rules.py", "tests/test_train.py"),
    "igpt_jax/steps.py": ("tests/test_train.py", "tests/test_steps.py"),
    "igpt_jax/workdir/storage.py": (
        "tests/test_storage.py",
        "tests/test_workdir_files.py",
        "tests/test_gcs_workdir.py",
        "tests/test_run_lock.py",
    ),
}


ALSO_COPY = ("configs", "launch", "tools", "benchmarks", "docs", "README.md")  # what tests read besides the package
# Imported once by the server that forks a process per mutant (none of them starts a JAX backend, so the forks are
# safe): 2.4x faster than importing them again for every mutant (optim.py: 3:44 against 9:00, same verdicts).
PRELOAD = ("numpy", "scipy", "jax", "jax.numpy", "flax", "flax.nnx", "optax", "ml_collections", "orbax.checkpoint",
           "tensorstore", "etils.epath", "tensorflow", "tensorflow_datasets", "torch", "transformers", "PIL.Image",
           "matplotlib", "sklearn.linear_model", "pytest")  # fmt: skip
# JAX reads these when it is imported (before tests/conftest.py could set them): the test run's own settings
ENVIRONMENT = {
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # the first character of mutmut's progress lines


def _copy_tree(rev: str, into: Path) -> None:
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def _configure(tree: Path, module: str, tests: list[str]) -> None:
    def listed(key: str, values) -> str:  # setup.cfg's lists are one value a line (space-joined is one argument)
        return f"{key} =\n" + "".join(f"    {value}\n" for value in values)

    (tree / "mutation_preload.txt").write_text("\n".join(PRELOAD) + "\n")
    with open(tree / "setup.cfg", "a") as f:
        f.write(
            "\n[mutmut]\n"
            f"source_paths = {module.split('/')[0]}\n"
            f"only_mutate = {module}\n"
            + listed("also_copy", ALSO_COPY)
            + listed("pytest_add_cli_args_test_selection", tests)
            + "process_isolation = forkserver\n"  # JAX's threads do not survive a fork of a process that ran it
            "forkserver_warmup = import\n"
            "preload_modules_file = mutation_preload.txt\n"
            # a mutant's CPU time may exceed its tests' in the clean run by one-time set-up the clean run did once
            # for all (libtpu's start: 8 s): 30 s more before a mutant counts as timed out
            "timeout_constant = 30\n"
            "debug = true\n"  # pytest's own report in the output: what failed when a clean run fails
        )


def _sample_of_mutants(tree: Path, module: str, size: int, seed: int) -> tuple[list[str], int]:
    """A seeded random `size` of MODULE's mutant names, and how many there are: mutmut generates them in the tree
    (the run that follows finds them up to date)."""
    generate = (
        "import json, sys; from pathlib import Path; from mutmut.__main__ import create_file_mutants; "
        "result = create_file_mutants(Path(sys.argv[1])); "
        "sys.exit(repr(result.error) if result.error else None)"
    )
    made = subprocess.run([sys.executable, "-c", generate, module], cwd=tree, capture_output=True, text=True)
    if made.returncode:
        sys.exit(f"mutmut could not mutate {module} in {tree}:\n{made.stderr.strip()}")
    names = sorted(json.loads((tree / "mutants" / f"{module}.meta").read_text())["exit_code_by_key"])
    return sorted(random.Random(seed).sample(names, min(size, len(names)))), len(names)


def _wilson(rate: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson interval of a score over n mutants drawn at random (unlike rate +- z * standard error, it stays
    inside [0, 1] and does not shrink to a point when every sampled mutant was killed)."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 3), round(centre + half, 3)]


def score(module: str, tests: list[str], rev: str = "HEAD", sample: int = 0, seed: int = 0) -> dict:
    started = time.perf_counter()
    tree = Path(tempfile.mkdtemp(prefix="mutation_"))
    _copy_tree(rev, tree)
    missing = [t for t in tests if not (tree / t.split("::")[0]).exists()]
    tests = [t for t in tests if t not in missing]
    if not (tree / module).exists() or not tests:
        return {"module": module, "rev": rev, "skipped": f"no {module} or none of its tests at {rev}"}
    _configure(tree, module, tests)
    mutmut = [sys.executable, "-m", "mutmut"]
    children = str(os.cpu_count() or 1)
    # one persistent compilation cache for every mutant's process: a mutant that leaves a program unchanged reuses
    # its executable instead of compiling it again (a tiny train step: 23 s, then 2 s)
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tree / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}  # fmt: skip
    environment = os.environ | ENVIRONMENT | cache
    chosen, generated = _sample_of_mutants(tree, module, sample, seed) if sample else ([], None)
    run = subprocess.run(
        [*mutmut, "run", "--max-children", children, *chosen], cwd=tree, capture_output=True, text=True, env=environment
    )
    if run.returncode:  # its output without the progress spinner: a test that fails unmutated is named in it
        lines = (run.stdout + run.stderr).splitlines()
        (tree / "mutmut-run.log").write_text("\n".join(line for line in lines if line[:1] not in SPINNER))
        sys.exit(f"mutmut run failed in {tree} (exit {run.returncode}); its output: {tree / 'mutmut-run.log'}")
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=tree, check=True, capture_output=True)
    stats = json.loads((tree / "mutants" / "mutmut-cicd-stats.json").read_text())
    results = subprocess.run([*mutmut, "results"], cwd=tree, check=True, capture_output=True, text=True).stdout
    survivors = [line.split(":")[0].strip() for line in results.splitlines() if line.strip().endswith(": survived")]
    judged = stats["killed"] + stats["survived"] + stats["no_tests"]
    rate = stats["killed"] / judged if judged else None
    sampled = (
        {"sample": {"of": generated, "seed": seed, "interval_95": _wilson(rate, judged)}} if sample and judged else {}
    )
    return {
        "module": module,
        "tests": tests,
        "missing_tests": missing,
        "rev": rev,
        "killed": stats["killed"],
        "survived": stats["survived"],
        "no_tests": stats["no_tests"],
        "timeout": stats["timeout"],
        "score": round(rate, 3) if judged else None,
        **sampled,
        "survivors": survivors,
        "seconds": round(time.perf_counter() - started),
        "folder": str(tree),
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", help="the file to mutate, e.g. igpt_jax/optim.py")
    parser.add_argument("tests", nargs="*", help="the test files or node ids that guard it (default: GUARDS')")
    parser.add_argument("--all", action="store_true", help="every module of GUARDS against its tests, in turn")
    parser.add_argument("--rev", default="HEAD", help="the commit to measure (default HEAD)")
    parser.add_argument("--sample", type=int, default=0, help="only a seeded random N of each module's mutants")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    parser.add_argument("--out", help="also write the JSON here (with --all: one object per line, as each ends)")
    return parser


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, read and checked (argparse's usage error and exit 2 for a bad one)."""
    checker = parser()
    args = checker.parse_args(argv)
    if args.all == bool(args.module):
        checker.error("give a MODULE [TESTS ...] or --all")
    if args.module and not args.tests and args.module not in GUARDS:
        checker.error(f"{args.module} has no tests in GUARDS; name them after it")
    return args


def main() -> None:
    args = arguments()
    if importlib.util.find_spec("mutmut") is None:
        sys.exit(f"mutmut is not installed in {sys.prefix}: pip install -e '.[mutation]' (pyproject's extra)")
    todo = GUARDS.items() if args.all else [(args.module, args.tests or GUARDS[args.module])]
    for module, tests in todo:
        result = score(module, list(tests), args.rev, args.sample, args.seed)
        print(json.dumps(result, indent=2), flush=True)
        if args.out:
            with open(args.out, "a" if args.all else "w") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
