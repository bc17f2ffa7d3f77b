"""The package as a user installs it: a wheel in a fresh environment outside the checkout trains a preset named by
its short name from another directory, and its requirements take the JAX an accelerator image already has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import TFDS_TEST_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from this checkout (with the build tools this environment has: no download)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("igpt_jax-*.whl")
    return built


def _fresh_venv(where: Path) -> Path:
    """A new virtual environment whose only igpt_jax is what gets installed into it; the test environment's
    libraries are reachable through a .pth line (its site folder's own .pth files, among them the editable install
    of this checkout, are not read from there), so nothing is downloaded."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    (_site(python) / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _site(python: Path) -> Path:
    """The environment's own site folder."""
    where = [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    return Path(subprocess.run(where, check=True, capture_output=True, text=True).stdout.strip())


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    # the test environment's pip, run by the fresh environment's interpreter (venv --without-pip has none of its own)
    return subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, cwd="/")


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")} | {"JAX_PLATFORMS": "cpu"}


@pytest.mark.slow
def test_an_installed_wheel_trains_a_preset_named_by_its_short_name_from_another_directory(wheel, tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    installed = _pip(python, "install", "--no-deps", "--no-index", "-q", str(wheel))
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import igpt_jax, igpt_jax.configs; print(igpt_jax.__file__)"],
        cwd=elsewhere,
        env=_clean_environment(),
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    assert str(tmp_path / "venv") in where.stdout  # the wheel's copy, not this checkout's
    run = subprocess.run(
        [
            str(tmp_path / "venv" / "bin" / "igpt"),
            "--config=fashion_mnist:8",
            "--workdir=run",
            "--config.model.num_layers=1",
            "--config.model.embed_dim=16",
            "--config.batch_size=8",
            "--config.total_steps=3",
            "--config.log_every_steps=1",
            "--config.evals.eval.every_steps=0",
            "--config.evals.probe.at_end=False",
            "--config.evals.samples.at_end=False",
            f"--config.data.data_dir={TFDS_TEST_DIR}",
        ],
        cwd=elsewhere,
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "mode" not in r] == [1, 2, 3]  # the training rows
    assert (elsewhere / "run" / "checkpoints" / "3").is_dir()


def _fake_installed(site: Path, name: str, version: str) -> None:
    """What pip reads of an installed distribution: its metadata."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


@pytest.mark.slow
def test_installing_the_wheel_keeps_a_newer_jax_the_host_has(wheel, tmp_path):
    """An H200 image's JAX 0.11.2 (newer than any this registry serves): pip, offline, must find the wheel's
    requirements met by it and install nothing else; a pin (jax==0.10.2) would need a download, so fails here."""
    python = _fresh_venv(tmp_path / "venv")
    site = _site(python)
    for name, version in {"jax": "0.11.2", "jaxlib": "0.11.2", "flax": "0.13.0", "optax": "0.3.0"}.items():
        _fake_installed(site, name, version)
    report = tmp_path / "report.json"
    resolved = _pip(python, "install", "--dry-run", "--no-index", "--report", str(report), "-q", str(wheel))
    assert resolved.returncode == 0, resolved.stderr
    to_install = {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}
    assert to_install == {"igpt_jax"}
