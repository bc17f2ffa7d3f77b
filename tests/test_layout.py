"""The workdir's file names are stated once, in igpt_jax/workdir/layout.py: no other module of the package spells one
as a literal (a Hugging Face folder's own config.json, in convert/huggingface.py, is another folder's layout)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

from igpt_jax.workdir import layout

# Names the workdir's layout gives that mean nothing else in the package (mode names and config keys such as
# "finetune" and "compile", and the model's "probe_features" output, are other things spelt alike).
NAMES = {
    layout.CHECKPOINTS,
    layout.UNREADABLE_CHECKPOINTS,
    layout.CONFIG,
    layout.CONFIG_HISTORY,
    layout.METRICS,
    layout.METRICS_SUPERSEDED,
    layout.PALETTE,
    layout.LOCK,
    layout.TENSORBOARD,
    layout.COMPILATION_CACHE,
    layout.COMPILE_REPORT,
    layout.record("probe"),
}
ELSEWHERE = {("igpt_jax/convert/huggingface.py", layout.CONFIG)}  # Hugging Face's save_pretrained folder


def _literals(path: Path) -> set[str]:
    """The string constants of a module's code (its docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_the_workdirs_file_names_are_spelt_in_layout_only():
    found = []
    for path in sorted((ROOT / "igpt_jax").rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        if relative == "igpt_jax/workdir/layout.py":
            continue
        found += [(relative, name) for name in _literals(path) & NAMES if (relative, name) not in ELSEWHERE]
    assert not found, f"ask igpt_jax/workdir/layout.py for these: {found}"
    assert _literals(ROOT / "igpt_jax" / "workdir" / "layout.py") | {layout.record("probe")} >= NAMES
