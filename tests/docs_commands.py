"""The shell commands the README and docs/ show, read as a test reads them: a test that runs one takes its text from
here, so the command a reader copies is the command that was tested, and an edit to the docs is an edit to the test.

A command is one line of a ```bash block, with its backslash continuations joined and its trailing comment dropped.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from helpers import ROOT

PAGES = ("README.md", "docs")
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class DocCommand:
    page: str  # relative to the repository root
    line: int  # where the command starts, 1-based
    text: str

    def argv(self) -> list[str]:
        """The words bash would pass, quotes removed (the text is one simple command: no pipes or &&)."""
        return shlex.split(self.text)

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _without_comment(line: str) -> str:
    """The line up to a # that starts a word outside quotes, as bash reads it."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _pages() -> list[Path]:
    found: list[Path] = []
    for name in PAGES:
        path = ROOT / name
        found += sorted(path.glob("*.md")) if path.is_dir() else [path]
    return found


def _commands_of(page: Path) -> list[DocCommand]:
    commands: list[DocCommand] = []
    language, pending, start = None, "", 0
    for number, raw in enumerate(page.read_text().splitlines(), start=1):
        fence = _FENCE.match(raw)
        if fence:
            language = None if language is not None else fence.group(1)
            continue
        if language not in ("bash", "sh"):
            continue
        line = _without_comment(raw).rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        text = (pending + line.strip()).strip()
        pending = ""
        if text:
            commands.append(DocCommand(str(page.relative_to(ROOT)), start, text))
    return commands


def all_commands() -> list[DocCommand]:
    """Every command of the README and docs/, in page order."""
    return [command for page in _pages() for command in _commands_of(page)]


def command(containing: str) -> DocCommand:
    """The one command whose text contains `containing`; a test names a command by what sets it apart."""
    found = commands(containing)
    if len(found) != 1:
        listed = "\n".join(map(str, found)) or "none"
        raise LookupError(f"{len(found)} commands in the docs contain {containing!r} (one expected):\n{listed}")
    return found[0]


def commands(containing: str) -> list[DocCommand]:
    """Every command whose text contains `containing`, in page order."""
    return [c for c in all_commands() if containing in c.text]


def igpt_arguments(doc: DocCommand) -> tuple[str, ...] | None:
    """The flags a command passes to igpt (directly, or through a launch script); None if it runs no igpt."""
    words = doc.argv()
    if "&&" in words:
        words = words[len(words) - words[::-1].index("&&") :]
    for i, word in enumerate(words):
        if word == "igpt_jax.main" or word == "igpt" or word.endswith("/igpt"):
            return tuple(words[i + 1 :])
        if word == "launch/local.sh":
            return tuple(words[i + 2 :])
        if word == "launch/tpu_pod.sh" and "--" in words:
            return tuple(words[words.index("--") + 1 :])
        if word.endswith(".sbatch"):
            return tuple(words[i + 1 :])
    return None


def checkout_like(folder: Path) -> Path:
    """A folder where the docs' relative paths resolve as in a checkout: .venv (the interpreter running the tests),
    configs/, launch/, benchmarks/, tools/ (the package is the installed one); workdirs the commands name land in
    it, not in the repository."""
    folder.mkdir(exist_ok=True)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    for name in ("configs", "launch", "benchmarks", "tools"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def run_doc(doc: DocCommand, cwd: Path, *extra: str, env: dict | None = None, timeout: int = 600):
    """The command through bash, as a reader would paste it, then `extra` (the test's sizes)."""
    line = doc.text + "".join(f" {shlex.quote(flag)}" for flag in extra)
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def activated_env(**extra: str) -> dict:
    """The environment of a reader's shell with the tests' virtual environment activated (`python` is its
    interpreter): without the 8 fake devices tests/conftest.py gives the test process, which make a CPU run of the
    README's model several times slower."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    return env | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}
