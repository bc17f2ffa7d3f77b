"""Mutation score of one module against the tests that claim to guard it, with mutmut.

    .venv/bin/python tools/mutation_score.py igpt_jax/optim.py tests/test_optim.py [--rev REV] [--out FILE]

The tracked files at REV (default HEAD: commit what is to be measured) are copied into a temporary folder, so
mutmut's `mutants/` never lands in the checkout; mutmut (the `mutation` extra) mutates
only MODULE, maps each mutant to the listed tests that reach its function, and runs them, two at a time (each in a
process forked from a server that holds no JAX state). Prints one JSON object: killed, survived, no_tests (mutants in
functions none of the tests reach), the score killed / (killed + survived + no_tests) and the survivors' names;
`mutmut show NAME` in the printed folder shows a survivor's diff. Slow and outside the test run: optim.py's 118
mutants take about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _copy_tree(rev: str, into: Path) -> None:
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def _configure(tree: Path, module: str, tests: list[str]) -> None:
    with open(tree / "setup.cfg", "a") as f:
        f.write(
            "\n[mutmut]\n"
            f"source_paths = {module.split('/')[0]}\n"
            f"only_mutate = {module}\n"
            "also_copy = configs\n"
            f"pytest_add_cli_args_test_selection = {' '.join(tests)}\n"
            "process_isolation = forkserver\n"  # JAX's threads do not survive a fork of a process that ran it
            "forkserver_warmup = none\n"
        )


def score(module: str, tests: list[str], rev: str = "HEAD") -> dict:
    tree = Path(tempfile.mkdtemp(prefix="mutation_"))
    _copy_tree(rev, tree)
    _configure(tree, module, tests)
    mutmut = [sys.executable, "-m", "mutmut"]
    children = str(os.cpu_count() or 1)
    subprocess.run([*mutmut, "run", "--max-children", children], cwd=tree, check=True, capture_output=True)
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=tree, check=True, capture_output=True)
    stats = json.loads((tree / "mutants" / "mutmut-cicd-stats.json").read_text())
    results = subprocess.run([*mutmut, "results"], cwd=tree, check=True, capture_output=True, text=True).stdout
    survivors = [line.split(":")[0].strip() for line in results.splitlines() if line.strip().endswith(": survived")]
    judged = stats["killed"] + stats["survived"] + stats["no_tests"]
    return {
        "module": module,
        "tests": tests,
        "rev": rev,
        "killed": stats["killed"],
        "survived": stats["survived"],
        "no_tests": stats["no_tests"],
        "timeout": stats["timeout"],
        "score": round(stats["killed"] / judged, 3) if judged else None,
        "survivors": survivors,
        "folder": str(tree),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the file to mutate, e.g. igpt_jax/optim.py")
    parser.add_argument("tests", nargs="+", help="the test files or node ids that guard it")
    parser.add_argument("--rev", default="HEAD", help="the commit to measure (default HEAD)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = score(args.module, args.tests, args.rev)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
