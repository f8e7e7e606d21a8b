"""Runs one experiment from a config file.

    python -m experiments.main --config=configs/rigl_mnist1d.py --workdir=runs/rigl \
        --config.sparsity.target=0.95

``--config=file.py:arg`` passes ``arg`` to the file's ``get_config`` (e.g. the
``runlocal`` smoke-test variant). The config is locked: overriding a key that
does not exist is an error.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # Checkpointing libraries log every save at INFO; keep the console to the progress bar.
        logging.set_verbosity(logging.WARNING)
    logging.info("Config:\n%s", FLAGS.config)
    record = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})


if __name__ == "__main__":
    app.run(main)
