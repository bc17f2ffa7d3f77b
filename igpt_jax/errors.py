"""The errors a run can meet that are not bugs: the config's, the data's, the launch's, the workdir's or the
topology's. Each says what is wrong and the ways on in its message and carries the exit status it ends a command
with, so the command lines (`igpt`, `igpt-convert`, `python -m igpt_jax.data.prepare`) catch this one base class
and print one line, instead of listing every module's errors.

Exit statuses: 2, change something and rerun (a config, a flag, a file); 1, the run failed (a save, a read, a
storage service, a diverged loss); 3, a verdict (`--mode=compile`: the step does not fit the topology). Each error
also keeps the built-in type callers already catch (ValueError, RuntimeError, OSError).
"""

from __future__ import annotations


class IgptError(Exception):
    """A known way for a command to stop: one line and `exit_code`."""

    exit_code = 2

    def line(self) -> str:
        """The message on one line (multi-line messages list one problem a line)."""
        return str(self).replace("\n", "; ")


class UsageError(IgptError):
    """Something to change before rerunning: exit status 2."""

    exit_code = 2


class RunFailedError(IgptError):
    """The run failed on the way (storage, a save, the numbers): exit status 1."""

    exit_code = 1


# Errors of Python's own that a command meets for the same reasons, and their exit statuses.
BUILTIN = {FileNotFoundError: 2, FloatingPointError: 1}


def exit_code(error: BaseException) -> int | None:
    """The exit status a known error ends a command with, None for anything else (a bug: its traceback shows)."""
    if isinstance(error, IgptError):
        return error.exit_code
    return next((code for kind, code in BUILTIN.items() if isinstance(error, kind)), None)


def line(error: BaseException) -> str:
    return error.line() if isinstance(error, IgptError) else str(error).replace("\n", "; ")
