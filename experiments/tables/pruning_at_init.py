"""The ``pruning_at_init`` table: SNIP, GraSP, SynFlow vs random pruning and pruning after training.

    python -m experiments.reproduce --table=pruning_at_init --workdir=runs/tables --seeds=5

Every method prunes the MNIST-1D CNN globally once and keeps the mask fixed, at
90/99/99.9% sparsity. The claims: SynFlow avoids layer collapse (Tanaka et al. 2020),
each method at initialization is at least as good as a random mask, and pruning after
training is at least as good as the best of them (Frankle et al. 2021, "Pruning Neural
Networks at Initialization: Why Are We Missing the Mark?").
"""

from __future__ import annotations

import functools

import numpy as np

from experiments import stats
from experiments.tables import base

_AT_INIT = ("SNIP", "GraSP", "SynFlow")


def _rounds(quick: bool) -> int:
    return 10 if quick else 100


def _cells(quick: bool) -> list[base.Cell]:
    cfg = functools.partial(base.with_sparsity, base.mnist1d_base(quick))
    cells = []
    for s in [0.99] if quick else [0.9, 0.99, 0.999]:
        rounds = _rounds(quick)
        cells += [
            base.Cell("SNIP", s, cfg(algorithm="snip", target=s, distribution="global")),
            base.Cell("GraSP", s, cfg(algorithm="grasp", target=s, distribution="global")),
            base.Cell(
                "SynFlow",
                s,
                cfg(algorithm="synflow", target=s, rounds=rounds, distribution="global"),
            ),
            base.Cell(
                "magnitude at init",
                s,
                cfg(
                    algorithm="magnitude",
                    schedule="one_shot",
                    begin_step=0,
                    target=s,
                    distribution="global",
                ),
            ),
            base.Cell("random", s, cfg(algorithm="static", target=s, distribution="uniform")),
            base.Cell(
                "magnitude after training",
                s,
                cfg(
                    algorithm="magnitude",
                    target=s,
                    distribution="global",
                    schedule="one_shot",
                    begin_fraction=0.5,
                ),
            ),
        ]
    return cells


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    claims = []
    extreme = cols[-1]
    # results[(row, col, "collapsed")]: per seed, the layers left with no weight (run_table).
    collapsed = results.get(("SynFlow", extreme, "collapsed"), [])
    claims.append(
        stats.Claim(
            f"SynFlow avoids layer collapse at {base.percent(extreme)}: every layer keeps a "
            "weight in every seed (Tanaka et al. 2020)",
            bool(len(collapsed)) and max(collapsed) == 0,
            "collapsed layers per seed: "
            + ", ".join(
                f"{name} {results.get((name, extreme, 'collapsed'))}"
                for name in (*_AT_INIT, "magnitude at init")
            ),
        )
    )
    for s in cols:
        for name in _AT_INIT:
            claims.append(
                base.compare(
                    results,
                    s,
                    f"At {base.percent(s)}, {name} is at least as good as random pruning",
                    (name, name),
                    ("random", "random"),
                )
            )
    s = cols[0]
    best_pai = max(_AT_INIT, key=lambda n: np.mean(results[(n, s)]))
    claims.append(
        base.compare(
            results,
            s,
            f"At {base.percent(s)}, pruning after training is at least as good as the best "
            "method at initialization (Frankle et al. 2021)",
            ("after training", "magnitude after training"),
            (best_pai, best_pai),
        )
    )
    return claims


def _notes(quick: bool) -> str:
    config = base.mnist1d_base(quick)
    return (
        f"MNIST-1D 1D CNN ({config.model.channels} channels), {config.total_steps} steps of "
        "Adam. SNIP, GraSP (temperature 200), SynFlow "
        f"({_rounds(quick)} rounds, exponential schedule) and magnitude at init prune "
        "globally once before training and keep the mask fixed; random is a uniform random "
        "mask; 'after training' trains dense for half the steps, prunes by global magnitude "
        "and fine-tunes for the other half."
    )


TABLE = base.register(
    base.Table(
        "pruning_at_init",
        "Pruning at initialization: SNIP, GraSP, SynFlow vs random and pruning after training",
        "sparsity",
        base.percent,
        _cells,
        _claims,
        _notes,
    )
)
