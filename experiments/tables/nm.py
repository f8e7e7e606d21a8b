"""The ``nm`` table: N:M structured sparse training methods at 2:4, 1:4 and 1:8 on MNIST-1D.

    python -m experiments.reproduce --table=nm --workdir=runs/tables --seeds=3

Rows: dense, one-shot N:M pruning + fine-tuning, STE, SR-STE, S-STE, Bi-Mask, and
the two decaying recipes of Bambhaniya et al. 2024 (mask decay, structure
decay). Besides test accuracy, the mask flip rate (sparse architecture
divergence, Zhou et al. 2021) of every straight-through method is reported.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from configs.base import get_base_config
from experiments import stats, sweep
from experiments.tables.base import Cell, Table, register
from sparsejax import algorithms

# column value (the N:M sparsity) -> (n, m)
_PATTERNS = {0.5: (2, 4), 0.75: (1, 4), 0.875: (1, 8)}
_FLIPS = (
    "mask flip rate: per mille (‰) of the masked weights whose mask changes in a step, "
    "mean over training (mean ± 95% CI over seeds)"
)
_DECAY_END = 0.5  # the decaying recipes reach plain N:M at half of training


def _pattern(col: float) -> str:
    n, m = _PATTERNS[col]
    return f"{n}:{m}"


def _base(quick: bool) -> ml_collections.ConfigDict:
    config = get_base_config()
    config.progress_bar = False
    width = 64 if quick else 256
    config.model = ml_collections.ConfigDict({"name": "mlp", "features": (width, width)})
    config.total_steps = 150 if quick else 1500
    config.eval_every_steps = config.total_steps
    return config


def _cfg(base: ml_collections.ConfigDict, **sparsity) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    config.sparsity = ml_collections.ConfigDict(sparsity)
    return config


def _rows(n: int, m: int) -> dict[str, dict]:
    decay = {"algorithm": "nm_decay", "n": n, "m": m, "end_fraction": _DECAY_END}
    return {
        "dense": {"algorithm": "dense"},
        "one-shot N:M + fine-tune": {
            "algorithm": "nm_oneshot",
            "n": n,
            "m": m,
            "begin_fraction": 0.5,
        },
        "STE": {"algorithm": "nm_ste", "n": n, "m": m},
        "SR-STE": {"algorithm": "sr_ste", "n": n, "m": m, "lambda_w": 2e-4},
        "S-STE": {"algorithm": "s_ste", "n": n, "m": m},
        "Bi-Mask": {"algorithm": "bimask", "n": n, "m": m},
        "mask decay (MDGF-exp)": {**decay, "decay_schedule": "mask_exponential"},
        "structure decay (SDGF)": {**decay, "decay_schedule": "structure"},
    }


_QUICK_ROWS = ("dense", "STE", "SR-STE", "mask decay (MDGF-exp)")


def _cells(quick: bool) -> list[Cell]:
    base = _base(quick)
    cells = []
    for col in [0.875] if quick else list(_PATTERNS):
        for row, sparsity in _rows(*_PATTERNS[col]).items():
            if quick and row not in _QUICK_ROWS:
                continue
            cells.append(Cell(row, col, _cfg(base, **sparsity)))
    return cells


def _extras(cell: Cell, result: sweep.SweepResult) -> dict:
    algo = algorithms.from_config(cell.config.sparsity, cell.config.total_steps)
    algo_state = result.final_state.opt_state.algo_state
    metrics = jax.vmap(algo.metrics)(algo_state) if algo_state != () else {}
    if "mask_flip_rate_mean" not in metrics:
        return {}
    # Stored x10 so that the table's percent formatting (x100) shows per mille.
    return {_FLIPS: (10.0 * np.asarray(metrics["mask_flip_rate_mean"])).tolist()}


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    def acc(row, col):
        return results.get((row, col))

    def flips(row, col):
        return results.get((row, col, _FLIPS))

    claims = []
    for col in cols:
        p = _pattern(col)
        pairs = [
            (
                stats.at_least,
                f"At {p}, SR-STE is at least as accurate as STE (Zhou et al. 2021)",
                "SR-STE",
                acc("SR-STE", col),
                "STE",
                acc("STE", col),
            ),
            (
                stats.better,
                f"At {p}, SR-STE flips fewer mask entries per step than STE "
                "(a lower sparse architecture divergence, Zhou et al. 2021)",
                "STE flips",
                flips("STE", col),
                "SR-STE flips",
                flips("SR-STE", col),
            ),
            (
                stats.better,
                f"At {p}, S-STE's continuous pruning flips fewer mask entries than STE "
                "(Hu et al. 2024)",
                "STE flips",
                flips("STE", col),
                "S-STE flips",
                flips("S-STE", col),
            ),
            (
                stats.at_least,
                f"At {p}, Bi-Mask is at least as accurate as STE with one mask (Zhang et al. 2023)",
                "Bi-Mask",
                acc("Bi-Mask", col),
                "STE",
                acc("STE", col),
            ),
        ]
        for fn, sentence, name_a, a, name_b, b in pairs:
            if a is not None and b is not None:
                claims.append(fn(sentence, name_a, a, name_b, b))
    first, last = (cols[0], cols[-1]) if cols else (None, None)
    if acc("SR-STE", 0.5) is not None and acc("dense", 0.5) is not None:
        claims.append(
            stats.at_least(
                "At 2:4, SR-STE is at least as accurate as the dense network (Zhou et al. 2021)",
                "SR-STE",
                acc("SR-STE", 0.5),
                "dense",
                acc("dense", 0.5),
            )
        )
    if acc("SR-STE", 0.5) is not None and acc("one-shot N:M + fine-tune", 0.5) is not None:
        claims.append(
            stats.at_least(
                "At 2:4, N:M training from scratch (SR-STE) is at least as accurate as "
                "one-shot N:M pruning of a dense network + fine-tuning",
                "SR-STE",
                acc("SR-STE", 0.5),
                "one-shot + FT",
                acc("one-shot N:M + fine-tune", 0.5),
            )
        )
    for row in ("mask decay (MDGF-exp)", "structure decay (SDGF)"):
        if acc(row, 0.875) is not None and acc("STE", 0.875) is not None:
            claims.append(
                stats.at_least(
                    f"At 1:8, {row} is at least as accurate as STE (Bambhaniya et al. 2024)",
                    row,
                    acc(row, 0.875),
                    "STE",
                    acc("STE", 0.875),
                )
            )
        if first != last and all(
            acc(r, c) is not None for r in (row, "STE") for c in (first, last)
        ):
            gain_last = np.subtract(acc(row, last), acc("STE", last))
            gain_first = np.subtract(acc(row, first), acc("STE", first))
            claims.append(
                stats.better(
                    f"{row} helps most at high sparsity: its gain over STE is larger at "
                    f"{_pattern(last)} than at {_pattern(first)} (Bambhaniya et al. 2024)",
                    f"gain at {_pattern(last)}",
                    gain_last,
                    f"gain at {_pattern(first)}",
                    gain_first,
                )
            )
    return claims


def _notes(quick: bool) -> str:
    base = _base(quick)
    width = base.model.features[0]
    steps = base.total_steps
    return (
        f"MNIST-1D MLP 40-{width}-{width}-10, Adam {base.optimizer.learning_rate} with cosine "
        f"decay, batch {base.batch_size}, {steps} steps. Every kernel is N:M along its input "
        "axis (biases dense); columns are the pattern. STE: dense weights, the magnitude N:M "
        "mask recomputed every step, straight-through backward. SR-STE: plus the decay "
        "lambda_w = 2e-4 on pruned weights. S-STE: soft-thresholding by the largest pruned "
        "magnitude of each group, per-layer scale frozen at initialization. Bi-Mask: the input "
        "gradient uses a second mask, N:M along the output axis (the 10-way head, whose "
        "width m does not divide, keeps one mask); no row-permutation search. Mask decay: "
        "pruned weights enter the forward pass scaled by 0.5^k over 10 intervals until "
        f"{_DECAY_END:.0%} of training, then 0; structure decay: N goes M -> M/2 -> ... -> n "
        f"in equal stages until {_DECAY_END:.0%} of training. One-shot: dense for half the "
        "steps, one N:M magnitude pruning, fine-tuning with the fixed mask. The flip rate is "
        "the mean over all steps of the fraction of masked weights whose mask changed "
        "(for structure decay it includes the changes of its stages)."
    )


TABLE = register(
    Table(
        "nm",
        "N:M structured sparse training: STE, SR-STE, S-STE, Bi-Mask, decaying masks, one-shot",
        "N:M pattern",
        _pattern,
        _cells,
        _claims,
        _notes,
        extras=_extras,
    )
)
