"""The presets, installed with the package: `--config=NAME[:ARG]` names one from any directory.

A preset is a config file here with a `get_config(arg)`, as ml_collections' config flags expect (big_vision's
layout). `--config=` also takes a path to any such file, so a user's own config works like a preset (a path to a
file beside it, e.g. `configs/igpt_l.py:48` in a checkout, is the same preset by path).
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent


def names() -> list[str]:
    """The presets' names: every config file here but the shared base."""
    return sorted(p.stem for p in FOLDER.glob("*.py") if p.stem not in ("__init__", "base"))


def resolve(spec: str) -> str:
    """`NAME[:ARG]` for a preset becomes its file's path (ARG kept); anything else, a path, is returned as given."""
    name, colon, arg = spec.partition(":")
    if name in names():
        return f"{FOLDER / name}.py{colon}{arg}"
    return spec
