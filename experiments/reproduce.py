"""Reproduces the paper tables: a sweep per table, Markdown + PNG, and the paper's claims checked.

    python -m experiments.reproduce --table=dst --workdir=runs/tables --seeds=5
    python -m experiments.reproduce --table=dst --workdir=/tmp/t --quick   # minutes, tiny

Writes ``WORKDIR/NAME.md`` (test accuracy, mean ± 95% CI over seeds, and the
claims), ``WORKDIR/NAME.png`` and ``WORKDIR/NAME.json`` (every per-seed value).
All seeds of a cell train in one compiled program (`experiments.sweep`).
Claims are decided with confidence intervals (`experiments.stats`), and every
verdict is printed with its numbers.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

import tensornets
from configs.base import get_base_config
from experiments import data as data_lib
from experiments import lottery, stats, sweep, train
from experiments import models as models_lib
from sparsejax import algorithms, distributions, flops

__all__ = ["TABLES", "Cell", "Table", "TableRun", "register", "run_table"]


class Cell(NamedTuple):
    """One (method, x) entry of a table and the config that produces it."""

    row: str
    col: float
    config: ml_collections.ConfigDict


class Table(NamedTuple):
    """A table: how to build its cells and how to check its claims.

    Attributes:
      name: the --table name.
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


def register(table: Table) -> Table:
    """Adds ``table`` to `TABLES` (a table module in `experiments.tables` calls this)."""
    if not isinstance(table, Table):
        raise ValueError(f"table must be a reproduce.Table, got {type(table).__name__}")
    if table.name in TABLES and TABLES[table.name] is not table:
        raise ValueError(f"table name={table.name!r} is already registered")
    TABLES[table.name] = table
    return table


def _percent(x: float) -> str:
    return f"{100 * x:g}%"


def _cfg(base: ml_collections.ConfigDict, **sparsity: Any) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    config.sparsity = ml_collections.ConfigDict(sparsity)
    return config


def _sparse_param_count(config: ml_collections.ConfigDict, sparsity: float) -> int:
    """Nonzeros of the model in ``config`` with its kernels at ``sparsity`` (biases dense)."""
    model = train.make_model(config, num_classes=10)
    x = np.zeros((1, 40, 1), np.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    per_leaf = distributions.uniform(shapes, sparsity)
    total = 0
    for s, p in zip(
        jax.tree.leaves(per_leaf, is_leaf=lambda v: v is None),
        jax.tree.leaves(shapes),
        strict=True,
    ):
        size = math.prod(p.shape)
        total += size if s is None else round((1 - s) * size)
    return total


# ----------------------------------------------------------------------------- dst


def _mnist1d_base(quick: bool) -> ml_collections.ConfigDict:
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


def _dst_cells(quick: bool) -> list[Cell]:
    base = _mnist1d_base(quick)
    every = 20 if quick else 100
    dst = {"update_every_steps": every, "end_fraction": 0.75}
    cells = []
    for s in [0.9] if quick else [0.8, 0.9, 0.95]:
        cells += [
            Cell("dense", s, _cfg(base, algorithm="dense")),
            Cell(
                "static (uniform)",
                s,
                _cfg(base, algorithm="static", target=s, distribution="uniform"),
            ),
            Cell("static (ERK)", s, _cfg(base, algorithm="static", target=s, distribution="erk")),
            Cell("SET (ERK)", s, _cfg(base, algorithm="set", target=s, distribution="erk", **dst)),
            Cell(
                "RigL (ERK)", s, _cfg(base, algorithm="rigl", target=s, distribution="erk", **dst)
            ),
            Cell(
                "SNFS (ERK)", s, _cfg(base, algorithm="snfs", target=s, distribution="erk", **dst)
            ),
            Cell(
                "GMP (uniform)",
                s,
                _cfg(
                    base,
                    algorithm="magnitude",
                    target=s,
                    distribution="uniform",
                    schedule="polynomial",
                    begin_fraction=0.1,
                    end_fraction=0.6,
                    update_every_steps=every,
                ),
            ),
        ]
        small = _cfg(base, algorithm="dense")
        narrowed = models_lib.narrow_to_params(
            "cnn1d",
            _sparse_param_count(base, s),
            np.zeros((1, 40, 1), np.float32),
            num_classes=10,
        )
        small.model.channels = narrowed.channels
        cells.append(Cell("small dense", s, small))
    return cells


def _dst_claims(results: dict, cols: list) -> list[stats.Claim]:
    claims = []
    for s in cols:
        p = _percent(s)
        r = lambda name, s=s: results[(name, s)]  # noqa: E731
        claims += [
            stats.at_least(
                f"At {p}, RigL is at least as accurate as SET (Evci et al. 2020)",
                "RigL",
                r("RigL (ERK)"),
                "SET",
                r("SET (ERK)"),
            ),
            stats.better(
                f"At {p}, SET beats a static random mask (ERK)",
                "SET",
                r("SET (ERK)"),
                "static",
                r("static (ERK)"),
            ),
            stats.at_least(
                f"At {p}, ERK is at least as good as uniform for static masks",
                "ERK",
                r("static (ERK)"),
                "uniform",
                r("static (uniform)"),
            ),
            stats.better(
                f"At {p}, the large sparse RigL network beats a small dense one "
                "with as many parameters",
                "RigL",
                r("RigL (ERK)"),
                "small dense",
                r("small dense"),
            ),
        ]
    return claims


def _dst_notes(quick: bool) -> str:
    base = _mnist1d_base(quick)
    return (
        f"MNIST-1D, 1D CNN with {base.model.channels} channels, Adam "
        f"{base.optimizer.learning_rate} with cosine decay, batch {base.batch_size}, "
        f"{base.total_steps} steps. SET/RigL/SNFS update every "
        f"{20 if quick else 100} steps until 75% of training (drop fraction 0.3, "
        "cosine); GMP prunes from 10% to 60% of training with the cubic schedule. "
        "Small dense: the CNN narrowed to at most the sparse model's nonzero count."
    )


# -------------------------------------------------------------------- random_pruning


def _rp_base(quick: bool, width: int) -> ml_collections.ConfigDict:
    config = _mnist1d_base(quick)
    config.model.channels = (8 if quick else 16) * width
    return config


_RP_SPARSITY = 0.9


def _rp_cells(quick: bool) -> list[Cell]:
    cells = []
    for w in [1, 2] if quick else [1, 2, 4]:
        base = _rp_base(quick, w)
        cells += [
            Cell("dense", w, _cfg(base, algorithm="dense")),
            Cell(
                "random ERK",
                w,
                _cfg(base, algorithm="static", target=_RP_SPARSITY, distribution="erk"),
            ),
            Cell(
                "random uniform",
                w,
                _cfg(base, algorithm="static", target=_RP_SPARSITY, distribution="uniform"),
            ),
        ]
    return cells


def _rp_claims(results: dict, cols: list) -> list[stats.Claim]:
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
            stats.at_least(
                f"At width x{w}, random ERK masks are at least as good as uniform ones",
                "ERK",
                results[("random ERK", w)],
                "uniform",
                results[("random uniform", w)],
            )
        )
    return claims


def _rp_notes(quick: bool) -> str:
    base = _rp_base(quick, 1)
    return (
        f"MNIST-1D 1D CNN of width x1 = {base.model.channels} channels, random static masks at "
        f"{_percent(_RP_SPARSITY)} sparsity, {base.total_steps} steps of Adam. "
        "Columns: width multiplier."
    )


# ------------------------------------------------------------------ pruning_at_init


def _pai_cells(quick: bool) -> list[Cell]:
    base = _mnist1d_base(quick)
    cells = []
    for s in [0.99] if quick else [0.9, 0.99, 0.999]:
        rounds = 10 if quick else 100
        cells += [
            Cell("SNIP", s, _cfg(base, algorithm="snip", target=s, distribution="global")),
            Cell("GraSP", s, _cfg(base, algorithm="grasp", target=s, distribution="global")),
            Cell(
                "SynFlow",
                s,
                _cfg(base, algorithm="synflow", target=s, rounds=rounds, distribution="global"),
            ),
            Cell(
                "magnitude at init",
                s,
                _cfg(
                    base,
                    algorithm="magnitude",
                    schedule="one_shot",
                    begin_step=0,
                    target=s,
                    distribution="global",
                ),
            ),
            Cell("random", s, _cfg(base, algorithm="static", target=s, distribution="uniform")),
            Cell(
                "magnitude after training",
                s,
                _cfg(
                    base,
                    algorithm="magnitude",
                    target=s,
                    distribution="global",
                    schedule="one_shot",
                    begin_fraction=0.5,
                ),
            ),
        ]
    return cells


def _pai_claims(results: dict, cols: list) -> list[stats.Claim]:
    claims = []
    extreme = cols[-1]
    collapsed = results.get(("SynFlow", extreme, "collapsed"), [])
    claims.append(
        stats.Claim(
            f"SynFlow avoids layer collapse at {_percent(extreme)}: every layer keeps a weight "
            "in every seed (Tanaka et al. 2020)",
            bool(len(collapsed)) and max(collapsed) == 0,
            "collapsed layers per seed: "
            + ", ".join(
                f"{name} {results.get((name, extreme, 'collapsed'))}"
                for name in ("SNIP", "GraSP", "SynFlow", "magnitude at init")
            ),
        )
    )
    for s in cols:
        for name in ("SNIP", "GraSP", "SynFlow"):
            claims.append(
                stats.at_least(
                    f"At {_percent(s)}, {name} is at least as good as random pruning",
                    name,
                    results[(name, s)],
                    "random",
                    results[("random", s)],
                )
            )
    s = cols[0]
    best_pai = max(("SNIP", "GraSP", "SynFlow"), key=lambda n: np.mean(results[(n, s)]))
    claims.append(
        stats.at_least(
            f"At {_percent(s)}, pruning after training is at least as good as the best "
            "method at initialization (Frankle et al. 2021)",
            "after training",
            results[("magnitude after training", s)],
            best_pai,
            results[(best_pai, s)],
        )
    )
    return claims


def _pai_notes(quick: bool) -> str:
    base = _mnist1d_base(quick)
    return (
        f"MNIST-1D 1D CNN ({base.model.channels} channels), {base.total_steps} steps of Adam. "
        "SNIP, GraSP (temperature 200), SynFlow "
        f"({10 if quick else 100} rounds, exponential schedule) and magnitude at init prune "
        "globally once before training and keep the mask fixed; random is a uniform random "
        "mask; 'after training' trains dense for half the steps, prunes by global magnitude "
        "and fine-tunes for the other half."
    )


# -------------------------------------------------------------------------- lottery


def _lottery_config(quick: bool) -> tuple[ml_collections.ConfigDict, int]:
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


def _lottery_run(quick, seeds, dataset, workdir, progress) -> TableRun:
    config, rounds = _lottery_config(quick)
    record = lottery.run_imp(
        config, seeds, rounds=rounds, dataset=dataset, workdir=workdir, progress=progress
    )
    cols = record["sparsity"]
    rows = ["ticket", "reinit", "random"]
    results = {(row, s): accs for row in rows for s, accs in zip(cols, record[row], strict=True)}
    return TableRun(rows, cols, results, {})


def _lottery_claims(results: dict, cols: list) -> list[stats.Claim]:
    claims = []
    for s in cols[1:]:
        if s < 0.8 and s != cols[-1]:
            continue
        claims += [
            stats.better(
                f"At {_percent(round(s, 3))}, the winning ticket beats the same mask with a new "
                "initialization (Frankle & Carbin 2019)",
                "ticket",
                results[("ticket", s)],
                "reinit",
                results[("reinit", s)],
            ),
            stats.better(
                f"At {_percent(round(s, 3))}, the winning ticket beats a random mask",
                "ticket",
                results[("ticket", s)],
                "random mask",
                results[("random", s)],
            ),
        ]
    return claims


def _lottery_notes(quick: bool) -> str:
    config, rounds = _lottery_config(quick)
    return (
        f"MNIST-1D residual MLP 40-{config.model.features}-{config.model.features}-10, Adam "
        f"{config.optimizer.learning_rate} (constant), batch {config.batch_size}, "
        f"{config.total_steps} steps per round, {rounds} rounds removing 20% of each layer's "
        "surviving weights by magnitude and rewinding to the initialization. Controls at each "
        "round's sparsity: the ticket's masks with a fresh initialization, and random masks "
        "with the same per-layer density."
    )


# --------------------------------------------------------------------------- tensor

# (row label, format name in experiments.models)
_TENSOR_FORMATS = (
    ("low-rank matrix", "low_rank"),
    ("CP", "cp"),
    ("Tucker", "tucker"),
    ("TT-matrix", "tt_matrix"),
    ("tubal", "tubal"),
)
_TENSOR_QUICK_ROWS = ("low-rank matrix (scratch)", "TT-matrix (scratch)", "TT-matrix (fine-tuned)")
_SCRATCH, _FINETUNED = "scratch", "fine-tuned"
_DECOMPOSED = "test accuracy right after decomposition, before fine-tuning (%, mean ± 95% CI)"


def _tensor_width(quick: bool) -> int:
    return 64 if quick else 256


def _tensor_shapes(fmt: str, width: int) -> dict[str, tuple[int, ...]]:
    """How hidden_1's (width, width) kernel is tensorized for each format."""
    side = math.isqrt(width)
    if fmt in ("cp", "tucker"):  # a 4-way (side, side, side, side) tensor
        return {"in_shape": (side, side), "out_shape": (side, side)}
    if fmt == "tt_matrix":  # 3 cores, (4, 8, 8) x (4, 8, 8) for 256
        shape = tensornets.balanced_factors(width, 3)
        return {"in_shape": shape, "out_shape": shape}
    if fmt == "tubal":  # tubes of length 8 (4 in quick mode): n1 = n2 = width / n3
        n3 = 4 if width < 256 else 8
        return {"in_shape": (width // n3, n3), "out_shape": (width // n3, n3)}
    return {}


def _tensor_dense_config(quick: bool) -> ml_collections.ConfigDict:
    """The dense MLP 40-w-w-10: the 'dense' row and every fine-tuned cell's pretraining."""
    config = get_base_config()
    config.progress_bar = False
    width = _tensor_width(quick)
    config.model = ml_collections.ConfigDict({"name": "mlp", "features": (width, width)})
    config.total_steps = 300 if quick else 3000
    config.eval_every_steps = config.total_steps
    return config


def _tensor_cell_config(quick: bool, fmt: str, budget: float, finetune: bool):
    dense = _tensor_dense_config(quick)
    config = ml_collections.ConfigDict(dense.to_dict())
    entry = {"format": fmt, "rank": budget, **_tensor_shapes(fmt, _tensor_width(quick))}
    config.model.factorize = {"hidden_1": entry}
    if finetune:
        # Lebedev et al. 2015 / Kim et al. 2016: decompose the trained dense layer, then
        # fine-tune the whole network briefly at a lower learning rate.
        config.total_steps = dense.total_steps // 2
        config.eval_every_steps = config.total_steps
        config.optimizer.learning_rate = dense.optimizer.learning_rate / 3
        config.finetune = ml_collections.ConfigDict({"pretrained": dense.to_dict()})
    return config


def _tensor_cells(quick: bool) -> list[Cell]:
    dense = _tensor_dense_config(quick)
    cells = []
    for budget in [0.1] if quick else [0.05, 0.1, 0.25]:
        cells.append(Cell("dense", budget, dense))
        for label, fmt in _TENSOR_FORMATS:
            for mode in (_SCRATCH, _FINETUNED):
                row = f"{label} ({mode})"
                if quick and row not in _TENSOR_QUICK_ROWS:
                    continue
                config = _tensor_cell_config(quick, fmt, budget, mode == _FINETUNED)
                cells.append(Cell(row, budget, config))
    return cells


def _tensor_model(config: ml_collections.ConfigDict):
    return train.make_model(config, num_classes=10)


def _tensor_run(config, seeds, dataset, cache) -> sweep.SweepResult:
    """Trains a cell; a cell with ``finetune`` decomposes its pretrained dense MLP first.

    The dense run is shared through ``cache`` (it is also the 'dense' row). Each
    seed's trained kernel is decomposed with `tensornets.factorize_params` (CP:
    ALS, Tucker: HOOI, TT-matrix: TT-SVD, tubal: projection onto t-product
    operators + truncated t-SVD, low-rank: rank-r CP of the matrix) and the
    factorized MLP is fine-tuned from there. The returned result's first
    evaluation (step 0) is the accuracy right after decomposition.
    """
    if "finetune" not in config:
        return sweep.train_seeds(config, seeds, dataset=dataset, progress=False)
    pretrained = ml_collections.ConfigDict(config.finetune.pretrained.to_dict())
    key = pretrained.to_json()
    if key not in cache:
        cache[key] = sweep.train_seeds(pretrained, seeds, dataset=dataset, progress=False)
    dense_params = cache[key].final_state.params
    spec = models_lib.factorize_spec(config.model.factorize)
    decomposed = [
        tensornets.factorize_params(jax.tree.map(lambda a, i=i: a[i], dense_params), spec)
        for i in range(len(seeds))
    ]
    initial = jax.tree.map(lambda *leaves: jnp.stack(leaves), *decomposed)
    run_config = ml_collections.ConfigDict(config.to_dict())
    del run_config["finetune"]
    model = _tensor_model(run_config)
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
    accuracy = jax.jit(
        jax.vmap(lambda p: jnp.mean(jnp.argmax(model.apply({"params": p}, x_test), -1) == y_test))
    )
    before = np.asarray(accuracy(initial))[:, None]
    result = sweep.train_seeds(
        run_config, seeds, dataset=dataset, initial_params=initial, progress=False
    )
    return result._replace(
        steps=[0, *result.steps],
        test_accuracy=np.concatenate([before, result.test_accuracy], axis=1),
        train_loss=np.concatenate([np.full_like(before, np.nan), result.train_loss], axis=1),
    )


def _tensor_cost(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(model parameters, hidden_1 kernel parameters, forward FLOPs per example).

    FLOPs: 2 per multiply-add plus the bias adds for dense layers (as
    `sparsejax.flops`), `tensornets.factorized_dense_cost` for factorized ones;
    activations are not counted.
    """
    model = _tensor_model(config)
    x = jnp.zeros((1, 40, 1), jnp.float32)
    calls = []

    def record(next_fun, args, kwargs, context):
        layer = (flax.linen.Dense, tensornets.FactorizedDense)
        if context.method_name == "__call__" and isinstance(context.module, layer):
            calls.append((context.module, args[0].shape[-1]))
        return next_fun(*args, **kwargs)

    with flax.linen.intercept_methods(record):
        shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    total = sum(math.prod(p.shape) for p in jax.tree.leaves(shapes))
    hidden = sum(math.prod(p.shape) for k, p in shapes["hidden_1"].items() if k != "bias")
    flops_total = 0
    for layer, n_in in calls:
        if isinstance(layer, tensornets.FactorizedDense):
            flops_total += tensornets.factorized_dense_cost(layer, n_in)["flops"]
        else:
            flops_total += 2 * n_in * layer.features + layer.features * layer.use_bias
    return total, hidden, flops_total


def _tensor_extras(cell: Cell, result: sweep.SweepResult) -> dict:
    quick = cell.config.model.features[0] == _tensor_width(True)
    dense_total, dense_hidden, dense_flops = _tensor_cost(_tensor_dense_config(quick))
    total, hidden, flops_count = _tensor_cost(cell.config)
    out = {
        "hidden_1 kernel parameters (x dense kernel; the budget is an upper bound)": (
            hidden / dense_hidden
        ),
        "model parameters (x dense MLP)": total / dense_total,
        "forward FLOPs per example (x dense MLP)": flops_count / dense_flops,
    }
    if "finetune" in cell.config:
        out[_DECOMPOSED] = result.test_accuracy[:, 0].tolist()
    return out


def _tensor_claims(results: dict, cols: list) -> list[stats.Claim]:
    def r(label, mode, b):
        return results.get((f"{label} ({mode})", b))

    claims = []
    for b in cols:
        tt, lr = r("TT-matrix", _SCRATCH, b), r("low-rank matrix", _SCRATCH, b)
        if tt is not None and lr is not None:
            claims.append(
                stats.at_least(
                    f"At {_percent(b)} of the layer's parameters, a TT-matrix layer trained from "
                    "scratch is at least as accurate as the low-rank matrix baseline "
                    "(Novikov et al. 2015)",
                    "TT-matrix",
                    tt,
                    "low-rank",
                    lr,
                )
            )
    for label, _ in _TENSOR_FORMATS:
        for b in cols:
            ft, sc = r(label, _FINETUNED, b), r(label, _SCRATCH, b)
            if ft is None or sc is None:
                continue
            claims.append(
                stats.at_least(
                    f"At {_percent(b)}, {label} decomposed from the trained dense layer and "
                    "fine-tuned is at least as accurate as the same layer trained from scratch "
                    "(Lebedev et al. 2015; Kim et al. 2016)",
                    "fine-tuned",
                    ft,
                    "scratch",
                    sc,
                )
            )
    b = cols[0]
    for label, _ in _TENSOR_FORMATS:
        ft = r(label, _FINETUNED, b)
        before = results.get((f"{label} ({_FINETUNED})", b, _DECOMPOSED))
        if ft is None or before is None:
            continue
        claims.append(
            stats.better(
                f"At {_percent(b)}, fine-tuning recovers accuracy lost by decomposing {label}: "
                "fine-tuned beats decomposed-only (Lebedev et al. 2015)",
                "fine-tuned",
                ft,
                "decomposed",
                before,
            )
        )
    low, high = cols[0], cols[-1]
    if low != high:
        claims.append(
            stats.better(
                f"TT-matrix accuracy grows with the parameter budget: {_percent(high)} beats "
                f"{_percent(low)}, from scratch (Novikov et al. 2015, accuracy vs TT-rank)",
                _percent(high),
                r("TT-matrix", _SCRATCH, high),
                _percent(low),
                r("TT-matrix", _SCRATCH, low),
            )
        )
    return claims


def _tensor_notes(quick: bool) -> str:
    dense = _tensor_dense_config(quick)
    w = _tensor_width(quick)
    shapes = {fmt: _tensor_shapes(fmt, w) for _, fmt in _TENSOR_FORMATS}
    return (
        f"MNIST-1D MLP 40-{w}-{w}-10 (ReLU), Adam {dense.optimizer.learning_rate} with cosine "
        f"decay, batch {dense.batch_size}. Only hidden_1's {w}x{w} kernel is factorized (the "
        "layer that holds most of the parameters); columns are its budget as a fraction of the "
        "dense kernel's entries, and each format takes the largest uniform rank within it "
        "(float ranks of `experiments.models`; the realized fractions are below). Formats: "
        "low-rank matrix W = U diag(w) V^T (a 2-factor CP); CP and Tucker of W reshaped to "
        f"{shapes['cp']['in_shape'] + shapes['cp']['out_shape']}; TT-matrix (Novikov et al. "
        f"2015) with row modes {shapes['tt_matrix']['in_shape']} and column modes "
        f"{shapes['tt_matrix']['out_shape']}; tubal: a t-product layer (Newman et al. 2018) "
        f"with tube length {shapes['tubal']['in_shape'][1]}, W (n1, n2, n3) = "
        f"({w // shapes['tubal']['in_shape'][1]}, {w // shapes['tubal']['in_shape'][1]}, "
        f"{shapes['tubal']['in_shape'][1]}) as a truncated t-SVD, i.e. a block-circulant kernel. "
        f"Scratch: {dense.total_steps} steps from the variance-preserving init. Fine-tuned: the "
        f"dense MLP ({dense.total_steps} steps, the 'dense' row) decomposed per seed (CP: ALS, "
        "Tucker: HOOI, TT: TT-SVD, tubal: projection onto t-product operators then t-SVD), then "
        f"{dense.total_steps // 2} steps of Adam {dense.optimizer.learning_rate / 3:g} (cosine), "
        f"so a fine-tuned cell has seen {dense.total_steps + dense.total_steps // 2} steps in "
        "all (the papers' protocol, not equal compute). A tubal layer can only hold the "
        "block-circulant part of a dense kernel (about 1/n3 of an unstructured kernel's "
        "energy), so its accuracy right after decomposition stays low even at full tubal rank. "
        "FLOPs per example count a multiply-add as 2 plus bias adds, the factorized contraction "
        "along its optimal path (or reconstruct-then-matmul when cheaper), and the tubal "
        "layer's FFTs at 2.5 n log2 n; at these ranks CP, TT-matrix and tubal contractions cost "
        "more than the dense layer they replace (an inference server could rebuild W once)."
    )


TABLES: dict[str, Table] = {
    "dst": Table(
        "dst",
        "Dynamic sparse training vs static masks, pruning and small dense (Evci et al. 2020)",
        "sparsity",
        _percent,
        _dst_cells,
        _dst_claims,
        _dst_notes,
    ),
    "random_pruning": Table(
        "random_pruning",
        "Random pruning gets closer to dense as width grows (Liu et al. 2022)",
        "width multiplier",
        lambda w: f"x{w:g}",
        _rp_cells,
        _rp_claims,
        _rp_notes,
    ),
    "pruning_at_init": Table(
        "pruning_at_init",
        "Pruning at initialization: SNIP, GraSP, SynFlow vs random and pruning after training",
        "sparsity",
        _percent,
        _pai_cells,
        _pai_claims,
        _pai_notes,
    ),
    "lottery": Table(
        "lottery",
        "Lottery tickets: IMP with rewinding vs reinitialization vs random masks",
        "sparsity",
        lambda s: f"{100 * s:.1f}%",
        lambda quick: [],
        _lottery_claims,
        _lottery_notes,
        run_all=_lottery_run,
    ),
    "tensor": Table(
        "tensor",
        "Tensor-network layers at equal parameter budgets, from scratch and decomposed then "
        "fine-tuned",
        "hidden_1 parameter budget",
        _percent,
        _tensor_cells,
        _tensor_claims,
        _tensor_notes,
        run=_tensor_run,
        extras=_tensor_extras,
    ),
}


def _collapsed_layers(result: sweep.SweepResult) -> list[int]:
    dens = np.stack(list(result.layer_density.values()), axis=1)  # [seeds, layers]
    return (dens == 0).sum(axis=1).astype(int).tolist()


def _dense_flops(channels: int) -> float:
    """Forward FLOPs of one example through the dense CNN1D of ``channels``."""
    model = models_lib.get_model("cnn1d", num_classes=10, channels=channels)
    x = np.zeros((1, 40, 1), np.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    return flops.inference_flops(flops.layer_flops(model.apply, params, x))["total"]


def _flops_ratio(config: ml_collections.ConfigDict, result: sweep.SweepResult, base_flops) -> tuple:
    """(inference, training) FLOPs of seed 0's final network relative to the dense base model."""
    model = train.make_model(config, num_classes=10)
    x = np.zeros((1, 40, 1), np.float32)
    params = jax.tree.map(lambda a: a[0], result.final_state.params)
    layers = flops.layer_flops(model.apply, {"params": params}, x)
    masks_tree = jax.tree.map(
        lambda m: None if m is None else m[0],
        result.final_state.opt_state.masks,
        is_leaf=lambda v: v is None,
    )
    f_s = flops.inference_flops(layers, masks_tree)["total"]
    f_d = base_flops
    algo = config.sparsity.algorithm
    kwargs = {}
    if algo == "rigl":
        kwargs["update_every_steps"] = config.sparsity.update_every_steps
    if algo == "magnitude":
        a = algorithms.from_config(config.sparsity, config.total_steps)
        schedule = a.sparsity_schedule()
        steps = np.arange(config.total_steps)
        fractions = np.asarray(jax.vmap(schedule.sparsity)(steps)) / a.sparsity
        kwargs["sparsity_fraction_by_step"] = lambda t: fractions[t]
        kwargs["total_steps"] = config.total_steps
    own_dense = flops.inference_flops(layers)["dense_total"]
    train_flops = flops.training_flops(f_s, own_dense, algo, **kwargs)
    return f_s / f_d, train_flops / (3 * f_d)


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
        base_flops = _dense_flops(_mnist1d_base(quick).model.channels)
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
            if name == "dst":
                inf, tr = _flops_ratio(cell.config, result, base_flops)
                extra_rows.setdefault("inference FLOPs (x dense)", {})[(cell.row, cell.col)] = inf
                extra_rows.setdefault("training FLOPs (x dense)", {})[(cell.row, cell.col)] = tr
            for title, value in (table.extras(cell, result) if table.extras else {}).items():
                extra_rows.setdefault(title, {})[(cell.row, cell.col)] = value
                results[(cell.row, cell.col, title)] = value
    claims = table.claims(results, cols)
    elapsed = time.time() - start
    markdown = _markdown(table, rows, cols, results, claims, seeds, quick, elapsed, extra_rows)
    with open(os.path.join(workdir, f"{name}.md"), "w") as f:
        f.write(markdown)
    _plot(table, rows, cols, results, os.path.join(workdir, f"{name}.png"), seeds)
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
    return {"markdown": markdown, "claims": claims, "results": results}


def _command(name: str, seeds: int, quick: bool) -> str:
    cmd = f"python -m experiments.reproduce --table={name} --workdir=runs/tables --seeds={seeds}"
    return cmd + (" --quick" if quick else "")


def _markdown(table, rows, cols, results, claims, seeds, quick, elapsed, extra_rows) -> str:
    header = "| method | " + " | ".join(table.col_format(c) for c in cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    lines = [
        f"# {table.name}: {table.title}",
        "",
        f"Command: `{_command(table.name, seeds, quick)}` ({elapsed / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores{', quick mode' if quick else ''}).",
        "",
        table.notes(quick),
        "",
        f"{table.metric}, mean ± 95% CI over {seeds} seeds; columns: {table.col_label}.",
        "",
        header,
        rule,
    ]
    for row in rows:
        cells = [
            stats.fmt(results[(row, c)], scale=table.scale) if (row, c) in results else ""
            for c in cols
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for title, values in extra_rows.items():
        caption = (
            f"{title}, seed 0's final masks (Evci et al. 2020 accounting)"
            if table.name == "dst"
            else title
        )
        lines += ["", f"{caption}:", "", header, rule]
        show = lambda v: (  # noqa: E731
            stats.fmt(v, scale=table.scale) if isinstance(v, list) else f"{v:.3f}"
        )
        for row in (row for row in rows if any((row, c) in values for c in cols)):
            cells = [show(values[(row, c)]) if (row, c) in values else "" for c in cols]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "## Claims", ""]
    lines += [f"- {c.line()}" for c in claims]
    return "\n".join(lines) + "\n"


def _plot(table, rows, cols, results, path, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(rows) > 10:
        # The default cycle repeats after 10 colors; tab20 has 20, in pairs of one hue, so
        # rows 2k+1 and 2k+2 (e.g. one method from scratch and fine-tuned) share a hue.
        ax.set_prop_cycle(color=plt.cm.tab20((np.arange(len(rows)) + 1) % 20))
    positions = np.arange(len(cols))
    for row in rows:
        pts = [
            (i, *stats.mean_ci(results[(row, c)]))
            for i, c in enumerate(cols)
            if (row, c) in results
        ]
        if not pts:
            continue
        xs, means, halves = zip(*pts, strict=True)
        halves = [0.0 if math.isnan(h) else h for h in halves]
        ax.errorbar(
            xs,
            table.scale * np.array(means),
            yerr=table.scale * np.array(halves),
            marker="o",
            capsize=3,
            label=row,
        )
    ax.set_xticks(positions, [table.col_format(c) for c in cols])
    ax.set_xlabel(table.col_label)
    ax.set_ylabel(table.metric)
    if table.scale == 100.0:
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, 0.0), min(high, 100.0))
    ax.set_title(f"{table.name}: mean ± 95% CI over {seeds} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _load_table_modules() -> None:
    """Imports every module of `experiments.tables`; each registers its tables."""
    import importlib
    import pkgutil

    from experiments import tables as table_pkg

    for info in pkgutil.iter_modules(table_pkg.__path__):
        importlib.import_module(f"{table_pkg.__name__}.{info.name}")


if __name__ == "__main__":
    # Under `python -m experiments.reproduce` this module is __main__; the table modules
    # import `experiments.reproduce`, which would load a second copy (its own TABLES, and
    # the flags below defined twice). Make that name refer to this module.
    sys.modules.setdefault("experiments.reproduce", sys.modules[__name__])
_load_table_modules()

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
