"""--mode=compile: the real train step compiled for a TPU topology on this CPU (libtpu), with no data set opened and
nothing written outside the workdir; a step that cannot fit ends with the verdict and status 3; topology names; the
per-layer cost extrapolation equals an unscanned compile's count."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import time

import jax
import pytest
from helpers import override, read_metrics, run_main, tiny_config

from igpt_jax import hardware, metrics
from igpt_jax.planning import compiled, mode, search
from igpt_jax.planning import report as report_lib
from igpt_jax.workdir import layout

pytest.importorskip("libtpu", reason="the compile-only planner needs libtpu (pip install igpt_jax[plan])")
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
        # slice sizes that are not powers of two: the 3-D tori in multiples of 64 chips, sides multiples of 4
        ("v5p-384", "v5p", (4, 4, 12)),
        ("v4-384", "v4", (4, 4, 12)),
        ("v5p-768", "v5p", (4, 8, 12)),
        ("v5p-17920", "v5p", (16, 20, 28)),  # a whole v5p pod, 8,960 chips
        ("v5e-256", "v5e", (16, 16)),
        ("v6e-256", "v6e", (16, 16)),
    ],
)
def test_topology_names(name, chip, shape):
    found, slice_shape = hardware.topology_shape(name)
    assert (found.name, slice_shape) == (chip, shape)


@pytest.mark.parametrize("name", ["v4-32", "v5p-32", "v5e-16", "v6e:2x4", "v5p-384"])
def test_topology_devices_are_one_per_chip(name):
    """One abstract device per chip, whatever the chip's cores (a v4 slice described per core cannot be meshed)."""
    chip, shape = hardware.topology_shape(name)
    devices = hardware.topology_devices(name)
    assert len(devices) == math.prod(shape)
    assert len({tuple(d.coords) for d in devices}) == len(devices)
    assert all(hardware.chip_of(d.device_kind) is chip for d in devices)


@pytest.mark.parametrize(
    "name, says",
    [
        ("v5p", "expected CHIP:SHAPE"),
        ("v7x-8", "expected CHIP:SHAPE"),
        ("tpu-128", "expected CHIP:SHAPE"),
        ("v5e:2x2x2", "a v5e slice has 2 dimensions"),
        ("v5p-3", "v5p slices count 2 cores a chip"),
        ("v5p-6", "3 chips is not a slice; slices hold a power of two or, on 3-D tori, a multiple of 64 chips"),
        ("v4-200", "100 chips is not a slice"),
        ("v5e-12", "12 chips is not a slice"),  # 2-D slices are powers of two only
        ("v5e-512", "512 chips; a v5e slice holds 1 to 256"),
        ("v5p-0", "0 chips; a v5p slice holds 1 to 8960"),
    ],
)
def test_bad_topology_names_say_what_is_wrong(name, says):
    with pytest.raises(hardware.TopologyError, match=re.escape(says)):
        hardware.topology_shape(name)


@pytest.mark.slow  # 27 s: --mode=compile in its own process (the report's content is checked in-process below)
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
    report = json.loads((workdir / layout.COMPILE_REPORT).read_text())
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
    assert json.loads((workdir / layout.COMPILE_REPORT).read_text())["fits"] is False


def test_the_cost_of_a_scanned_stack_is_the_unscanned_stacks():
    """XLA counts a scanned body once; the planner's 1- and 2-layer extrapolation must give what XLA counts for the
    same 4 layers unrolled."""
    devices = hardware.topology_devices("v5p:2x2x1")
    config = override(tiny_config(image_size=8), batch_size=16, model__num_layers=4, data__dataset="synthetic")
    config.model.scan_layers = True
    extrapolated = compiled.per_device_cost(compiled.target(config, devices, 1), devices, 1)
    unrolled = compiled.cost(
        compiled.compile_step(compiled.target(override(config, model__scan_layers=False), devices, 1))
    )
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
    report = json.loads((workdir / layout.COMPILE_REPORT).read_text())
    assert report["fits"] is False  # as configured
    best, worst = report["search"]
    assert (best["remat"], best["fits"], worst["remat"], worst["fits"]) == ("full", True, "none", False)
    assert best["gib_per_device"] < 16 < worst["gib_per_device"] and best["step_seconds"] > 0
    assert "search: 1 of 2 settings fit" in result.stdout
    assert "search 1/2: remat=none microbatches=1 mesh=fsdp: " in result.stderr  # each compile logged as it ends
    assert (
        "search 2/2: remat=full microbatches=1 mesh=fsdp: " in result.stderr and ", fits (compiled in " in result.stderr
    )


def test_the_search_takes_the_reports_compile_for_the_configured_setting(monkeypatch):
    """The search's setting that is the configuration itself is not compiled again (minutes for a large model): the
    report's three compiles (memory, the 1- and 2-layer costs) and one for the other setting, and the two give the
    configured setting the same memory."""
    config = override(tiny_config(image_size=8), batch_size=16, data__dataset="synthetic", model__attention="xla")
    config.compile.update(topology="v5p:2x2x1", search_remat="none,full", search_microbatches="1", search_meshes="fsdp")
    compiles = []
    compile_step = compiled.compile_step
    monkeypatch.setattr(compiled, "compile_step", lambda t: compiles.append(t.config.model.remat) or compile_step(t))
    report = report_lib.plan(config)
    devices = hardware.topology_devices("v5p:2x2x1")
    rows = {r["remat"]: r for r in search.search(config, devices, configured=report)}
    assert sorted(compiles) == ["full", "none", "none", "none"]
    assert rows["none"]["gib_per_device"] * hardware.GIB == report["bytes_per_device"]["total"]
    assert rows["full"]["gib_per_device"] != rows["none"]["gib_per_device"]


V5P_PEAK, V5P_BANDWIDTH, V5P_HBM = 459e12, 2765e9, 95 * 2**30  # Google's v5p figures: bf16 dense, HBM bytes/s, GiB


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """--mode=compile in this process on v5p:2x2x1 with XLA's own attention (which XLA costs), and the unscanned
    step's cost counted independently."""
    config = override(tiny_config(image_size=8), batch_size=64, data__dataset="synthetic", model__embed_dim=128)
    config.model.attention, config.compile.topology = "xla", "v5p:2x2x1"
    workdir = tmp_path_factory.mktemp("plan")
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        report = mode.run(config, str(workdir))
    run = {"seconds": time.perf_counter() - started, "printed": printed.getvalue()}
    devices = hardware.topology_devices("v5p:2x2x1")
    unrolled = compiled.compile_step(
        compiled.target(override(config.copy_and_resolve_references(), model__scan_layers=False), devices, 1)
    )
    memory = compiled.compile_step(compiled.target(config, devices, 1)).memory_analysis()
    return config, workdir, report, compiled.cost(unrolled), memory, run


def test_the_roofline_is_xlas_cost_against_the_chips_published_peak_and_bandwidth(planned):
    """Each of the 4 chips runs a quarter of the step: its time is the larger of XLA's FLOPs over v5p's 459 TFLOP/s
    (never less than a quarter of the analytic FLOPs) and its bytes over 2,765 GB/s (this small step: the bytes);
    MFU is the analytic FLOPs over that time at the 4 chips' peak."""
    config, _, report, (flops, bytes_accessed), _, _ = planned
    tokens = 64 * 64
    analytic = metrics.flops_per_token(config) * tokens
    assert report["tokens_per_step"] == tokens and report["analytic_flops_per_step"] == analytic
    # the 1- and 2-layer compiles extrapolated to 2 layers against the 2-layer step compiled whole: the same ops, but
    # XLA may fuse the whole step differently, which moves a few elementwise FLOPs (under 1%) and what fusions read
    # (bytes, under 5%), as test_the_cost_of_a_scanned_stack_is_the_unscanned_stacks found for 4 layers
    assert report["xla_flops_per_device"] == pytest.approx(flops, rel=0.01)
    assert report["xla_bytes_accessed_per_device"] == pytest.approx(bytes_accessed, rel=0.05)
    assert report["xla_over_analytic_flops"] == pytest.approx(4 * flops / analytic, rel=0.01)
    # the rest is the report's own float64 arithmetic on those numbers: pytest's default rel=1e-6
    compute = max(report["xla_flops_per_device"], analytic / 4)
    r = report["roofline"]
    memory = report["xla_bytes_accessed_per_device"] / V5P_BANDWIDTH
    assert r["compute_flops_per_device"] == compute and (r["bound"], compute / V5P_PEAK < memory) == ("memory", True)
    assert r["step_seconds"] == pytest.approx(memory)
    assert r["tokens_per_sec"] == pytest.approx(tokens / r["step_seconds"])
    assert r["mfu"] == pytest.approx(analytic / (r["step_seconds"] * 4 * V5P_PEAK)) and r["mfu"] <= 1


def test_the_memory_per_device_is_what_xla_allocates_and_the_chips_hbm_bounds_it(planned):
    _, workdir, report, _, memory, _ = planned
    parts = report["bytes_per_device"]
    assert (parts["argument"], parts["output"], parts["temp"]) == (
        memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes
    )  # fmt: skip
    assert parts["total"] == (
        memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes
    )  # fmt: skip  # donated arguments (the state) alias the outputs: counted once
    assert parts["alias"] > 0 and parts["hbm"] == V5P_HBM and report["fits"] is True
    assert report["mesh"] == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 1} and report["devices"] == 4
    assert json.loads((workdir / layout.COMPILE_REPORT).read_text()) == json.loads(json.dumps(report))
    (row,) = read_metrics(workdir)
    assert row["mode"] == "compile" and row["step"] == 0 and row["roofline.mfu"] == report["roofline"]["mfu"]
    assert row["mesh"] == report["mesh"] and row["bytes_per_device.total"] == parts["total"]


def test_the_report_is_printed_and_written_to_compile_json_and_one_metrics_row(planned):
    """(After the tests of the report's numbers, which the fixture's first user is credited with by mutmut.) What
    --mode=compile leaves: the table on stdout, compile.json as the report (indented for reading), and one
    metrics.jsonl row of mode compile at step 0 with the report's sections flattened (the mesh kept whole)."""
    config, workdir, report, _, _, run = planned
    assert run["printed"] == report_lib.table(report) + "\n"
    text = (workdir / layout.COMPILE_REPORT).read_text()
    assert json.loads(text) == report and text == json.dumps(report, indent=2) + "\n"
    (row,) = read_metrics(workdir)
    assert row["mode"] == "compile" and row["step"] == 0 and row["mesh"] == report["mesh"]
    assert row["roofline.mfu"] == report["roofline"]["mfu"] and "roofline" not in row
    assert row["bytes_per_device.total"] == report["bytes_per_device"]["total"]
    assert (report["chip"], report["slice_shape"], report["num_slices"]) == ("v5p", "2x2x1", 1)
    assert report["tokens_per_step"] == config.batch_size * config.model.image_size**2
    assert 0 < report["compile_seconds"] < run["seconds"]


def test_the_compute_floor_is_the_analytic_flops_with_the_remat_policys_recomputation(monkeypatch):
    """Where XLA counts less than the step runs (here: nothing), a chip's share of the analytic FLOPs is the floor:
    full remat runs the forward pass twice, 8/6 of it."""
    monkeypatch.setattr(compiled, "per_device_cost", lambda target, devices, num_slices: (0.0, 0.0))
    for remat, recompute in (("none", 1.0), ("save_dots_no_batch", 1.0), ("full", 4 / 3)):
        config = override(tiny_config(image_size=8), batch_size=16, data__dataset="synthetic", model__remat=remat)
        config.compile.topology = "v5p:2x2x1"
        report = report_lib.plan(config)
        analytic = metrics.flops_per_token(config) * 16 * 64
        assert report["roofline"]["compute_flops_per_device"] == pytest.approx(analytic * recompute / 4)
        assert report["roofline"]["bound"] == "compute"  # no bytes counted
        assert report["attention"] == "splash"  # auto, resolved for the TPU target, not this CPU


def test_a_program_the_compiler_refuses_for_memory_is_a_verdict_with_the_sizes_it_asked_for(monkeypatch, tmp_path):
    refusal = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (68.04G) "
        "exceeds available HBM (15.75G).\nmore lines"
    )

    def refuse(target):
        raise jax.errors.JaxRuntimeError(refusal)

    monkeypatch.setattr(compiled, "compile_step", refuse)
    config = override(tiny_config(image_size=8), batch_size=16, data__dataset="synthetic")
    config.compile.topology = "v5e:2x2"
    with pytest.raises(report_lib.DoesNotFit) as verdict:
        mode.run(config, str(tmp_path / "w"))
    report = json.loads((tmp_path / "w" / layout.COMPILE_REPORT).read_text())
    assert report["bytes_per_device"] == {"temp": 68.04 * 2**30, "total": 68.04 * 2**30, "hbm": 16 * 2**30}
    assert report["fits"] is False and report["compiler"] == refusal.splitlines()[0]
    assert str(verdict.value) == (
        "does not fit: 68.04 GiB per device needed (temporaries 68.04) against 16.0 GiB of HBM per device on v5e:2x2; "
        "try more microbatches (--config.microbatches), --config.model.remat=full, another mesh split or a larger "
        "topology"
    )

    def fail(target):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(compiled, "compile_step", fail)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        report_lib.plan(config)


def test_a_compile_holds_the_workdirs_lock_and_a_held_workdir_is_refused_before_compiling(tmp_path, monkeypatch):
    from igpt_jax.workdir import run_lock, storage

    planned = []
    monkeypatch.setattr(report_lib, "plan", lambda config: planned.append(config) or {"fits": True})
    monkeypatch.setattr(report_lib, "table", lambda report: "")
    holder = run_lock.RunLock(storage.path(tmp_path / "held"))
    holder.acquire()
    with pytest.raises(run_lock.WorkdirLockedError):
        mode.run(tiny_config(), str(tmp_path / "held"))
    assert not planned  # refused before minutes of compiling
    holder.release()
    mode.run(tiny_config(), str(tmp_path / "free"))
    assert len(planned) == 1 and not (tmp_path / "free" / layout.LOCK).exists()  # released after


def test_the_table_reads_the_reports_numbers():
    report = {
        "topology": "v5p:2x2x1", "devices": 4, "mesh": {"data": 1, "fsdp": 4}, "batch_size": 256,
        "microbatches": 2, "remat": "full", "attention": "splash", "fits": False,
        "bytes_per_device": {"argument": 1.5 * GIB, "output": 0.25 * GIB, "temp": 100 * GIB, "alias": 0.25 * GIB,
                             "generated_code": 0.0123 * GIB, "total": 101.5 * GIB, "hbm": 95 * GIB},
        "xla_flops_per_device": 1.5e12, "analytic_flops_per_step": 5e12, "xla_over_analytic_flops": 1.2,
        "xla_counts_attention": False,
        "roofline": {"step_seconds": 0.0125, "bound": "compute", "tokens_per_sec": 1.234e6, "mfu": 0.4567},
    }  # fmt: skip
    assert report_lib.table(report).splitlines() == [
        "topology                    v5p:2x2x1 (4 devices, mesh {'data': 1, 'fsdp': 4})",
        "step                        batch 256, 2 microbatches, remat full, attention splash",
        "argument GiB/device         1.50",
        "output GiB/device           0.25",
        "temp GiB/device             100.00",
        "alias GiB/device            0.25",
        "total GiB/device            101.50 of 95.0 HBM: DOES NOT FIT",
        "generated code GiB          0.012",
        "FLOPs/step (XLA, analytic)  6e+12, 5e+12 (x1.20, attention not costed by XLA, left out of both)",
        "roofline step               12.5 ms (compute-bound), 1.23e+06 tokens/s, MFU 45.7%",
    ]
    report["xla_counts_attention"], report["fits"] = True, True
    del report["roofline"], report["bytes_per_device"]["argument"]
    lines = report_lib.table(report).splitlines()
    assert lines[-1] == "total GiB/device   101.50 of 95.0 HBM: fits" and len(lines) == 6  # keys padded to 17


GIB = 2**30
