"""Bad configs and bad CLI input are refused before anything is built, with messages naming key and allowed values."""

from __future__ import annotations

import logging as std_logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import override

from igpt_jax import config_checks, configs
from igpt_jax.configs import fashion_mnist, igpt_s

ROOT = Path(__file__).resolve().parents[1]


def _check(**overrides):
    config_checks.check(override(igpt_s.get_config(), **overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model__num_layers": -1}, r"config\.model\.num_layers=-1: must be a positive integer"),
        ({"model__embed_dim": 0}, r"config\.model\.embed_dim=0: must be a positive integer"),
        ({"batch_size": -8}, r"config\.batch_size=-8: must be a positive integer"),
        ({"model__embed_dim": 500}, r"embed_dim=500 must be a multiple of config\.model\.num_heads=8"),
        (
            {"model__image_size": 48},
            r"image_size=48 needs 2304 positions but config\.model\.num_positions=1024; "
            r"allowed: image_size\*\*2 <= num_positions",
        ),
        ({"model__remat": "some"}, r"config\.model\.remat='some' is unknown; allowed: \['none', 'full'"),
        ({"model__attention": "flash9"}, r"config\.model\.attention='flash9' is unknown; allowed: \['auto', 'xla'"),
        ({"model__dtype": "float8"}, r"config\.model\.dtype='float8' is unknown; allowed: \['float32', 'bfloat16'"),
        ({"objective": "mae"}, r"config\.objective='mae' is unknown; allowed: \['ar', 'bert'\]"),
        ({"microbatches": 3}, r"config\.batch_size=128 must be a multiple of config\.microbatches=3"),
        ({"optimizer__b2": 1.0}, r"config\.optimizer\.b2=1\.0: allowed: 0 <= b2 < 1"),
        ({"mesh__ici": {"data": -1, "fsdp": -1}}, r"config\.mesh\.ici=.*at most one axis may be -1"),
        ({"mesh__ici": {"pipeline": 2}}, r"config\.mesh\.ici has unknown axes \['pipeline'\]"),
        ({"seed": -1}, r"config\.seed=-1: allowed: an integer, 0 <= seed < 2\*\*31"),
        ({"optimizer__weight_decay": float("nan")}, r"config\.optimizer\.weight_decay=nan: allowed: >= 0"),
        ({"optimizer__grad_clip_norm": float("nan")}, r"config\.optimizer\.grad_clip_norm=nan: allowed: >= 0"),
        ({"optimizer__learning_rate": float("inf")}, r"config\.optimizer\.learning_rate=inf: allowed: > 0"),
        ({"optimizer__learning_rate": 1e39}, r"config\.optimizer\.learning_rate=1e\+39: allowed: > 0"),  # float32 inf
        ({"bert_mask_prob": float("nan")}, r"config\.bert_mask_prob=nan: allowed: 0 < p < 1"),
        ({"model__norm_eps": 0.0}, r"config\.model\.norm_eps=0\.0: allowed: > 0"),
        ({"evals__eval__examples": -5}, r"config\.evals\.eval\.examples=-5: allowed: an integer >= 0"),
        ({"data__prefetch": -1}, r"config\.data\.prefetch=-1: allowed: an integer >= 0"),
        (
            {"evals__samples__temperature": float("nan")},
            r"config\.evals\.samples\.temperature=nan: allowed: >= 0 \(0: greedy\)",
        ),
        (
            {"evals__samples__completion": 1.0},
            r"config\.evals\.samples\.completion=1\.0: allowed: 0 <= fraction of rows given < 1",
        ),
        (
            {"evals__samples__at_end": True, "objective": "bert"},
            r"config\.evals\.samples \(samples\) needs a left-to-right model, and config\.objective='bert'",
        ),
        (
            {
                "evals__samples__every_steps": 10,
                "evals__samples__num_images": 0,
                "evals__samples__completion_images": 0,
            },
            r"config\.evals\.samples\.num_images and config\.evals\.samples\.completion_images are both 0",
        ),
        (
            {"evals__probe__layers": (0, 25), "evals__probe__at_end": True},
            r"config\.evals\.probe\.layers=\(0, 25\): \[25\] outside 0 \.\. 24 \(ln_f is 24\)",
        ),
        (
            {"evals__probe__dataset": "downsampled_imagenet/32x32", "evals__probe__every_steps": 5},
            r"config\.evals\.probe \(a linear probe\) needs labels, and .* has none",
        ),
        (
            {"evals__probe__masks": 5, "evals__probe__at_end": True},
            r"config\.evals\.probe\.masks=5: an ensemble of masks needs a BERT model",
        ),
        ({"finetune__augment": "mixup"}, r"config\.finetune\.augment='mixup' is unknown; allowed: \['none', 'cifar'\]"),
        (
            {"evals__eval__kind": "fid"},
            r"config\.evals\.eval\.kind='fid' is unknown; allowed: \['loss', 'probe', 'sample'\]",
        ),
        ({"data__dataset": "imagenet"}, r"config\.data\.dataset='imagenet' is unknown; allowed: \[.*'imagenet2012'"),
        ({"restore": "opt"}, r"config\.restore='opt' is unknown; allowed: \['all', 'params'\]"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(config_checks.ConfigError, match=message):
        _check(**overrides)


def test_every_problem_is_reported_at_once():
    with pytest.raises(config_checks.ConfigError) as e:
        _check(model__num_layers=0, model__embed_dim=500)
    assert "num_layers=0" in str(e.value) and "embed_dim=500" in str(e.value)


@pytest.mark.parametrize("preset", [igpt_s, fashion_mnist])
def test_presets_pass(preset):
    config_checks.check(preset.get_config())


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("igpt: ")
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode=dance"], "--mode=dance is unknown; allowed: train, eval, probe, finetune, sample, compile"),
        (["--config.model.depth=3"], "unknown config key config.model.depth; keys under config.model: attention,"),
        (["--config.modle.num_layers=3"], "unknown config key config.modle.num_layers; keys under config: batch_size"),
        (["--config.model.num_layers=abc"], "--config.model.num_layers=abc: invalid literal for int()"),
        (["--config.model.num_layers=-2"], "bad config: config.model.num_layers=-2: must be a positive integer"),
        (["--config.model.embed_dim=100"], "embed_dim=100 must be a multiple of config.model.num_heads=8"),
        (["--config.model.image_size=64"], "image_size=64 needs 4096 positions but config.model.num_positions=1024"),
        (["--config.probe.dataset=cifar10"], "config.probe.dataset is now config.evals.probe.dataset"),
        (["--config.sample.top_k=5"], "config.sample.top_k is now config.evals.samples.top_k"),
        (["--config.eval_every_steps=5"], "config.eval_every_steps is now config.evals.eval.every_steps"),
        (
            ["--config.evals.probe.datset=x"],
            "unknown config key config.evals.probe.datset; keys under config.evals.probe",
        ),
        (
            ["--mode=sample", "--config.objective=bert"],
            "bad config: config.evals.samples (samples) needs a left-to-right",
        ),
    ],
)
def test_cli_refuses_with_one_line(args, message):
    mode = [] if any(a.startswith("--mode") for a in args) else ["--mode=train"]
    line = _one_line_error(_cli("--config=configs/igpt_s.py", "--workdir=/tmp/igpt_cli_test", *mode, *args))
    assert message in line, line


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.seed=-1", "config.seed=-1: allowed: an integer, 0 <= seed < 2**31"),
        ("--config.optimizer.weight_decay=nan", "config.optimizer.weight_decay=nan: allowed: >= 0"),
        ("--config.optimizer.grad_clip_norm=nan", "config.optimizer.grad_clip_norm=nan: allowed: >= 0"),
        ("--config.data.dataset=imagenet", "config.data.dataset='imagenet' is unknown; allowed: ["),
        # the default config's probe at the end cannot quantize Fashion-MNIST without a palette: refused before step 1
        ("--config.data.dataset=synthetic", "config.evals.probe (a linear probe) needs a palette to turn the images"),
    ],
)
def test_bad_values_stop_before_anything_is_written(tmp_path, flag, message):
    workdir = tmp_path / "run"
    line = _one_line_error(_cli("--config=configs/fashion_mnist.py", f"--workdir={workdir}", flag))
    assert line.startswith("igpt: bad config: ") and message in line, line
    assert not workdir.exists()


def test_cli_refuses_missing_config_file():
    line = _one_line_error(_cli("--config=configs/nope.py", "--workdir=/tmp/x"))
    assert "No such file or directory: 'configs/nope.py'" in line, line


def test_cli_refuses_bad_config_argument():
    line = _one_line_error(_cli("--config=configs/igpt_s.py:size=3", "--workdir=/tmp/x"))
    assert "config argument 'size' is unknown; allowed: ['image_size']" in line, line


def test_a_preset_is_named_by_its_short_name_in_either_flag_form_and_a_path_is_left_as_given():
    from igpt_jax import main

    assert configs.names() == ["fashion_mnist", "igpt_l", "igpt_m", "igpt_s", "igpt_xl"]
    argv = ["igpt", "--config=igpt_l:48", "--mode=train", "--config", "igpt_s", "--config=mine.py:3", "--config=nope"]
    assert main.with_preset_paths(argv) == [
        "igpt",
        f"--config={configs.FOLDER / 'igpt_l.py'}:48",
        "--mode=train",
        "--config",
        str(configs.FOLDER / "igpt_s.py"),
        "--config=mine.py:3",
        "--config=nope",
    ]


def test_a_preset_named_by_its_short_name_is_read_from_any_directory(tmp_path):
    """The same one-line refusal as the file's path gives: the preset was found and loaded, from outside a checkout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", "--config=igpt_s:size=3", "--workdir=x"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "config argument 'size' is unknown; allowed: ['image_size']" in _one_line_error(result)


# Parses one of --help's examples as igpt would and checks its config, without running the mode.
CHECK_EXAMPLE = """
import sys
from igpt_jax import config_checks, main
main.parse_flags(["igpt", *sys.argv[1:]])
config_checks.check(main._CONFIG.value, main._MODE.value)
"""


def test_help_exits_0_with_the_modes_presets_flags_and_examples_that_parse(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    from igpt_jax import main

    lines = result.stdout.splitlines()
    for name, mode in main.MODES.items():
        assert f"  {name:<10}{mode.summary}" in lines
    assert any(line.startswith("presets (--config): fashion_mnist, igpt_l, igpt_m, igpt_s, igpt_xl") for line in lines)
    for flag in ("--config", "--workdir", "--mode", "--coordinator_address", "--num_processes", "--process_id"):
        assert any(line.startswith(f"  {flag}:") for line in lines), flag
    examples = [line.split()[1:] for line in lines if line.startswith("  igpt ")]
    assert len(examples) == 3 and any(a.startswith("--config.") for a in examples[1])
    for example in examples:
        checked = subprocess.run(
            [sys.executable, "-c", CHECK_EXAMPLE, *example], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert checked.returncode == 0, (example, checked.stderr[-2000:])


@pytest.mark.parametrize(
    "pathname, message",
    [
        ("site-packages/orbax/checkpoint/_src/futures/future.py", "_SignalingThread.run() raised an exception: x"),
        # an Orbax write still in flight when a failed save was abandoned, reported by asyncio when collected
        ("lib/python3.11/asyncio/base_events.py", "Task exception was never retrieved\nfuture: <Task finished>"),
    ],
)
def test_a_librarys_error_with_its_traceback_reaches_the_terminal_as_one_line(pathname, message):
    """The terminal of a failed save shows igpt's one line with the cause; a library's own report of the same failure
    is kept to one line, not a traceback into site-packages."""
    from igpt_jax import main

    try:
        raise ValueError("RESOURCE_EXHAUSTED: No space left on device")
    except ValueError:
        exc_info = sys.exc_info()
    record = std_logging.LogRecord("lib", std_logging.ERROR, pathname, 1, message, (), exc_info)
    assert main._QuietLibraries().filter(record)
    printed = std_logging.Formatter().format(record)
    assert printed == f"{message.splitlines()[0]} (ValueError)"
