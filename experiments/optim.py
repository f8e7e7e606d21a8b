"""The optimizer a run trains with, built from its config.

Sparsity enters training only here: the dense optax chain described by
``config.optimizer`` is wrapped by ``sparsejax.transforms.masked(chain, algorithm)``,
whose state holds the masks, so the train step is the same for dense, pruned,
dynamic sparse and rank-adaptive training.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from sparsejax import algorithms, transforms

PyTree = Any

__all__ = [
    "OPTIMIZERS",
    "make_masked_optimizer",
    "make_optimizer",
    "packs_masks",
]

OPTIMIZERS = ("adam", "adamw", "lion", "momentum", "sgd")


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """The dense optax optimizer described by ``config.optimizer``.

    Keys: ``name`` (sgd, momentum, adam, adamw, lion), ``learning_rate``,
    ``schedule`` ('constant' or 'cosine'), ``warmup_steps``, ``momentum``,
    ``nesterov``, ``weight_decay``, ``grad_clip_norm`` (0 disables).

    Args:
      config: a run config (only ``config.optimizer`` is read).
      total_steps: the length of the cosine schedule.

    Returns:
      ``[clip_by_global_norm] -> [add_decayed_weights] -> optimizer``, an optax chain.

    Raises:
      ValueError: naming the ``config.optimizer`` key, for an unknown name or
        schedule, a learning rate <= 0 or a key out of its range.
    """
    opt = config.optimizer
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer.name={opt.name!r} is unknown; known: {OPTIMIZERS}")
    if not _is_number(opt.learning_rate) or not opt.learning_rate > 0:
        raise ValueError(
            f"config.optimizer.learning_rate must be positive, got {opt.learning_rate!r}"
        )
    for key, low, high in (
        ("warmup_steps", 0, None),
        ("weight_decay", 0.0, None),
        ("momentum", 0.0, 1.0),
        ("grad_clip_norm", 0.0, None),
    ):
        value = opt.get(key, 0)
        integral = key == "warmup_steps"
        if (
            not _is_number(value)
            or (integral and not isinstance(value, int))
            or not value >= low
            or (high is not None and not value < high)
        ):
            bounds = f"in [{low}, {high})" if high is not None else f">= {low}"
            raise ValueError(
                f"config.optimizer.{key} must be {'an integer' if integral else 'a number'} "
                f"{bounds}, got {value!r}"
            )
    warmup = int(opt.get("warmup_steps", 0))
    if opt.get("schedule", "constant") == "cosine" and not warmup:
        lr = optax.cosine_decay_schedule(opt.learning_rate, decay_steps=max(total_steps, 1))
    elif opt.get("schedule", "constant") == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=opt.learning_rate,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
        )
    elif opt.get("schedule", "constant") == "constant":
        lr = optax.linear_schedule(0.0, opt.learning_rate, warmup) if warmup else opt.learning_rate
    else:
        raise ValueError(
            f"config.optimizer.schedule={opt.schedule!r} is unknown; known: ['constant', 'cosine']"
        )
    wd = float(opt.get("weight_decay", 0.0))
    if opt.name == "sgd":
        tx = optax.sgd(lr)
    elif opt.name == "momentum":
        tx = optax.sgd(lr, momentum=opt.get("momentum", 0.9), nesterov=opt.get("nesterov", False))
    elif opt.name == "adam":
        tx = optax.adam(lr)
    elif opt.name == "adamw":
        tx = optax.adamw(lr, weight_decay=wd)
    else:
        tx = optax.lion(lr, weight_decay=wd)
    if wd and opt.name in ("sgd", "momentum", "adam"):
        tx = optax.chain(optax.add_decayed_weights(wd), tx)
    clip = float(opt.get("grad_clip_norm", 0.0))
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx


def make_masked_optimizer(
    config: ml_collections.ConfigDict,
    algorithm: algorithms.Algorithm,
    *,
    key: jax.Array | None = None,
    masks: PyTree | None = None,
) -> optax.GradientTransformation:
    """``sparsejax.transforms.masked(make_optimizer(config, config.total_steps), algorithm)``.

    The update reads only the state (masks, counters and keys live there), so the
    transform built without ``key`` / ``masks`` updates any state made by one built
    with them: build it once and use it for every seed. ``config.pack_masks`` keeps
    the masks bit-packed in the state.

    Args:
      config: a run config (``optimizer``, ``total_steps``, ``pack_masks``).
      algorithm: from `sparsejax.algorithms`.
      key: the ``jax.random.key`` ``init`` stores for the algorithm's random choices.
      masks: initial masks ``init`` uses instead of ``algorithm.init_masks``
        (e.g. those of ``algorithm.masks_from_model``).

    Returns:
      An ``optax.GradientTransformation`` whose state is a `transforms.MaskedState`.

    Raises:
      ValueError: for a bad ``config.optimizer`` or ``config.pack_masks``.
    """
    return transforms.masked(
        make_optimizer(config, config.total_steps),
        algorithm,
        key=key,
        masks=masks,
        packed=packs_masks(config),
    )


def packs_masks(config: ml_collections.ConfigDict) -> bool:
    """``config.pack_masks`` (default False): keep the masks bit-packed in the optimizer state.

    Raises:
      ValueError: if ``config.pack_masks`` is not a bool.
    """
    value = config.get("pack_masks", False)
    if not isinstance(value, bool):
        raise ValueError(f"config.pack_masks must be a bool, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
