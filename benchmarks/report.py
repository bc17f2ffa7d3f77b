"""How every benchmark hands its result over: one JSON object on stdout, and to --out when given."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | None) -> None:
    print(json.dumps(result, indent=2))
    write(result, out)


def write(result: dict, out: str | None) -> None:
    """The JSON to --out, when given (also a long benchmark's result so far)."""
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
