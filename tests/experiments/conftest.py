"""Helpers the experiments tests share: the quickstart's runlocal config, poisoned batches."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import numpy as np

from configs import quickstart
from experiments import data as data_lib


def runlocal_config(**overrides) -> ml_collections.ConfigDict:
    """``configs/quickstart.py:runlocal`` with ``overrides`` (dotted keys reach into sections).

    Example: ``runlocal_config(total_steps=8, **{"sparsity.algorithm": "static"})``.
    """
    config = quickstart.get_config("runlocal")
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def poison_batches(monkeypatch, is_bad: Callable[[int], bool]) -> None:
    """Makes `experiments.data.batches` yield all-NaN inputs at the steps where ``is_bad(step)``.

    The trainer reads ``data.batches`` at call time, so the loop sees the poisoned ones.
    """
    real_batches = data_lib.batches

    def poisoned(x, y, *, batch_size, seed, start_step=0):
        for step, (bx, by) in enumerate(
            real_batches(x, y, batch_size=batch_size, seed=seed, start_step=start_step),
            start=start_step,
        ):
            yield (np.full_like(bx, np.nan) if is_bad(step) else bx), by

    monkeypatch.setattr(data_lib, "batches", poisoned)
