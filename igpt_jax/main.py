"""Command-line entry point: `igpt --config=PRESET[:ARG] --workdir=DIR --mode=MODE` (or `python -m igpt_jax.main`).

Also installed as the console script `igpt`. The config is checked before anything is built or compiled; a bad
key or value exits with status 2 and one message naming it. Modes are a registry (MODES: name -> the function of
config and workdir that runs it).
"""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import sys
from typing import NamedTuple

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from igpt_jax import config_checks, configs, defaults, errors
from igpt_jax.workdir import layout


class Mode(NamedTuple):
    target: str  # "module:function", the function of (config, workdir) that is the mode
    summary: str  # its line in --help


# Every mode (README: Command line). Modules are imported when their mode runs: config errors come before JAX loads.
# eval, probe and sample run the config's evaluators of their kind (igpt_jax/evaluators/).
MODES: dict[str, Mode] = {
    "train": Mode("igpt_jax.train:run", "train to config.total_steps, resuming from the workdir's newest checkpoint"),
    "eval": Mode("igpt_jax.evaluators.runner:eval_mode", "the held-out loss of the newest checkpoint"),
    "probe": Mode("igpt_jax.evaluators.runner:probe_mode", "the linear (or attentive) probe of the newest checkpoint"),
    "finetune": Mode("igpt_jax.finetune:run", "fine-tune the newest checkpoint with a class head, then score test"),
    "sample": Mode("igpt_jax.evaluators.runner:sample_mode", "samples and completions of the newest checkpoint"),
    "compile": Mode("igpt_jax.planning.mode:run", "compile the train step for config.compile.topology: memory, speed"),
}
ALL_MODES = tuple(MODES)

# Set before JAX loads, per mode. `compile` only describes TPU topologies: it never holds a TPU, so it need not take
# libtpu's one-process lock (another JAX process on the host would otherwise stop it) nor ask a metadata server.
MODE_ENVIRONMENT: dict[str, dict[str, str]] = {
    "compile": {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1"},
}


def _run_mode(mode: str, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs a mode; every known way for it to stop becomes one line and an exit status."""
    module_name, _, function = MODES[mode].target.partition(":")
    mode_fn = getattr(importlib.import_module(module_name), function)
    from igpt_jax import interrupts
    from igpt_jax.workdir import storage

    try:
        with interrupts.outside_the_work(f"--mode={mode}"):
            storage.check_reachable(workdir)
            mode_fn(config, workdir)
    except (interrupts.Stopped, interrupts.StoppedOutsideTheWork) as e:
        _exit(str(e), e.code)
    except KeyboardInterrupt:
        _exit(f"interrupted: stopped without saving; {_newest_checkpoint(workdir)}", 130)
    except (errors.IgptError, *errors.BUILTIN) as e:  # a config error too, once the checkpoint's recipe is known
        _exit(errors.line(e), errors.exit_code(e))
    except OSError as e:  # a full disk or a read-only folder outside the checkpoints
        where = e.filename or "a file (the workdir, config.data.data_dir or the temp folder)"
        _exit(f"cannot read or write {where}: {e.strerror or e}", 1)


def _newest_checkpoint(workdir: str) -> str:
    """What a stop without saving left: the newest checkpoint, or that there is none yet."""
    from igpt_jax.workdir import checkpoint, storage

    directory = storage.path(workdir)
    saved = checkpoint.saved_steps(directory)
    if not saved:
        return "no checkpoint had been written yet: a relaunch starts from step 0"
    return f"the newest checkpoint, {directory / layout.CHECKPOINTS / str(saved[-1])}, is intact"


_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    f"A preset ({', '.join(configs.names())}) or a config file's path, with an optional :ARG, e.g. igpt_l:48.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples (local or gs://).")
_MODE = flags.DEFINE_enum("mode", "train", ALL_MODES, "What to do with the workdir (the modes above).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for multi-process runs (left out: JAX's auto-detection "
    "on TPU pods, SLURM and Open MPI, else a single process).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 60, "Seconds after which the other processes give up on a process that stopped answering."
)


def _fail(message: str) -> None:
    print(f"igpt: {message}", file=sys.stderr)
    sys.exit(2)


def _exit(message: str, code: int) -> None:
    """One line, then exit at once: once a mode has run, background threads (Orbax's savers, jax.distributed) may
    hold a failure or wait on other processes, and a normal interpreter exit would wait on them, or print their
    tracebacks, instead of ending the job."""
    print(f"igpt: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def with_preset_paths(argv: list[str]) -> list[str]:
    """argv with a preset's name after --config (`--config=igpt_l:48` or `--config igpt_l:48`) replaced by its
    installed file's path, which is what ml_collections' config flag loads."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + configs.resolve(arg[len("--config=") :])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = configs.resolve(out[i + 1])
    return out


HELP_FLAGS = ("--help", "-h", "--helpshort", "-?")


def help_text() -> str:
    """What `igpt --help` prints: usage, the modes, the presets, examples and this module's flags."""
    modes = "".join(f"  {name:<10}{mode.summary}\n" for name, mode in MODES.items())
    return (
        "igpt: Image GPT (Chen et al., 2020) in JAX: train, evaluate, probe, fine-tune, sample or plan a run.\n\n"
        "usage: igpt --config=PRESET[:ARG] --workdir=DIR [--mode=MODE] [--config.KEY=VALUE ...]\n\n"
        f"modes (--mode, default train):\n{modes}\n"
        f"presets (--config): {', '.join(configs.names())}, or the path of a config file with a get_config(arg)\n\n"
        "examples:\n"
        "  igpt --config=fashion_mnist --workdir=runs/fm\n"
        "  igpt --config=igpt_s:48 --workdir=gs://BUCKET/s48 --config.batch_size=256 --config.model.remat=full\n"
        "  igpt --config=fashion_mnist --workdir=runs/fm --mode=probe --config.evals.probe.test_examples=5000\n\n"
        f"flags:\n{flags.FLAGS.module_help(__name__).strip()}\n\n"
        "config keys (--config.KEY=VALUE), with their defaults and what they allow; a relaunch may change any but "
        f"those fixed by the checkpoint:\n{defaults.describe()}\n"
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; a bad config file, key or value becomes one line that says what is allowed. --help prints
    help_text() and exits 0 (absl's own prints only the main script's flags, none for a console script, and exits 1)."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(help_text(), end="")
        sys.exit(0)
    argv = with_preset_paths(argv)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - any failure here is a usage error, reported in one line
        _fail(_explain_flag_error(argv, e))


def _explain_flag_error(argv: list[str], error: Exception) -> str:
    from igpt_jax import evaluators

    mode = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--mode=")), None)
    if mode is not None and mode not in MODES:
        return f"--mode={mode} is unknown; allowed: {', '.join(ALL_MODES)}"

    for arg in argv[1:]:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config.") :].split("=", 1)[0]
            new_key = evaluators.renamed(key)
            if new_key is not None:
                return f"config.{key} is now config.{new_key}: evaluators are listed under config.evals"
            missing = _missing_part(argv, key)
            if missing is not None:
                parent, keys = missing
                where = f"config.{parent}" if parent else "config"
                return f"unknown config key config.{key}; keys under {where}: {', '.join(keys)}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    # A config file that raised: its last line is the exception, the first says which flag.
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _load_config_arg(argv: list[str]) -> ml_collections.ConfigDict | None:
    """The config that --config=PATH[:ARG] in argv names, or None if there is none or it does not load."""
    spec = next((a.split("=", 1)[1] for a in with_preset_paths(argv)[1:] if a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("_igpt_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception:  # noqa: BLE001 - the original error is reported instead
        return None


def _missing_part(argv: list[str], dotted: str) -> tuple[str, list[str]] | None:
    """(parent path, its keys) for the first part of `dotted` the loaded config lacks; None if all exist."""
    node = _load_config_arg(argv)
    if node is None:
        return None
    path: list[str] = []
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            return ".".join(path), keys
        node, path = node[part], [*path, part]
    return None


class _QuietLibraries(std_logging.Filter):
    """Drops INFO chatter from Orbax and friends (every save logs ~20 lines); their warnings still show, as one line
    each: a failed save is reported by igpt_jax with its cause, not by 40 lines of Orbax's thread tracebacks."""

    # asyncio: "Task exception was never retrieved" with its traceback, for an Orbax write still in flight when a
    # failed save (a full disk) was abandoned
    NOISY = ("orbax", "tensorstore", "etils", "absl/logging", "gcsfs", "asyncio")

    def filter(self, record: std_logging.LogRecord) -> bool:
        if not any(n in record.pathname for n in self.NOISY):
            return True
        if record.levelno >= std_logging.ERROR and record.exc_info:
            message = record.getMessage().splitlines()[0][:200]
            record.msg, record.args = f"{message} ({type(record.exc_info[1]).__name__})", ()
            record.exc_info = record.exc_text = None
        return record.levelno >= std_logging.WARNING


def _quiet_closed_loops(unraisable) -> None:
    """sys.unraisablehook: after a failed save, tensorstore's writes still in flight finish in its own threads and
    call back into the asyncio loop Orbax has closed; each callback's RuntimeError has nowhere to go and Python would
    print it as a traceback of its own, dozens of them above igpt's one line. Those go to the debug log; anything
    else unraisable is printed as usual."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        logging.debug("after a failed save, a library callback found its event loop closed")
        return
    sys.__unraisablehook__(unraisable)


def main(argv: list[str]) -> None:
    for handler in std_logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    sys.unraisablehook = _quiet_closed_loops
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --config=... --workdir=... --mode=...")
    try:
        config = _CONFIG.value
        if config is not None:
            config.keys()  # config files load lazily: a missing or failing file raises on first use
    except Exception as e:  # noqa: BLE001
        _fail(_explain_flag_error([], e))
    if config is None:
        _fail(
            f"--config is required: a preset ({', '.join(configs.names())}) or a config file (--config=fashion_mnist)"
        )
    if not _WORKDIR.value:
        _fail("--workdir is required: where checkpoints, metrics and samples go")
    mode = _MODE.value
    try:
        config_checks.check(config, mode)
    except config_checks.ConfigError as e:
        _fail(e.line())
    for name, value in MODE_ENVIRONMENT.get(mode, {}).items():
        os.environ.setdefault(name, value)
    from igpt_jax import distributed  # JAX loads here, after every check that needs no backend

    try:
        how = distributed.initialize(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, heartbeat_timeout=_HEARTBEAT.value
        )
    except ValueError as e:
        _fail(str(e))
    logging.info("processes: %s", how)
    cache = use_compilation_cache(config.compilation_cache_dir, _WORKDIR.value)
    logging.info("compilation cache: %s", cache or "off")
    logging.info("mode=%s workdir=%s", _MODE.value, _WORKDIR.value)
    _run_mode(mode, config, _WORKDIR.value)


def use_compilation_cache(setting: str, workdir: str) -> str | None:
    """Points JAX's persistent compilation cache where config.compilation_cache_dir says (see igpt_jax/defaults.py);
    returns the folder, or None when it is off."""
    import jax

    from igpt_jax.workdir import storage

    if setting == "auto":
        setting = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.fspath(
            storage.path(workdir).parent / layout.COMPILATION_CACHE
        )
    jax.config.update("jax_compilation_cache_dir", setting or None)  # None: off, even where the environment set one
    return setting or None


def run() -> None:
    """Console-script entry point (`igpt`)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
