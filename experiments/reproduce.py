"""Reproduces the paper tables: a sweep per table, Markdown + PNG, and the paper's claims checked.

    python -m experiments.reproduce --table=dst --workdir=runs/tables --seeds=5
    python -m experiments.reproduce --table=dst --workdir=/tmp/t --quick   # minutes, tiny

Writes ``WORKDIR/NAME.md`` (test accuracy, mean ± 95% CI over seeds, and the
claims), ``WORKDIR/NAME.png`` and ``WORKDIR/NAME.json`` (every per-seed value).
All seeds of a cell train in one compiled program (`experiments.sweep`).
The tables themselves are the modules of `experiments.tables` (one per table,
registered through `experiments.tables.base`); `experiments.report` writes the
Markdown and the figure. This module is the command line and `run_table`.
Claims are decided with confidence intervals (`experiments.stats`), and every
verdict is printed with its numbers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from experiments import data as data_lib
from experiments import report, sweep
from experiments.tables import base

__all__ = ["TABLES", "run_table"]

# Every table module registers itself on import; the --table flag lists what is here.
TABLES: dict[str, base.Table] = base.load_tables()


def _collapsed_layers(result: sweep.SweepResult) -> list[int]:
    """Per seed, how many layers the final masks leave with no weight at all."""
    dens = np.stack(list(result.layer_density.values()), axis=1)  # [seeds, layers]
    return (dens == 0).sum(axis=1).astype(int).tolist()


def run_table(
    name: str, workdir: str, *, seeds: int = 5, quick: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Runs table ``name`` and writes NAME.md, NAME.png and NAME.json into ``workdir``.

    Args:
      name: one of `TABLES`.
      workdir: output directory.
      seeds: seeds per cell (the first ``seeds`` integers).
      quick: the tiny version (fewer columns, steps and channels) used by the tests.
      progress: progress bars.

    Returns:
      ``{"markdown": str, "claims": [Claim], "results": {...}}``.
    """
    if name not in TABLES:
        raise ValueError(f"table={name!r} is unknown; known tables: {sorted(TABLES)}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    table = TABLES[name]
    os.makedirs(workdir, exist_ok=True)
    seed_list = list(range(seeds))
    start = time.time()
    dataset = data_lib.load_mnist1d()
    results: dict = {}
    extra_rows: dict[str, dict] = {}
    if table.run_all is not None:
        rows, cols, results, extra_rows = table.run_all(
            quick, seed_list, dataset, workdir, progress
        )
    else:
        cells = table.cells(quick)
        rows = list(dict.fromkeys(c.row for c in cells))
        cols = list(dict.fromkeys(c.col for c in cells))
        cache: dict[str, sweep.SweepResult] = {}
        for cell in tqdm(cells, desc=name, disable=not progress):
            key = cell.config.to_json()
            if key not in cache and table.run is not None:
                cache[key] = table.run(cell.config, seed_list, dataset, cache)
            if key not in cache:
                cache[key] = sweep.train_seeds(
                    cell.config, seed_list, dataset=dataset, progress=False
                )
            result = cache[key]
            results[(cell.row, cell.col)] = result.test_accuracy[:, -1].tolist()
            results[(cell.row, cell.col, "collapsed")] = (
                _collapsed_layers(result) if result.layer_density else []
            )
            for title, value in (table.extras(cell, result) if table.extras else {}).items():
                extra_rows.setdefault(title, {})[(cell.row, cell.col)] = value
                results[(cell.row, cell.col, title)] = value
    claims = table.claims(results, cols)
    elapsed = time.time() - start
    page = report.markdown(table, rows, cols, results, claims, seeds, quick, elapsed, extra_rows)
    with open(os.path.join(workdir, f"{name}.md"), "w") as f:
        f.write(page)
    report.plot(table, rows, cols, results, os.path.join(workdir, f"{name}.png"), seeds)
    with open(os.path.join(workdir, f"{name}.json"), "w") as f:
        json.dump(
            {
                "table": name,
                "seeds": seed_list,
                "quick": quick,
                "cols": cols,
                "results": [
                    {"row": k[0], "col": k[1], "values": v}
                    for k, v in results.items()
                    if len(k) == 2
                ],
                "claims": [c._asdict() for c in claims],
                "seconds": elapsed,
            },
            f,
            indent=1,
        )
    return {"markdown": page, "claims": claims, "results": results}


FLAGS = flags.FLAGS
flags.DEFINE_enum("table", None, sorted(TABLES), "Which table to reproduce.")
flags.DEFINE_string("workdir", None, "Output directory for NAME.md, NAME.png, NAME.json.")
flags.DEFINE_integer("seeds", 5, "Seeds per cell.")
flags.DEFINE_bool("quick", False, "Tiny version: fewer columns, steps and channels.")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    out = run_table(FLAGS.table, FLAGS.workdir, seeds=FLAGS.seeds, quick=FLAGS.quick)
    sys.stdout.write(out["markdown"])


if __name__ == "__main__":
    flags.mark_flags_as_required(["table", "workdir"])
    app.run(main)
