"""The ``dst`` table: dynamic sparse training vs static masks, pruning and small dense.

    python -m experiments.reproduce --table=dst --workdir=runs/tables --seeds=5

Rows: dense, static random masks (uniform, ERK), SET, RigL, SNFS, gradual magnitude
pruning and a dense CNN narrowed to the sparse model's nonzero count, at 80/90/95%
sparsity on MNIST-1D (Evci et al. 2020, "Rigging the Lottery"). Extra tables give the
inference and training FLOPs of seed 0's final masks relative to the dense model, with
the paper's appendix accounting (`sparsejax.flops`).
"""

from __future__ import annotations

import functools
import math

import jax
import ml_collections
import numpy as np

from experiments import models as models_lib
from experiments import stats, sweep
from experiments.tables import base
from sparsejax import algorithms, distributions, flops

_INFERENCE = "inference FLOPs (x dense), seed 0's final masks (Evci et al. 2020 accounting)"
_TRAINING = "training FLOPs (x dense), seed 0's final masks (Evci et al. 2020 accounting)"


def _every(quick: bool) -> int:
    return 20 if quick else 100


def _sparse_param_count(config: ml_collections.ConfigDict, sparsity: float) -> int:
    """Nonzeros of the model in ``config`` with its kernels at ``sparsity`` (biases dense)."""
    model = models_lib.make_model(config, num_classes=10)
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


def _cells(quick: bool) -> list[base.Cell]:
    config = base.mnist1d_base(quick)
    every = _every(quick)
    dst = {"update_every_steps": every, "end_fraction": 0.75}
    cfg = functools.partial(base.with_sparsity, config)
    cells = []
    for s in [0.9] if quick else [0.8, 0.9, 0.95]:
        cells += [
            base.Cell("dense", s, cfg(algorithm="dense")),
            base.Cell(
                "static (uniform)", s, cfg(algorithm="static", target=s, distribution="uniform")
            ),
            base.Cell("static (ERK)", s, cfg(algorithm="static", target=s, distribution="erk")),
            base.Cell("SET (ERK)", s, cfg(algorithm="set", target=s, distribution="erk", **dst)),
            base.Cell("RigL (ERK)", s, cfg(algorithm="rigl", target=s, distribution="erk", **dst)),
            base.Cell("SNFS (ERK)", s, cfg(algorithm="snfs", target=s, distribution="erk", **dst)),
            base.Cell(
                "GMP (uniform)",
                s,
                cfg(
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
        small = cfg(algorithm="dense")
        narrowed = models_lib.narrow_to_params(
            "cnn1d",
            _sparse_param_count(config, s),
            np.zeros((1, 40, 1), np.float32),
            num_classes=10,
        )
        small.model.channels = narrowed.channels
        cells.append(base.Cell("small dense", s, small))
    return cells


@functools.cache
def _dense_flops(channels: int) -> float:
    """Forward FLOPs of one example through the dense CNN1D of ``channels``."""
    model = models_lib.get_model("cnn1d", num_classes=10, channels=channels)
    x = np.zeros((1, 40, 1), np.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    return flops.inference_flops(flops.layer_flops(model.apply, params, x))["total"]


def _flops_ratio(config: ml_collections.ConfigDict, result: sweep.SweepResult, base_flops) -> tuple:
    """(inference, training) FLOPs of seed 0's final network relative to the dense base model."""
    model = models_lib.make_model(config, num_classes=10)
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


def _extras(cell: base.Cell, result: sweep.SweepResult) -> dict:
    """Seed 0's inference and training FLOPs relative to the dense CNN of the table's base width."""
    # Every cell but 'small dense' has the base width, so the base is told apart by its
    # step count, the one setting quick mode changes that no cell overrides.
    quick = cell.config.total_steps == base.mnist1d_base(True).total_steps
    dense = _dense_flops(base.mnist1d_base(quick).model.channels)
    inference, training = _flops_ratio(cell.config, result, dense)
    return {_INFERENCE: inference, _TRAINING: training}


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    claims = []
    for s in cols:
        p = base.percent(s)
        claims += [
            base.compare(
                results,
                s,
                f"At {p}, RigL is at least as accurate as SET (Evci et al. 2020)",
                ("RigL", "RigL (ERK)"),
                ("SET", "SET (ERK)"),
            ),
            base.compare(
                results,
                s,
                f"At {p}, SET beats a static random mask (ERK)",
                ("SET", "SET (ERK)"),
                ("static", "static (ERK)"),
                strict=True,
            ),
            base.compare(
                results,
                s,
                f"At {p}, ERK is at least as good as uniform for static masks",
                ("ERK", "static (ERK)"),
                ("uniform", "static (uniform)"),
            ),
            base.compare(
                results,
                s,
                f"At {p}, the large sparse RigL network beats a small dense one "
                "with as many parameters",
                ("RigL", "RigL (ERK)"),
                ("small dense", "small dense"),
                strict=True,
            ),
        ]
    return claims


def _notes(quick: bool) -> str:
    config = base.mnist1d_base(quick)
    return (
        f"MNIST-1D, 1D CNN with {config.model.channels} channels, Adam "
        f"{config.optimizer.learning_rate} with cosine decay, batch {config.batch_size}, "
        f"{config.total_steps} steps. SET/RigL/SNFS update every "
        f"{_every(quick)} steps until 75% of training (drop fraction 0.3, "
        "cosine); GMP prunes from 10% to 60% of training with the cubic schedule. "
        "Small dense: the CNN narrowed to at most the sparse model's nonzero count."
    )


TABLE = base.register(
    base.Table(
        "dst",
        "Dynamic sparse training vs static masks, pruning and small dense (Evci et al. 2020)",
        "sparsity",
        base.percent,
        _cells,
        _claims,
        _notes,
        extras=_extras,
    )
)
