"""Defaults shared by every config: MNIST-1D, the 1D CNN, Adam, dense training.

Each experiment file calls `get_base_config()` and changes what it needs. Every file owns
its ``file.py:runlocal`` variant (a smoke run of seconds): `is_runlocal(arg)` reads the
variant, `shrink_for_runlocal(config)` shrinks the keys every config shares (steps, batch,
logging, evaluation and checkpoint cadence), and the file shrinks its own model.
"""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    """The shared defaults. Durations are in optimizer steps."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "mnist1d"
    config.dataset.cache_dir = ""  # "" means $SPARSEJAX_DATA_DIR or ~/.cache/sparsejax.
    # The folder holding CIFAR-10's python batches (name="cifar10"); nothing is downloaded.
    config.dataset.data_dir = ""

    config.model = ml_collections.ConfigDict()
    config.model.name = "cnn1d"
    # The Flax API the model is written in: "linen", or "nnx" for the NNX twins of the
    # MLP and the CNN (experiments/nnx_models.py; same params tree and initial params).
    config.model.api = "linen"
    config.model.channels = 64

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 0
    config.optimizer.weight_decay = 0.0
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.grad_clip_norm = 0.0

    config.sparsity = ml_collections.ConfigDict()
    config.sparsity.algorithm = "dense"
    # "masked": dense weights times masks; "bsr": sparse nn.Dense kernels held and run as
    # their stored blocks (experiments/block_execution.py; block-structured Static, SET or
    # RigL), in the block layout "coo" (blocks anywhere) or "fan_in" (constant fan-in).
    config.sparsity.execution = "masked"
    config.sparsity.block_layout = "coo"

    config.total_steps = 8000
    config.batch_size = 100
    config.log_every_steps = 100
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 2
    config.progress_bar = True
    # "stop": raise on a non-finite loss (the last good checkpoint stays);
    # "skip": drop that step's update and go on (counted in metrics).
    config.on_nonfinite = "stop"
    # "skip" stops the run when more steps than this in a row were skipped (the run diverged).
    config.max_consecutive_skipped_steps = 20
    # Masks bit-packed in the optimizer state (1 bit a weight instead of 1 byte).
    config.pack_masks = False

    # Devices: a (data, model) mesh; data=-1 takes every device. The batch is split
    # over "data"; leaves with at least fsdp_min_size entries are sharded (FSDP).
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.model = 1
    config.mesh.fsdp_min_size = 2**16
    return config


VARIANTS = ("runlocal",)


def is_runlocal(arg: str | None) -> bool:
    """Whether ``file.py:VARIANT`` asks for the ``runlocal`` smoke variant.

    Args:
      arg: the text after ``:`` in ``--config=file.py:VARIANT`` (None or "" without one).

    Returns:
      True for ``'runlocal'``, False for None or "".

    Raises:
      ValueError: for any other variant, naming it and the known ones.
    """
    if arg in (None, ""):
        return False
    if arg not in VARIANTS:
        raise ValueError(f"config variant {arg!r} is unknown; known variants: {list(VARIANTS)}")
    return True


def shrink_for_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks the keys every config shares to a run of seconds; the model is left alone.

    20 steps of batch 32, logs every 5, evaluation and checkpoints every 10, no progress
    bar, and ``sparsity.update_every_steps`` (when the config has one) 5, so masks still
    change a few times. Each config shrinks its own model.

    Args:
      config: a config built on `get_base_config()`; changed in place.

    Returns:
      ``config``.
    """
    config.total_steps = 20
    config.batch_size = 32
    config.log_every_steps = 5
    config.eval_every_steps = 10
    config.checkpoint_every_steps = 10
    config.progress_bar = False
    if "update_every_steps" in config.sparsity:
        config.sparsity.update_every_steps = 5
    return config
