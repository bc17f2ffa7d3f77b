"""docs/architecture.md's module map matches the package: every module and sub-package has its line (a sub-package's
modules are named in its description), and the map names nothing that is not there."""

from __future__ import annotations

import re

from helpers import ROOT

PACKAGE = ROOT / "igpt_jax"


def _map_entries() -> dict[str, str]:
    """{'model.py': its description, 'data/': ..., ...}: the lines of the map indented under igpt_jax/."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text[text.index("## Module map") :]
    block = block[block.index("```") + 3 : block.index("```", block.index("```") + 3)]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        entry = re.match(r"^  (\S+)\s{2,}(.*)$", line)
        if entry:
            current = entry.group(1)
            entries[current] = entry.group(2)
        elif line.startswith(" " * 4) and current:
            entries[current] += " " + line.strip()
        else:
            current = None  # a line of the repository's top level
    return entries


def test_the_module_map_lists_the_package_as_it_is():
    entries = _map_entries()
    subpackages = sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    tree = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"} | {f"{p.name}/" for p in subpackages}
    assert sorted(tree - set(entries)) == [], "modules the map leaves out"
    assert sorted(set(entries) - tree) == [], "the map names what the package does not have"
    for sub in subpackages:
        modules = {p.relative_to(sub).as_posix() for p in sub.rglob("*.py") if p.name != "__init__.py"}
        unnamed = [
            m
            for m in sorted(modules)
            if not re.search(rf"(^|[\s(/]){re.escape(m.split('/')[-1])}", entries[f"{sub.name}/"])
        ]
        assert not unnamed, f"{sub.name}/'s line in the map does not name {unnamed}"
