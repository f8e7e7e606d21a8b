"""Runs one experiment from a config file.

    python -m experiments.main --config=configs/rigl_mnist1d.py --workdir=runs/rigl \
        --config.sparsity.target=0.95

``--config=file.py:arg`` passes ``arg`` to the file's ``get_config`` (e.g. the
``runlocal`` smoke-test variant). The config is locked: overriding a key that
does not exist is an error.

Bad input (a flag, the config file, a config key or value, the workdir) ends
the program with one ``error: ...`` line on stderr and exit status 2, before
anything is written; a run stopped by non-finite values or a workdir in use by
another run ends with one such line and status 1. ``--verbosity=0`` adds the
traceback (logged at INFO).

Several processes (one per host, or N local ones through `experiments.launch`)
pass ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or the
``SPARSEJAX_*`` environment variables); see `experiments.distributed`.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from typing import NoReturn

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import checkpoints, distributed, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl and checkpoints.")
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 for multi-process runs (default: $SPARSEJAX_COORDINATOR).",
)
flags.DEFINE_integer(
    "num_processes", None, "Number of processes (default: $SPARSEJAX_NUM_PROCESSES, else 1)."
)
flags.DEFINE_integer(
    "process_id", None, "This process's id in [0, num_processes) (default: $SPARSEJAX_PROCESS_ID)."
)
flags.mark_flags_as_required(["config", "workdir"])

# Exit statuses: bad input (nothing was written), and a run that was stopped.
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 1


def _fail(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"error: {one_line}", file=sys.stderr)
    sys.exit(status)


def _config_spec(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (``file.py`` or ``file.py:arg``), if given."""
    for i, arg in enumerate(argv):
        match = re.fullmatch(r"--?config(=(.*))?", arg)
        if match:
            return (
                match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
            )
    return None


def _load_config(spec: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of ``file.py:arg``, loaded the way config_flags does (for diagnosis)."""
    path, *arg = spec.split(":", 1)
    module_spec = importlib.util.spec_from_file_location("_config_to_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*arg)


def _missing_key(config: ml_collections.ConfigDict, override: str) -> str | None:
    """Why ``--config.<override>`` names no key of ``config``, or None if it does."""
    node, walked = config, "config"
    for part in override.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"--config.{override}: {walked} is a value, not a section"
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; its keys: {sorted(node)}"
            return f"--config.{override}: {walked} has no key {part!r}{hint}"
        node, walked = node[part], f"{walked}.{part}"
    return None


def _flag_error_line(argv: list[str], error: BaseException) -> str:
    """One line saying which flag, config file or config key ``error`` came from."""
    spec = _config_spec(argv)
    if spec:
        path = spec.split(":", 1)[0]
        if not os.path.isfile(path):
            return f"--config={spec}: no such file {path!r}"
        try:
            config = _load_config(spec)
        except AttributeError as load_error:
            if "get_config" in str(load_error):
                return f"--config={spec}: {path} defines no get_config(arg=None)"
            return f"--config={spec}: {type(load_error).__name__}: {load_error}"
        except Exception as load_error:  # noqa: BLE001 -- anything the config file raises
            return f"--config={spec}: {type(load_error).__name__}: {load_error}"
        if isinstance(config, ml_collections.ConfigDict):
            for arg in argv:
                match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
                problem = match and _missing_key(config, match.group(1))
                if problem:
                    return problem
    message = str(error).strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "Traceback" in message:
        # config_flags folds a config file's exception into the flag error: its last line.
        return lines[-1]
    return lines[0] if lines else type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with any bad flag, config file or config key told in one line.

    Args:
      argv: the command line, program name first.

    Returns:
      The arguments that are not flags (program name first).
    """
    try:
        rest = FLAGS(argv)
        # config_flags defers a file it cannot load until the config is first used.
        FLAGS.config.get("seed")
    except Exception as error:  # noqa: BLE001 -- every parse error becomes one line
        logging.info("Flags parsing failed", exc_info=True)
        _fail(_flag_error_line(argv, error))
    return rest


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # Checkpointing libraries log every save at INFO; keep the console to the progress bar.
        logging.set_verbosity(logging.WARNING)
    try:
        # Must come before anything touches a device (the config file only builds a dict).
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        logging.info("Config:\n%s", FLAGS.config)
        record = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except ValueError as error:
        logging.info("Refused", exc_info=True)
        _fail(str(error))
    except (train.NonFiniteLossError, checkpoints.WorkdirLockedError) as error:
        logging.info("Stopped", exc_info=True)
        _fail(str(error), EXIT_STOPPED)
    if jax.process_index() == 0:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
