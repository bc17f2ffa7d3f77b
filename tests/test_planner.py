"""--mode=compile: the real train step compiled for a TPU topology on this CPU (libtpu), with no data set opened and
nothing written outside the workdir; a step that cannot fit ends with the verdict and status 3; topology names; the
per-layer cost extrapolation equals an unscanned compile's count."""

from __future__ import annotations

import json
import math
import os

import pytest
from helpers import override, read_metrics, run_main, tiny_config

from igpt_jax import hardware, planner

pytest.importorskip("libtpu", reason="the compile-only planner needs libtpu (pip install igpt_jax[tpu])")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


@pytest.mark.parametrize(
    "name, chip, shape",
    [
        ("v5p:2x2x1", "v5p", (2, 2, 1)),
        ("v5p-128", "v5p", (4, 4, 4)),  # v5p counts two cores a chip: 64 chips
        ("v5p-256", "v5p", (4, 4, 8)),
        ("v4-8", "v4", (2, 2, 1)),
        ("v5e-16", "v5e", (4, 4)),
        ("v6e:2x4", "v6e", (2, 4)),
    ],
)
def test_topology_names(name, chip, shape):
    found, slice_shape = hardware.topology_shape(name)
    assert (found.name, slice_shape) == (chip, shape)


@pytest.mark.parametrize("name", ["v4-32", "v5p-32", "v5e-16", "v6e:2x4"])
def test_topology_devices_are_one_per_chip(name):
    """One abstract device per chip, whatever the chip's cores (a v4 slice described per core cannot be meshed)."""
    chip, shape = hardware.topology_shape(name)
    devices = hardware.topology_devices(name)
    assert len(devices) == math.prod(shape)
    assert len({tuple(d.coords) for d in devices}) == len(devices)
    assert all(hardware.chip_of(d.device_kind) is chip for d in devices)


@pytest.mark.parametrize("name", ["v5p", "v7x-8", "v5e:2x2x2", "v5p-6", "tpu-128"])
def test_bad_topology_names_say_what_is_allowed(name):
    with pytest.raises(hardware.TopologyError, match="expected CHIP:SHAPE|dimensions|power-of-two|cores a chip"):
        hardware.topology_shape(name)


def test_a_small_model_fits_v5p_2x2x1_without_opening_its_data(tmp_path):
    missing = tmp_path / "no_such_data_dir"
    workdir = tmp_path / "w"
    result = run_main(
        "--mode=compile",
        "--config=configs/fashion_mnist.py",
        f"--workdir={workdir}",
        "--config.compile.topology=v5p:2x2x1",
        f"--config.data.data_dir={missing}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((workdir / planner.COMPILE_JSON).read_text())
    assert report["fits"] and report["devices"] == 4
    assert report["mesh"] == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 1}
    memory = report["bytes_per_device"]
    assert set(memory) == {"argument", "output", "temp", "alias", "generated_code", "total", "hbm"}
    assert 0 < memory["total"] < memory["hbm"] == 95 * 2**30
    assert memory["argument"] > 4 * 800_000 / 4  # fp32 params + Adam, sharded 4 ways, at least the params' share
    assert report["xla_flops_per_device"] > 0 and report["analytic_flops_per_step"] > 0
    # auto attention is chosen for the target (TPU: splash), not this CPU host; its Pallas kernel is a custom call
    # that XLA does not cost, so XLA's count is compared with the analytic FLOPs outside attention
    assert report["attention"] == "splash" and report["xla_counts_attention"] is False
    assert 0.8 < report["xla_over_analytic_flops"] < 2.0
    roofline = report["roofline"]
    assert roofline["step_seconds"] > 0 and 0 < roofline["mfu"] <= 1 and roofline["bound"] in ("compute", "memory")
    # each of the 4 chips does a quarter of the step's work: between the analytic FLOPs and that with full remat's
    # second forward pass (4/3) and XLA's over-count above (< 2)
    shares = roofline["compute_flops_per_device"] * report["devices"] / report["analytic_flops_per_step"]
    assert 1.0 <= shares < 2.0
    assert "total GiB/device" in result.stdout and "fits" in result.stdout
    (row,) = read_metrics(workdir)
    assert row["mode"] == "compile" and row["fits"] is True
    assert not missing.exists()  # no data set was opened or prepared
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # nothing written outside the workdir


def _compile_mode(workdir, *flags: str):
    """--mode=compile of the Fashion-MNIST config on v5e:2x2 with `flags`."""
    base = ["--mode=compile", "--config=configs/fashion_mnist.py", f"--workdir={workdir}"]
    return run_main(*base, "--config.compile.topology=v5e:2x2", *flags)


def test_a_batch_far_too_large_exits_3_with_the_verdict(tmp_path):
    workdir = tmp_path / "w"
    result = _compile_mode(workdir, "--config.batch_size=16384")
    assert result.returncode == 3, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("igpt: does not fit: ") and "GiB of HBM per device on v5e:2x2" in last, last
    assert "Traceback" not in result.stderr
    assert json.loads((workdir / planner.COMPILE_JSON).read_text())["fits"] is False


def test_the_cost_of_a_scanned_stack_is_the_unscanned_stacks():
    """XLA counts a scanned body once; the planner's 1- and 2-layer extrapolation must give what XLA counts for the
    same 4 layers unrolled."""
    devices = hardware.topology_devices("v5p:2x2x1")
    config = override(tiny_config(image_size=8), batch_size=16, model__num_layers=4, data__dataset="synthetic")
    config.model.scan_layers = True
    extrapolated = planner.per_device_cost(config, devices, 1)
    unrolled = planner._cost(planner._compile(override(config, model__scan_layers=False), devices, 1)[0])
    assert extrapolated[0] == pytest.approx(unrolled[0], rel=0.01)
    assert extrapolated[1] == pytest.approx(unrolled[1], rel=0.05)


@pytest.mark.slow  # about a minute: four compiles
def test_the_search_finds_the_remat_policy_that_makes_it_fit(tmp_path):
    """At batch 512 on v5e:2x2 with xla attention ([S, S] scores) the configured step (no remat) needs about 17 GiB
    of 16; full remat fits. (With splash, the TPU default, the same step needs 10.5 GiB.)"""
    workdir = tmp_path / "w"
    result = _compile_mode(
        workdir,
        "--config.batch_size=512",
        "--config.model.attention=xla",
        "--config.compile.search=True",
        "--config.compile.search_remat=none,full",
        "--config.compile.search_microbatches=1",
        "--config.compile.search_meshes=fsdp",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((workdir / planner.COMPILE_JSON).read_text())
    assert report["fits"] is False  # as configured
    best, worst = report["search"]
    assert (best["remat"], best["fits"], worst["remat"], worst["fits"]) == ("full", True, "none", False)
    assert best["gib_per_device"] < 16 < worst["gib_per_device"] and best["step_seconds"] > 0
    assert "search: 1 of 2 settings fit" in result.stdout
