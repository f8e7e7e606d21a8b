"""Runs one experiment from a config file.

    python -m experiments.main --config=configs/rigl_mnist1d.py --workdir=runs/rigl \
        --config.sparsity.target=0.95

``--config=file.py:arg`` passes ``arg`` to the file's ``get_config`` (e.g. the
``runlocal`` smoke-test variant). The config is locked: overriding a key that
does not exist is an error.

Several processes (one per host, or N local ones through `experiments.launch`)
pass ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or the
``SPARSEJAX_*`` environment variables); see `experiments.distributed`.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import distributed, train

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # Checkpointing libraries log every save at INFO; keep the console to the progress bar.
        logging.set_verbosity(logging.WARNING)
    # Must come before anything touches a device (the config file only builds a dict).
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info("Config:\n%s", FLAGS.config)
    record = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})


if __name__ == "__main__":
    app.run(main)
