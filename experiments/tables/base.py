"""The paper-table framework: `Table`, `Cell`, `TableRun`, the `TABLES` registry and claim helpers.

A table is one module ``experiments/tables/NAME.py`` that builds a `Table` named NAME and
passes it to `register` at import. `load_tables` imports every module of the package, so a
new table is a new file and nothing else; `experiments.reproduce` runs a registered table
and `experiments.report` writes its Markdown and figure. This module imports neither of
them, so a table module depends only on this one (and on the library), never on the CLI.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pkgutil
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_collections

from configs.base import get_base_config
from experiments import stats, sweep

__all__ = [
    "POSTTRAIN_METHODS",
    "POSTTRAIN_PATTERNS",
    "TABLES",
    "Cell",
    "CellCache",
    "Table",
    "TableRun",
    "calibrate_penalty",
    "compare",
    "load_tables",
    "mnist1d_base",
    "percent",
    "register",
    "vit1d_config",
    "with_sparsity",
]


class Cell(NamedTuple):
    """One (method, x) entry of a table and the config that produces it."""

    row: str
    col: float
    config: ml_collections.ConfigDict


class Table(NamedTuple):
    """A table: how to build its cells and how to check its claims.

    Attributes:
      name: the --table name (and the module ``experiments/tables/NAME.py``).
      title: one line saying what the table reproduces.
      col_label: what the columns are (e.g. 'sparsity').
      col_format: formats a column value for headers and plots.
      cells: (quick) -> cells; a row of cells that share a config reuse one run.
      claims: (results, cols) -> [stats.Claim], results[(row, col)] = per-seed accuracies.
      notes: setup text for the Markdown file.
      run: optional (config, seeds, dataset, cache) -> sweep.SweepResult, replacing
        `sweep.train_seeds` (cache: config JSON -> result, shared by the table's cells).
      extras: optional (cell, result) -> {title: value}; each title becomes an extra
        Markdown table (a number prints as is, a per-seed list as mean ± CI in %) and
        results[(row, col, title)] = value.
      run_all: optional (quick, seeds, dataset, workdir, progress) -> `TableRun`, for a
        table that is not a grid of independent cells (e.g. iterative pruning, where each
        column depends on the previous one); ``cells`` is then unused.
      metric: what the values are, for the Markdown caption and the plot's axis.
      scale: values are multiplied by this when shown (100: fractions shown in percent).
    """

    name: str
    title: str
    col_label: str
    col_format: Callable[[float], str]
    cells: Callable[[bool], list[Cell]]
    claims: Callable[[dict, list], list[stats.Claim]]
    notes: Callable[[bool], str]
    run: Callable[..., sweep.SweepResult] | None = None
    extras: Callable[[Cell, sweep.SweepResult], dict] | None = None
    run_all: Callable[..., TableRun] | None = None
    metric: str = "Test accuracy (%)"
    scale: float = 100.0


class TableRun(NamedTuple):
    """What `Table.run_all` returns: the row and column order and the per-seed values.

    ``results[(row, col)]`` is a list with one value per seed; ``extra_rows[title]``
    maps (row, col) to a number or a per-seed list, shown as extra Markdown tables.
    """

    rows: list[str]
    cols: list[float]
    results: dict
    extra_rows: dict


class CellCache:
    """Per-(row, col, seed) results of a long table in a JSONL file, so a stopped run resumes.

    A line is used only when its ``signature`` (the run's settings, e.g. sizes and the data's
    hash) equals this run's; a line cut by a crash is skipped and that cell runs again. With
    ``path=None`` results are kept in memory only.

    Example::

        cache = CellCache(os.path.join(workdir, "NAME_cells.jsonl"), {"quick": quick})
        result = cache.get(row, col, seed)
        if result is None:
            result = {"fidelity": ...}
            cache.put(row, col, seed, result)
    """

    def __init__(self, path: str | None, signature: dict):
        # As it reads back from JSON (tuples become lists), so equal settings compare equal.
        self.path, self.signature = path, json.loads(json.dumps(signature))
        self.done: dict[tuple, dict] = {}
        if path and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(entry, dict) and entry.get("signature") == self.signature:
                        key = (entry["row"], entry["col"], entry["seed"])
                        self.done[key] = entry["result"]

    def get(self, row: str, col: Any, seed: int) -> dict | None:
        """The stored result of a cell and seed, or None."""
        return self.done.get((row, col, seed))

    def put(self, row: str, col: Any, seed: int, result: dict) -> None:
        """Stores a result (JSON-serializable) and appends it to the file."""
        self.done[(row, col, seed)] = result
        if self.path:
            line = {"signature": self.signature, "row": row, "col": col, "seed": seed}
            text = json.dumps({**line, "result": result}).encode() + b"\n"
            with open(self.path, "ab+") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        # After a line torn by a crash, start a fresh line, not extend it.
                        text = b"\n" + text
                f.write(text)


# name -> Table; filled by the table modules at import (see `load_tables`).
TABLES: dict[str, Table] = {}


def register(table: Table) -> Table:
    """Adds ``table`` to `TABLES` and returns it (a table module calls this at import).

    Raises:
      ValueError: ``table`` is not a `Table`, or another table already has its name.
    """
    if not isinstance(table, Table):
        raise ValueError(f"table must be a tables.base.Table, got {type(table).__name__}")
    if table.name in TABLES and TABLES[table.name] is not table:
        raise ValueError(f"table name={table.name!r} is already registered")
    TABLES[table.name] = table
    return table


def load_tables() -> dict[str, Table]:
    """Imports every module of `experiments.tables` (each registers its table); returns `TABLES`."""
    from experiments import tables as package  # the package this module belongs to

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return TABLES


def calibrate_penalty(
    l0_of: Callable[[float], float],
    k: float,
    *,
    start: float,
    max_fits: int = 6,
    tolerance: float = 1.1,
) -> dict[str, float]:
    """The sparsity-penalty coefficient at which a penalized SAE's L0 is nearest ``k``.

    A secant search on log L0 against log coefficient (L0 falls as the penalty grows): the
    first step assumes L0 inversely proportional to the coefficient, later ones use the
    slope through the two tries nearest the target, and every step is limited to a factor
    of 8. It stops when L0 is within a factor ``tolerance`` of ``k`` or after ``max_fits``.

    Args:
      l0_of: coefficient -> the L0 reached by an SAE trained with it (one fit).
      k: the target L0.
      start: the first coefficient tried.
      max_fits, tolerance: the search's budget and stopping rule.

    Returns:
      ``{"coeff", "l0", "fits"}``: the best coefficient tried, its L0 and the fits made.
    """
    log_k = math.log(k)
    tried: list[tuple[float, float]] = []  # (log coefficient, log L0)
    log_c = math.log(start)
    for _ in range(max_fits):
        tried.append((log_c, math.log(max(l0_of(math.exp(log_c)), 1e-2))))
        if abs(tried[-1][1] - log_k) <= math.log(tolerance):
            break
        slope = -1.0
        if len(tried) >= 2:
            (c1, y1), (c2, y2) = sorted(tried, key=lambda t: abs(t[1] - log_k))[:2]
            if c1 != c2 and (y1 - y2) / (c1 - c2) < -0.05:
                slope = (y1 - y2) / (c1 - c2)
        best_c, best_y = min(tried, key=lambda t: abs(t[1] - log_k))
        log_c = best_c + max(-math.log(8), min(math.log(8), (log_k - best_y) / slope))
    best_c, best_y = min(tried, key=lambda t: abs(t[1] - log_k))
    return {"coeff": math.exp(best_c), "l0": math.exp(best_y), "fits": len(tried)}


def percent(x: float) -> str:
    """A fraction as a percent string with no trailing zeros: 0.9 -> '90%', 0.999 -> '99.9%'."""
    return f"{100 * x:g}%"


def mnist1d_base(quick: bool) -> ml_collections.ConfigDict:
    """The MNIST-1D CNN config the sparse-training tables start from (``quick``: 400 steps, 16
    channels; otherwise 3000 steps at the base config's width), progress bar off."""
    config = get_base_config()
    config.progress_bar = False
    if quick:
        config.total_steps = 400
        config.model.channels = 16
        config.eval_every_steps = 400
    else:
        config.total_steps = 3000
        config.eval_every_steps = 3000
    return config


# The post-training tables' pruners (row label, `sparsejax.posttrain` method) and patterns
# (column label -> (sparsity, n, m) of `prune_model`).
POSTTRAIN_METHODS = (("magnitude", "magnitude"), ("Wanda", "wanda"), ("SparseGPT", "sparsegpt"))
POSTTRAIN_PATTERNS = {
    "50%": (0.5, None, None),
    "60%": (0.6, None, None),
    "70%": (0.7, None, None),
    "2:4": (0.0, 2, 4),
    "4:8": (0.0, 4, 8),
}


def vit1d_config(quick: bool) -> ml_collections.ConfigDict:
    """The MNIST-1D transformer the post-training tables prune and measure: `ViT1D` with patch 4
    (10 tokens), width 32, depth 2, 4 heads, MLP 64, 2000 steps of Adam at 3e-3 (``quick``:
    width 16, depth 1, MLP 32, 300 steps), progress bar off."""
    config = get_base_config()
    config.progress_bar = False
    config.total_steps = 300 if quick else 2000
    config.eval_every_steps = config.total_steps
    config.model = ml_collections.ConfigDict(
        {
            "name": "vit1d",
            "patch_size": 4,
            "width": 16 if quick else 32,
            "depth": 1 if quick else 2,
            "num_heads": 4,
            "mlp_dim": 32 if quick else 64,
        }
    )
    config.optimizer.learning_rate = 3e-3
    return config


def with_sparsity(base: ml_collections.ConfigDict, **sparsity: Any) -> ml_collections.ConfigDict:
    """A copy of ``base`` whose ``sparsity`` section is exactly ``sparsity`` (``base`` is kept)."""
    config = ml_collections.ConfigDict(base.to_dict())
    config.sparsity = ml_collections.ConfigDict(sparsity)
    return config


def compare(
    results: dict,
    col: Any,
    sentence: str,
    a: tuple[str, str],
    b: tuple[str, str],
    *,
    strict: bool = False,
) -> stats.Claim:
    """Checks that row ``a`` is at least as good as row ``b`` in column ``col``.

    Args:
      results: ``results[(row, col)]`` = per-seed values, as `Table.claims` receives them.
      col: the column both sides are read from.
      sentence: the claim as printed.
      a: (name in the evidence, row label) of the side claimed to be as good or better.
      b: (name in the evidence, row label) of the other side.
      strict: check "a is better than b" (`stats.better`, significant at 95%) instead of
        "a is at least as good as b" (`stats.at_least`, not significantly worse).

    Returns:
      The checked `stats.Claim`.
    """
    check = stats.better if strict else stats.at_least
    return check(sentence, a[0], results[(a[1], col)], b[0], results[(b[1], col)])


def grows(results: dict, cols: list, row: str, sentence: str) -> list[stats.Claim]:
    """Claims that ``row`` is better in the last column than in the first (`stats.better`).

    For tables whose columns are one setting in increasing order (sparsity, parameter
    budget), where the paper's accuracy grows from the lowest setting to the highest.

    Args:
      results: ``results[(row, col)]`` = per-seed values, as `Table.claims` receives them.
      cols: the columns, lowest first; both ends are compared, as percents.
      row: the row label.
      sentence: the claim as printed; ``{low}`` and ``{high}`` stand for the first and last
        columns as `percent` strings.

    Returns:
      ``[claim]``, or ``[]`` when there is a single column (nothing to compare).
    """
    low, high = cols[0], cols[-1]
    if low == high:
        return []
    lo, hi = percent(low), percent(high)
    return [
        stats.better(
            sentence.format(low=lo, high=hi), hi, results[(row, high)], lo, results[(row, low)]
        )
    ]
