"""Every command the README and docs/ show is run by a test, from the docs' own text (tests/docs_commands.py), so none
rots: a renamed flag, preset or config key fails here, not in a reader's terminal.

A test may append flags that shrink a command to a test's size (fewer steps and images, the test data folder); flags
given later win, so what runs is the docs' command as written, then the test's sizes. Commands that train or compile
for longer than CI can give (hours of mutants, a 15-minute planner search, iGPT-L/XL compiled for 64 TPU chips) are
parsed and their config checked here, as igpt would before running them (RUN_BY says which).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from docs_commands import (
    ROOT,
    DocCommand,
    activated_env,
    all_commands,
    checkout_like,
    command,
    commands,
    igpt_arguments,
    run_doc,
)
from helpers import TFDS_TEST_DIR, read_metrics

# For each command of the docs, by a piece of its text that sets it apart: what runs it.
RUN_BY: dict[str, str] = {
    ".venv/bin/python -m pytest": ".ci/run",  # CI runs the README's test command exactly as written
    "setup_local.sh && .venv/bin/igpt --config=fashion_mnist": "test_docs.py::test_the_fashion_mnist_walk_through",
    "--config.total_steps=1000": "test_docs.py::test_the_fashion_mnist_walk_through",
    "--mode=probe --config=configs/fashion_mnist.py": "test_docs.py::test_the_fashion_mnist_walk_through",
    "--mode=finetune --config=configs/fashion_mnist.py": "test_docs.py::test_the_fashion_mnist_walk_through",
    "--mode=sample --config=configs/fashion_mnist.py": "test_docs.py::test_the_fashion_mnist_walk_through",
    "--to=huggingface": "test_docs.py::test_the_fashion_mnist_walk_through",
    "launch/local.sh 2": "test_multihost.py::test_local_sh_runs_the_default_config",
    "launch/tpu_pod.sh": "test_docs.py::test_the_pod_commands_call_gcloud_as_the_docs_say",
    "sbatch --nodes=4": "test_docs.py::test_the_slurm_command_submits_one_process_per_host",
    'pip install "./igpt_jax[': "test_docs.py::test_the_install_commands_resolve_their_extras",
    'pip install -e ".[mutation]"': "test_docs.py::test_the_install_commands_resolve_their_extras",
    "--mode=compile": "test_docs.py::test_every_igpt_command_parses_and_its_config_passes_the_checks",
    "benchmarks/train_speed.py": "test_docs.py::test_the_speed_benchmark_commands_print_their_json",
    "benchmarks/accelerator.py": "test_docs.py::test_the_accelerator_benchmark_runs_quick_without_tensorflow",
    "tools/mutation_score.py igpt_jax/": "test_docs.py::test_the_mutation_commands_measure_a_module",
    "tools/mutation_score.py --all": "test_docs.py::test_every_command_in_the_docs_is_run_by_a_test",
    "igpt_jax.convert --from=openai": "test_convert.py::test_openais_weights_walk_through",
    "--workdir=workdir/openai_s": "test_convert.py::test_openais_published_loss_walk_through",
    "igpt_jax.data.prepare --images=my_photos": "test_docs.py::test_your_own_images_walk_through",
    "--config.profile.start_step=2": "test_docs.py::test_the_readmes_profile_of_the_default_model",
    "--workdir=workdir/my_photos": "test_docs.py::test_your_own_images_walk_through",
    "--config=configs/igpt_s.py --workdir=workdir/igpt_s": "test_convert.py::test_openais_weights_walk_through",
    "--src=imagegpt-small": "test_convert.py::test_a_hugging_face_folder_imports_as_the_docs_say",
}


def test_every_command_in_the_docs_is_run_by_a_test():
    """Each command is claimed by one RUN_BY entry, and the test named there takes the command from the docs by that
    text. `mutation_score.py --all` (hours) is checked here to parse as its tool reads it."""
    found = all_commands()
    assert len(found) > 30, "the docs' bash blocks were not found"
    for doc in found:
        claims = [key for key in RUN_BY if key in doc.text]
        assert len(claims) == 1, f"{doc}\nis claimed by {claims or 'no entry of RUN_BY'}: name the test that runs it"
    for key, runner in RUN_BY.items():
        assert commands(key), f"RUN_BY names {key!r}, which no command of the docs contains"
        path, _, test = runner.partition("::")
        source = (ROOT / (path if path.startswith(".") else f"tests/{path}")).read_text()
        if test:
            assert f"def {test}(" in source, f"{runner} does not exist"
            if "RUN_BY: dict" in source:  # this file: RUN_BY's own lines name every key
                source = source[: source.index("RUN_BY: dict")] + source[source.index("\n}\n") :]
            literals = (f'"{key}"', f"'{key}'")
            assert any(text in source for text in literals), f"{runner} does not take {key!r} from the docs"
        else:
            assert "<!-- test command -->" in source, f"{runner} does not run the README's test command"
    sys.path.insert(0, str(ROOT / "tools"))
    import mutation_score

    every = command("tools/mutation_score.py --all").argv()
    assert mutation_score.arguments(every[2:]).all


# Parses each argument list as igpt does and checks its config for its mode, as main() does before JAX loads.
CHECK_ALL = """
import json, sys
from absl import flags
from igpt_jax import config_checks, main
for argv in json.loads(sys.argv[1]):
    if flags.FLAGS.is_parsed():
        flags.FLAGS.unparse_flags()
    for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)  # the overrides the last command defined
    print("checking", *argv, file=sys.stderr, flush=True)
    sys.argv = ["igpt", *argv]  # ml_collections finds --config.KEY=VALUE overrides in sys.argv
    main.parse_flags(sys.argv)
    config_checks.check(main._CONFIG.value, main._MODE.value)
    print(json.dumps([main._MODE.value, main._CONFIG.value.model.num_layers]))
"""


def test_every_igpt_command_parses_and_its_config_passes_the_checks(tmp_path):
    """All of them, the ones other tests run included: the preset, every --config.KEY and its value, the mode. The
    --mode=compile commands are run no further (iGPT-L and -XL compiled for 16 to 64 TPU chips take minutes each on
    2 cores, the search 15 minutes; tests/test_planner.py compiles small ones through the same code). They are
    checked where the README's data set of one's own images is prepared, as a reader's would be."""
    runs = {str(doc): args for doc in all_commands() if (args := igpt_arguments(doc)) is not None}
    assert len(runs) >= 15
    here = checkout_like(tmp_path / "checkout")
    _photos(here / "my_photos", per_class=10)
    _ok(run_doc(command("igpt_jax.data.prepare --images=my_photos"), here, env=activated_env()))
    result = subprocess.run(
        [sys.executable, "-c", CHECK_ALL, json.dumps(list(runs.values()))],
        cwd=here, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    checked = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(checked) == len(runs)
    compiles = commands("--mode=compile")
    assert len(compiles) >= 5 and all(str(doc) in runs for doc in compiles)
    assert ["compile", 48] in checked  # iGPT-L's 48 layers: the planning commands' preset was loaded


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.args, result.stdout[-2000:], result.stderr[-3000:])
    return result.stdout


def _fake(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(script)
    (bin_dir / name).chmod(0o755)


# gcloud as the pod script calls it, recorded (one call per line) instead of reaching Google Cloud.
RECORDING_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$GCLOUD_CALLS"
"""


def test_the_pod_commands_call_gcloud_as_the_docs_say(tmp_path):
    """create, setup, run, status, logs --follow, stop, in the docs' order, against a gcloud that records its calls
    (tests/test_tpu_pod_launch.py runs a worker's side for real: run returns, training goes on, stop saves)."""
    _fake(tmp_path / "bin", "gcloud", RECORDING_GCLOUD)
    calls = tmp_path / "calls.txt"
    env = dict(
        os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", GCLOUD_CALLS=str(calls), TMPDIR=str(tmp_path)
    )
    pod = commands("launch/tpu_pod.sh")
    assert [doc.argv()[1] for doc in pod] == ["create", "setup", "run", "status", "logs", "stop"]
    made = {}
    for doc in pod:
        before = calls.read_text().splitlines() if calls.exists() else []
        _ok(run_doc(doc, ROOT, env=env, timeout=120))
        made[doc.argv()[1]] = calls.read_text().splitlines()[len(before) :]
    worker_flags = " ".join(igpt_arguments(command("launch/tpu_pod.sh run")))
    assert made["create"] == [
        "compute tpus tpu-vm create igpt-l --zone=us-east5-a --accelerator-type=v5p-128 --version=v2-alpha-tpuv5"
    ]
    assert made["setup"][0].startswith("compute tpus tpu-vm scp --zone=us-east5-a --worker=all ")
    assert "pip install -q -c constraints.txt -e '.[tpu]'" in made["setup"][1]
    assert made["run"] == [
        f"compute tpus tpu-vm ssh igpt-l --zone=us-east5-a --worker=all --command=cd ~/igpt_jax && bash "
        f"launch/tpu_worker.sh run {worker_flags} "
    ]
    assert made["status"][0].endswith("--worker=all --command=cd ~/igpt_jax && bash launch/tpu_worker.sh status")
    assert "--worker=0 --command=tail -n 50 -F ~/igpt_logs/$(hostname).log" in made["logs"][0]
    assert made["stop"][0].endswith("bash launch/tpu_worker.sh stop")


# sbatch as SLURM would take the script: its own options first, then the script and its arguments (which the script
# is asked to print as the srun command it would run, as its header says).
FAKE_SBATCH = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do echo "sbatch option $1"; shift; done
script="$1"; shift
DRY_RUN=1 exec bash "$script" "$@"
"""


def test_the_slurm_command_submits_one_process_per_host(tmp_path):
    _fake(tmp_path / "bin", "sbatch", FAKE_SBATCH)
    doc = command("sbatch --nodes=4")
    out = _ok(run_doc(doc, ROOT, env=dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")))
    assert "sbatch option --nodes=4" in out
    srun = out.splitlines()[-1]
    assert srun.startswith("srun --kill-on-bad-exit=1 ") and "-m igpt_jax.main " in srun
    assert srun.split("igpt_jax.main ")[1].split() == list(igpt_arguments(doc))


# The README's default run cut to a test's size: 8x8 images and width 32 (the later commands take the model's shape
# from its checkpoint), 2 steps, and each evaluator on a few images.
TRAIN_SIZES = (
    "--config.model.image_size=8",
    "--config.model.num_positions=64",
    "--config.model.embed_dim=32",
    "--config.total_steps=2",
    "--config.log_every_steps=1",
    "--config.evals.eval.examples=64",
    "--config.evals.probe.train_examples=64",
    "--config.evals.probe.test_examples=32",
    "--config.evals.probe.baselines=False",
    "--config.evals.samples.num_images=2",
    "--config.evals.samples.completion_images=1",
    "--config.evals.samples.completions_per_image=2",
    f"--config.data.data_dir={TFDS_TEST_DIR}",
)
# The docs' probe draws 100 labels per class (1,000 images) from the train images before the held-out end: 1,400 train
# images hold that many of every class; one draw of each, one epoch of the attentive probe.
PROBE_SIZES = (
    "--config.evals.probe.train_examples=1400",
    "--config.evals.probe.test_examples=100",
    "--config.evals.probe.baselines=False",
    "--config.evals.probe.draws=1",
    "--config.evals.probe.attentive_epochs=1",
    f"--config.data.data_dir={TFDS_TEST_DIR}",
)
FINETUNE_SIZES = (
    "--config.finetune.steps=4",
    "--config.finetune.warmup_steps=1",
    "--config.finetune.eval_every_steps=2",
    "--config.finetune.checkpoint_every_steps=2",
    "--config.finetune.heldout_examples=64",
    "--config.finetune.test_examples=64",
    f"--config.data.data_dir={TFDS_TEST_DIR}",
)
SAMPLE_SIZES = TRAIN_SIZES[9:]


@pytest.mark.slow  # about 3 minutes: the default run, then every mode the docs show on its workdir
def test_the_fashion_mnist_walk_through(tmp_path):
    """The README's main command (its igpt part: setup_local.sh runs before every test run, in the README's test
    command), then the docs' probe, fine-tuning, sampling and export commands on the workdir it leaves."""
    here = checkout_like(tmp_path / "checkout")
    workdir = here / "workdir" / "fashion_mnist"
    env = activated_env()
    readme = command("setup_local.sh && .venv/bin/igpt --config=fashion_mnist")
    setup, _, train = readme.text.partition(" && ")
    assert setup == "bash launch/setup_local.sh"
    _ok(run_doc(DocCommand(readme.page, readme.line, train), here, *TRAIN_SIZES, env=env))
    assert [r["step"] for r in read_metrics(workdir) if "mode" not in r] == [1, 2]
    assert json.loads((workdir / "probe.json").read_text())["checkpoint_step"] == 2
    assert (workdir / "samples" / "step_00000002_completions.png").exists()

    _ok(run_doc(command("--mode=probe --config=configs/fashion_mnist.py"), here, *PROBE_SIZES, env=env))
    probe = json.loads((workdir / "probe.json").read_text())
    assert probe["concat"]["layers"] == [0, 1, 2, 3, 4]
    assert sorted(probe["low_data"]) == ["100", "25", "4"], probe["low_data"].keys()
    assert "0" in json.dumps(probe["attentive"])

    finetune = _ok(
        run_doc(command("--mode=finetune --config=configs/fashion_mnist.py"), here, *FINETUNE_SIZES, env=env)
    )
    assert "finetune: test accuracy " in finetune and " on 64 fashion_mnist test images with step " in finetune

    for doc in commands("--mode=sample --config=configs/fashion_mnist.py"):
        (workdir / "samples" / "step_00000002.png").unlink()
        _ok(run_doc(doc, here, *SAMPLE_SIZES, env=env))
        assert (workdir / "samples" / "step_00000002.png").exists(), doc

    _ok(run_doc(command("--to=huggingface"), here, env=env))
    exported = json.loads((here / "exported" / "config.json").read_text())
    assert (exported["n_layer"], exported["n_embd"], exported["n_positions"]) == (4, 32, 64)

    # the README picture's longer run, at the test's size: its samples at the end and no probe
    longer = here / "workdir" / "fashion_mnist_1000"
    _ok(run_doc(command("--config.total_steps=1000"), here, *TRAIN_SIZES, env=env))
    assert (longer / "samples" / "step_00000002_completions.png").exists() and not (longer / "probe.json").exists()


def _photos(folder: Path, per_class: int, jpegs: int = 2) -> None:
    """A reader's folder of photos: class folders cat/ and dog/ of mixed sizes and formats (`jpegs` JPEGs in cat/,
    the rest PNG and WebP), and one JPEG cut short in dog/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, colour in {"cat": (200, 60, 40), "dog": (40, 60, 200)}.items():
        (folder / label).mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(16, 48, size=2))
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            suffix = "jpg" if label == "cat" and i < jpegs else ("png", "webp")[i % 2]
            Image.fromarray(pixels).save(folder / label / f"{i:03d}.{suffix}")
    whole = folder / "dog" / "000.png"
    Image.open(whole).convert("RGB").save(folder / "dog" / "cut.jpg")
    (folder / "dog" / "cut.jpg").write_bytes((folder / "dog" / "cut.jpg").read_bytes()[:200])


# The README's own-images commands at a test's size: iGPT-S's shape cut to 2 layers of width 32 at 8x8 with 16
# colours, 2 steps; the probe and the samples on the few images there are.
OWN_SIZES = (
    "--config.model.num_layers=2",
    "--config.model.embed_dim=32",
    "--config.model.num_heads=4",
    "--config.model.image_size=8",
    "--config.model.num_positions=64",
    "--config.model.vocab_size=16",
    "--config.batch_size=8",
    "--config.total_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.log_every_steps=1",
)
OWN_MODE_SIZES = (
    "--config.evals.probe.baselines=False",
    "--config.evals.samples.num_images=0",
    "--config.evals.samples.completions_per_image=2",
)


@pytest.mark.slow  # about a minute: a preparation, a run and two modes, each its own process
def test_your_own_images_walk_through(tmp_path):
    """The README's folder of one's own photos: prepared (the file cut short named and skipped), trained on, probed
    with its folders' labels, and two of its files completed."""
    here = checkout_like(tmp_path / "checkout")
    _photos(here / "my_photos", per_class=30)
    env = activated_env()
    prepare = command("igpt_jax.data.prepare --images=my_photos")
    prepared = _ok(run_doc(prepare, here, "--heldout_fraction=0.25", env=env))
    assert "train 45, heldout 15 images, 2 classes; 1 skipped" in prepared, prepared
    workdir = here / "workdir" / "my_photos"
    train, probe, sample = commands("--workdir=workdir/my_photos")
    _ok(run_doc(train, here, *OWN_SIZES, env=env))
    assert [r["step"] for r in read_metrics(workdir) if r.get("mode") == "eval"] == [2]  # at the end, on heldout

    _ok(run_doc(probe, here, *OWN_MODE_SIZES, env=env))
    record = json.loads((workdir / "probe.json").read_text())
    assert (record["dataset"], record["train_examples"], record["test_examples"]) == ("my_photos", 45, 15)

    _ok(run_doc(sample, here, *OWN_MODE_SIZES, env=env))
    from PIL import Image

    grid = Image.open(workdir / "samples" / "step_00000002_completions.png")
    cell = (grid.size[0] - 2) // 4  # given | 2 completions | the file itself
    assert grid.size == (4 * cell + 2, 2 * cell + 2), grid.size  # the two JPEGs of cat/, one row each


@pytest.mark.slow  # about a minute: 4 steps of the default model (784 tokens, width 128) and its held-out loss
def test_the_readmes_profile_of_the_default_model(tmp_path):
    """The README's command as written (the test data folder added): steps 2 to 4 traced, each marked, in the file
    the README names, read back by JAX's reader of XProf's files."""
    import jax

    here = checkout_like(tmp_path / "checkout")
    _ok(run_doc(command("--config.profile.start_step=2"), here, f"--config.data.data_dir={TFDS_TEST_DIR}"))
    (trace,) = (here / "workdir" / "profiled" / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb")
    data = jax.profiler.ProfileData.from_file(str(trace))
    marked = {
        dict(e.stats)["step_num"] for p in data.planes for line in p.lines for e in line.events if e.name == "train"
    }
    assert marked == {2, 3, 4}


def _normalized(name: str) -> str:
    """A distribution's name as the package index compares names (PEP 503): tensorflow_cpu is tensorflow-cpu."""
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.slow  # about a minute: pip resolves each extra against the package index (metadata only)
def test_the_install_commands_resolve_their_extras(tmp_path):
    """docs/install.md's `pip install "./igpt_jax[EXTRA]"` from the folder above a checkout, and docs/testing.md's
    editable install, as pip dry runs of everything they would install (nothing is installed): each extra brings what
    it is for."""
    (tmp_path / "igpt_jax").symlink_to(ROOT)
    brings = {
        "[tpu]": "libtpu",
        "[cuda13]": "jax-cuda13-plugin",
        "[data]": "tensorflow-cpu",
        "[mutation]": "mutmut",
    }
    docs = [*commands('pip install "./igpt_jax['), command('pip install -e ".[mutation]"')]
    assert len(docs) == len(brings)
    for doc in docs:
        cwd = ROOT if "-e" in doc.argv() else tmp_path
        report = tmp_path / "report.json"
        dry = ("--dry-run", "--ignore-installed", "--no-build-isolation", "--quiet", f"--report={report}")
        result = run_doc(doc, cwd, *dry, env=activated_env(), timeout=600)
        assert result.returncode == 0, (doc.text, result.stderr[-3000:])
        names = {_normalized(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
        extra = next(extra for extra in brings if extra in doc.text)
        assert {"igpt-jax", "jax", "flax", brings[extra]} <= names, (doc.text, sorted(names))


@pytest.mark.slow  # about a minute: both timed against Hugging Face's PyTorch model, at a test's size
def test_the_speed_benchmark_commands_print_their_json(tmp_path):
    """docs/speed.md's commands, then a test's size: one round of one step at 8x8."""
    here = checkout_like(tmp_path / "checkout")
    for doc in commands("benchmarks/train_speed.py"):
        out = tmp_path / "speed.json"
        _ok(run_doc(doc, here, "--rounds", "1", "--steps", "1", "--side", "8", "--out", str(out), env=activated_env()))
        result = json.loads(out.read_text())
        assert result["model"]["side"] == 8 and result["rounds"] == 1, result
        assert min(result["tokens_per_sec_median"].values()) > 0 and result["ratio_ours_over_hugging_face"] > 0


@pytest.mark.slow  # about a minute: two small models' steps per kernel, attention at two lengths, sampling both ways
def test_the_accelerator_benchmark_runs_quick_without_tensorflow(tmp_path):
    """docs/speed.md's command with --quick, where TensorFlow, TFDS and tensorboardX cannot be imported (as on a GPU
    host's own image): every field is there, for every kernel this CPU offers."""
    here = checkout_like(tmp_path / "checkout")
    blocked = tmp_path / "blocked"
    for name in ("tensorflow", "tensorflow_datasets", "tensorboardX"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this host')\n")
    env = activated_env(PYTHONPATH=str(blocked))
    out = tmp_path / "accelerator.json"
    _ok(run_doc(command("benchmarks/accelerator.py"), here, "--quick", "--out", str(out), env=env))
    result = json.loads(out.read_text())
    assert result["quick"] and result["complete"] and result["parts"] == ["train", "attention", "sampling"]
    assert result["device"]["platform"] == "cpu" and result["kernels"] == ["xla", "blockwise"]
    assert [(r["model"].split()[0], r["kernel"]) for r in result["train"]] == [
        (model, kernel) for model in ("igpt_s", "igpt_m") for kernel in ("xla", "blockwise")
    ]
    assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 and r["first_step_seconds"] > 0 for r in result["train"])
    attention = result["attention"]
    assert all(isinstance(ms, float) for times in attention["ms"].values() for ms in times.values()), attention
    assert attention["auto_rows"][-1][0] is None and {k for _, k in attention["auto_rows"]} <= {"xla", "blockwise"}
    sampling = result["sampling"]
    assert min(sampling["images_per_sec"].values()) > 0 and sampling["ratio_ours_over_hugging_face"] > 0
    assert (here / "accelerator.md").read_text().startswith("cpu x 1 (cpu)")


def _accelerator_benchmark(monkeypatch):
    spec = importlib.util.spec_from_file_location("accelerator_benchmark", ROOT / "benchmarks" / "accelerator.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_an_accelerator_run_cut_short_keeps_every_case_it_finished(tmp_path, monkeypatch):
    """Device time is lent by the minute: a run stopped by its time limit (here, during the attention part) leaves
    --out holding each train case measured so far, marked incomplete; --parts picks what to measure."""
    bench = _accelerator_benchmark(monkeypatch)
    out = tmp_path / "accelerator.json"
    measured = []

    def train_case(shape, kernel, n_steps, peak):
        on_disk = json.loads(out.read_text())["train"] if out.exists() else []
        assert on_disk == measured  # every case before this one is already written
        row = {"model": shape.name, "kernel": kernel, "ran": kernel, "batch": 8, "seconds_per_step": 0.01}
        measured.append(row | {"tokens_per_sec": 1e4, "mfu": 0.5})
        return measured[-1]

    def cut_short(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "train_case", train_case)
    monkeypatch.setattr(bench, "attention_case", cut_short)
    with pytest.raises(KeyboardInterrupt):
        bench.run(bench.arguments(["--quick", "--parts=train,attention", "--out", str(out)]))
    result = json.loads(out.read_text())
    assert result["complete"] is False and result["parts"] == ["train", "attention"]
    assert result["train"] == measured and len(measured) == 2 * len(bench.kernels("cpu")) and "attention" not in result
    assert bench.markdown(result).count("\n| igpt_") == len(measured)  # a table of what there is
    with pytest.raises(SystemExit):
        bench.arguments(["--parts=train,speed"])


@pytest.mark.slow  # about a minute: mutmut's clean run of the guarding tests, then two mutants
def test_the_mutation_commands_measure_a_module(tmp_path):
    """docs/testing.md's first measurement, then a test's sample of two mutants (a whole module takes 2 to 35
    minutes); the others (a commit's tests, a sample of finetune.py's, `--all`) are read by the tool's own parser here
    and run the same function with their arguments."""
    first, *others = commands("tools/mutation_score.py igpt_jax/")
    out = tmp_path / "score.json"
    _ok(run_doc(first, ROOT, "--sample", "2", "--out", str(out), env=activated_env(), timeout=900))
    result = json.loads(out.read_text())
    assert result["module"] == first.argv()[2] and result["sample"]["of"] > 2, result  # of all the module's mutants
    assert sum(result[verdict] for verdict in ("killed", "survived", "no_tests", "timeout")) == 2, result
    sys.path.insert(0, str(ROOT / "tools"))
    import mutation_score

    for doc in others:
        args = mutation_score.arguments(doc.argv()[2:])
        assert args.module == doc.argv()[2] and (args.sample or args.rev != "HEAD"), doc


def test_the_mutation_tool_without_mutmut_names_the_extra_to_install():
    """A checkout set up without the `mutation` extra: one line naming it, before any copy or run (python -S leaves
    out site-packages, where mutmut would be; the tool itself imports only the standard library)."""
    result = subprocess.run(
        [sys.executable, "-S", "tools/mutation_score.py", "igpt_jax/optim.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1 and "[mutation]" in result.stderr and "Traceback" not in result.stderr, result
