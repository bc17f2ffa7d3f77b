"""Every error the package defines reaches the command line as one line with its exit status: they all derive from
igpt_jax.errors.IgptError, which `igpt`, `igpt-convert` and the preparation command catch."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import igpt_jax
from igpt_jax import errors, interrupts
from igpt_jax.evaluators import base

# Not errors: the stops the user asked for, which carry their own status (0, 130, or the signal's), and an
# evaluator's answer to one (the loop saves and stops).
STOPS = {interrupts.Stopped, interrupts.StoppedOutsideTheWork, base.Abandoned}


def _package_exceptions() -> dict[str, type]:
    found = {}
    for module in pkgutil.walk_packages(igpt_jax.__path__, "igpt_jax."):
        if module.name.endswith("__main__"):
            continue
        loaded = importlib.import_module(module.name)
        for name, value in vars(loaded).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.name:
                found[f"{module.name}.{name}"] = value
    return found


def test_every_error_of_the_package_carries_its_exit_status():
    found = _package_exceptions()
    assert len(found) > 15, sorted(found)
    loose = [name for name, kind in found.items() if kind not in STOPS and not issubclass(kind, errors.IgptError)]
    assert not loose, f"define these on igpt_jax.errors (UsageError, RunFailedError): {loose}"
    assert {found[n].exit_code for n in found if found[n] not in STOPS} == {1, 2, 3}


@pytest.mark.parametrize(
    "error, code, line",
    [
        (errors.UsageError("a\nb"), 2, "a; b"),
        (errors.RunFailedError("disk"), 1, "disk"),
        (FileNotFoundError("gone"), 2, "gone"),
        (FloatingPointError("nan"), 1, "nan"),
    ],
)
def test_an_error_becomes_its_status_and_one_line(error, code, line):
    assert (errors.exit_code(error), errors.line(error)) == (code, line)
    assert errors.exit_code(KeyError("a bug")) is None  # anything else keeps its traceback


def test_a_config_error_says_bad_config():
    from igpt_jax import config_checks

    assert config_checks.ConfigError("x=1: no\ny=2: no").line() == "bad config: x=1: no; y=2: no"
