"""The ``random_pruning`` table: random masks get closer to dense as the network widens.

    python -m experiments.reproduce --table=random_pruning --workdir=runs/tables --seeds=5

Rows: dense, random static masks with the ERK and the uniform distribution at 90%
sparsity; columns: width multipliers of the MNIST-1D CNN (Liu et al. 2022, "The
Unreasonable Effectiveness of Random Pruning").
"""

from __future__ import annotations

import functools

import ml_collections
import numpy as np

from experiments import stats
from experiments.tables import base

_SPARSITY = 0.9


def _base(quick: bool, width: int) -> ml_collections.ConfigDict:
    config = base.mnist1d_base(quick)
    config.model.channels = (8 if quick else 16) * width
    return config


def _cells(quick: bool) -> list[base.Cell]:
    cells = []
    for w in [1, 2] if quick else [1, 2, 4]:
        cfg = functools.partial(base.with_sparsity, _base(quick, w))
        cells += [
            base.Cell("dense", w, cfg(algorithm="dense")),
            base.Cell(
                "random ERK", w, cfg(algorithm="static", target=_SPARSITY, distribution="erk")
            ),
            base.Cell(
                "random uniform",
                w,
                cfg(algorithm="static", target=_SPARSITY, distribution="uniform"),
            ),
        ]
    return cells


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    gap = {
        w: np.asarray(results[("dense", w)]) - np.asarray(results[("random ERK", w)]) for w in cols
    }
    narrow, wide = cols[0], cols[-1]
    claims = [
        stats.better(
            f"The accuracy gap between dense and random ERK pruning at 90% shrinks from "
            f"width x{narrow} to x{wide} (Liu et al. 2022)",
            f"gap x{narrow}",
            gap[narrow],
            f"gap x{wide}",
            gap[wide],
        )
    ]
    for w in cols:
        claims.append(
            base.compare(
                results,
                w,
                f"At width x{w}, random ERK masks are at least as good as uniform ones",
                ("ERK", "random ERK"),
                ("uniform", "random uniform"),
            )
        )
    return claims


def _notes(quick: bool) -> str:
    config = _base(quick, 1)
    return (
        f"MNIST-1D 1D CNN of width x1 = {config.model.channels} channels, random static masks "
        f"at {base.percent(_SPARSITY)} sparsity, {config.total_steps} steps of Adam. "
        "Columns: width multiplier."
    )


TABLE = base.register(
    base.Table(
        "random_pruning",
        "Random pruning gets closer to dense as width grows (Liu et al. 2022)",
        "width multiplier",
        lambda w: f"x{w:g}",
        _cells,
        _claims,
        _notes,
    )
)
