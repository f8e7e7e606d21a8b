"""The ``lottery`` table: IMP with rewinding vs reinitialization vs random masks.

    python -m experiments.reproduce --table=lottery --workdir=runs/tables --seeds=5

Iterative magnitude pruning of an MNIST-1D residual MLP (`experiments.lottery.run_imp`),
20% of each layer's survivors per round, rewinding to the initialization. At each round's
sparsity the winning ticket is compared with the same masks re-initialized and with random
masks of the same per-layer density (Frankle & Carbin 2019, "The Lottery Ticket Hypothesis").
The columns depend on one another, so the table runs as a whole (`Table.run_all`).
"""

from __future__ import annotations

import ml_collections

from configs.base import get_base_config
from experiments import lottery as lottery_lib
from experiments import stats
from experiments.tables import base


def _config(quick: bool) -> tuple[ml_collections.ConfigDict, int]:
    """The per-round config and the number of rounds."""
    config = get_base_config()
    config.progress_bar = False
    config.model = ml_collections.ConfigDict(
        {"name": "resmlp", "features": 64 if quick else 500, "num_layers": 2}
    )
    config.optimizer.learning_rate = 2e-2 if not quick else 1e-2
    config.optimizer.schedule = "constant"
    config.total_steps = 150 if quick else 1501
    config.eval_every_steps = config.total_steps
    return config, (2 if quick else 10)


def _run(quick, seeds, dataset, workdir, progress) -> base.TableRun:
    config, rounds = _config(quick)
    record = lottery_lib.run_imp(
        config, seeds, rounds=rounds, dataset=dataset, workdir=workdir, progress=progress
    )
    cols = record["sparsity"]
    rows = ["ticket", "reinit", "random"]
    results = {(row, s): accs for row in rows for s, accs in zip(cols, record[row], strict=True)}
    return base.TableRun(rows, cols, results, {})


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    claims = []
    for s in cols[1:]:
        if s < 0.8 and s != cols[-1]:
            continue
        p = base.percent(round(s, 3))
        claims += [
            base.compare(
                results,
                s,
                f"At {p}, the winning ticket beats the same mask with a new initialization "
                "(Frankle & Carbin 2019)",
                ("ticket", "ticket"),
                ("reinit", "reinit"),
                strict=True,
            ),
            base.compare(
                results,
                s,
                f"At {p}, the winning ticket beats a random mask",
                ("ticket", "ticket"),
                ("random mask", "random"),
                strict=True,
            ),
        ]
    return claims


def _notes(quick: bool) -> str:
    config, rounds = _config(quick)
    return (
        f"MNIST-1D residual MLP 40-{config.model.features}-{config.model.features}-10, Adam "
        f"{config.optimizer.learning_rate} (constant), batch {config.batch_size}, "
        f"{config.total_steps} steps per round, {rounds} rounds removing 20% of each layer's "
        "surviving weights by magnitude and rewinding to the initialization. Controls at each "
        "round's sparsity: the ticket's masks with a fresh initialization, and random masks "
        "with the same per-layer density."
    )


TABLE = base.register(
    base.Table(
        "lottery",
        "Lottery tickets: IMP with rewinding vs reinitialization vs random masks",
        "sparsity",
        lambda s: f"{100 * s:.1f}%",
        lambda quick: [],
        _claims,
        _notes,
        run_all=_run,
    )
)
