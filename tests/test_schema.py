"""The config schema (igpt_jax/defaults.py) is the one place a key is stated: every key of a config has an entry
with a default, a type, the values it allows (a range or a registry's names where it is a number or a name), whether
a relaunch may change it, and what it does; the checks, the resume rules and `igpt --help` read it."""

from __future__ import annotations

import dataclasses

import pytest

from igpt_jax import config_checks, defaults
from igpt_jax.workdir import resume


def _entry_problems(dotted: str, key, value) -> list[str]:
    """What an entry lacks: a default, a resume rule, a description, and a range or choices for a number."""
    out = []
    if key.default is None:
        out.append(f"{dotted}: no default")
    if key.resume not in (defaults.STEERS, defaults.RECIPE):
        out.append(f"{dotted}: resume rule {key.resume!r}")
    if not key.doc.strip():
        out.append(f"{dotted}: no description")
    if not key.allowed.described:
        out.append(f"{dotted}: allows nothing stated")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and not key.allowed.numeric:
        out.append(f"{dotted}: a number ({type(value).__name__}) with no range")
    return out


def _entries_and_values():
    config = defaults.make_config()
    return [(dotted, key, defaults.get(config, dotted)) for dotted, key in defaults.SCHEMA.items()]


def test_every_key_of_a_config_has_a_complete_schema_entry():
    config = defaults.make_config()
    flat = resume.flatten(resume.as_saved(config))
    assert [k for k in flat if defaults.key_of(k) is None] == []  # no key without an entry
    assert [d for d in defaults.SCHEMA if not any(k == d or k.startswith(f"{d}.") for k in flat)] == []
    problems = [p for dotted, key, value in _entries_and_values() for p in _entry_problems(dotted, key, value)]
    assert problems == []
    types = {dotted: type(value).__name__ for dotted, _, value in _entries_and_values()}
    assert types["model.embed_dim"] == "int" and types["optimizer.b2"] == "float" and types["data.flip"] == "bool"


@pytest.mark.parametrize(
    "change, says",
    [
        ({"doc": " "}, "no description"),
        ({"resume": "maybe"}, "resume rule 'maybe'"),
        ({"allowed": defaults.Free("anything")}, "a number (int) with no range"),
        ({"default": None}, "no default"),
    ],
)
def test_an_entry_missing_a_part_is_found(change, says):
    key = dataclasses.replace(defaults.SCHEMA["batch_size"], **change)
    assert any(says in p for p in _entry_problems("batch_size", key, 128))


def test_the_checks_and_the_resume_rules_read_the_schema(monkeypatch):
    config = defaults.make_config()
    config.model.mlp_ratio = 0
    with pytest.raises(config_checks.ConfigError, match=r"config.model.mlp_ratio=0: must be a positive integer"):
        config_checks.check(config)
    assert not resume._accepted("model.mlp_ratio") and resume._accepted("optimizer.b1")
    assert resume._accepted("mesh.ici.tensor") and resume._accepted("evals.probe.layers")  # under a whole entry
    steering = dataclasses.replace(defaults.SCHEMA["model.mlp_ratio"], resume=defaults.STEERS)
    monkeypatch.setitem(defaults.SCHEMA, "model.mlp_ratio", steering)
    assert resume._accepted("model.mlp_ratio")  # the entry decides, nothing else


def test_help_lists_every_key():
    from igpt_jax import main

    text = main.help_text()
    assert all(f"  {dotted} = " in text for dotted in defaults.SCHEMA)
    assert "model.embed_dim = (the preset's): the residual stream's width [a positive integer, fixed by the" in text
