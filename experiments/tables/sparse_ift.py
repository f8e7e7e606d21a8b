"""Table ``sparse_ift``: dense vs the four Sparse Iso-FLOP Transformations (and SLTrain).

    python -m experiments.reproduce --table=sparse_ift --workdir=runs/tables --seeds=3

Every row costs the dense MLP's inference FLOPs (checked per cell in an extra
table); see `experiments.sparse_ift` for the transformations and the accounting.
"""

from __future__ import annotations

import jax
import ml_collections

from configs.base import get_base_config
from experiments import models as models_lib
from experiments import sparse_ift, stats, sweep
from experiments.tables import base
from sparsejax import transforms

# (row label, family)
_ROWS = (
    ("dense", "dense"),
    ("Sparse Wide", "wide"),
    ("Sparse Parallel", "parallel"),
    ("Sparse Factorized", "factorized"),
    ("Sparse Doped", "doped"),
    ("SLTrain (doped, fixed random support)", "sltrain"),
)
_FLOPS = "inference FLOPs per example (x dense), seed 0's final masks"
_PARAMS = "parameters used (x dense), seed 0's final masks"


def _features(quick: bool) -> tuple[int, ...]:
    return (32, 32, 32) if quick else (128, 128, 128)


def _config(quick: bool, family: str, sparsity: float) -> ml_collections.ConfigDict:
    config = get_base_config()
    config.progress_bar = False
    config.model = ml_collections.ConfigDict(
        {
            "name": "sparse_ift_mlp",
            "features": _features(quick),
            "family": family,
            "sparsity": 0.0 if family == "dense" else sparsity,
        }
    )
    config.total_steps = 200 if quick else 3000
    config.eval_every_steps = config.total_steps
    if family in ("dense", "sltrain"):  # SLTrain's support lives inside the layer
        config.sparsity = ml_collections.ConfigDict({"algorithm": "dense"})
    else:
        config.sparsity = ml_collections.ConfigDict(
            {
                "algorithm": "rigl",
                "target": sparsity,
                "distribution": "uniform",
                "keep_dense": sparse_ift.KEEP_DENSE,
                "update_every_steps": 20 if quick else 100,
                "end_fraction": 0.75,
                "drop_fraction": 0.3,
            }
        )
    return config


_QUICK_ROWS = ("dense", "Sparse Wide", "SLTrain (doped, fixed random support)")


def _cells(quick: bool) -> list[base.Cell]:
    cells = []
    for s in [0.75] if quick else [0.5, 0.75, 0.9]:
        for label, family in _ROWS:
            if quick and label not in _QUICK_ROWS:
                continue
            cells.append(base.Cell(label, s, _config(quick, family, s)))
    return cells


def _extras(cell: base.Cell, result: sweep.SweepResult) -> dict:
    """FLOPs and parameters of seed 0's final model relative to the dense model."""
    x = sparse_ift.example_input()
    model = models_lib.make_model(cell.config, num_classes=10)
    params = jax.tree.map(lambda a: a[0], result.final_state.params)
    masks = jax.tree.map(
        lambda m: None if m is None else m[0],
        transforms.get_masks(result.final_state.opt_state),
        is_leaf=lambda v: v is None,
    )
    dense_model = sparse_ift.SparseIFTMLP(features=tuple(cell.config.model.features))
    dense_params = jax.eval_shape(lambda: dense_model.init(jax.random.key(0), x))["params"]
    dense_flops = sparse_ift.model_flops(dense_model, dense_params, x)["total"]
    flops = sparse_ift.model_flops(model, params, x, masks)["total"]
    used = sparse_ift.num_nonzero_params(params, masks)
    return {
        _FLOPS: flops / dense_flops,
        _PARAMS: used / sparse_ift.num_nonzero_params(dense_params),
    }


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    claims = []
    pct = base.percent
    for s in cols:
        dense = results[("dense", s)]
        claims.append(
            stats.better(
                f"At {pct(s)} sparsity and the dense model's FLOPs, Sparse Wide beats dense "
                "(Thangarasa et al. 2023)",
                "Sparse Wide",
                results[("Sparse Wide", s)],
                "dense",
                dense,
            )
        )
        for label in ("Sparse Parallel", "Sparse Factorized", "Sparse Doped"):
            if (label, s) not in results:  # quick mode runs a subset of the rows
                continue
            claims.append(
                stats.at_least(
                    f"At {pct(s)}, {label} is at least as accurate as dense at equal FLOPs",
                    label,
                    results[(label, s)],
                    "dense",
                    dense,
                )
            )
    claims += base.grows(
        results,
        cols,
        "Sparse Wide",
        "Sparse Wide gains with sparsity: {high} beats {low} at equal FLOPs "
        "(the paper's accuracy grows with sparsity)",
    )
    high = cols[-1]
    if ("Sparse Doped", high) not in results:
        return claims
    claims.append(
        stats.at_least(
            f"At {pct(high)}, SLTrain's fixed random support is at least as good as Sparse "
            "Doped's RigL-trained support (Han et al. 2024: a random fixed support suffices)",
            "SLTrain",
            results[("SLTrain (doped, fixed random support)", high)],
            "Sparse Doped",
            results[("Sparse Doped", high)],
        )
    )
    return claims


def _notes(quick: bool) -> str:
    config = _config(quick, "wide", 0.5)
    w = _features(quick)
    rigl = config.sparsity
    return (
        f"MNIST-1D MLP 40-{'-'.join(map(str, w))}-10 (ReLU), Adam "
        f"{config.optimizer.learning_rate} with cosine decay, batch {config.batch_size}, "
        f"{config.total_steps} steps. The stem (40 -> {w[0]}) and the head stay dense; the "
        f"{len(w) - 1} hidden-to-hidden layers are replaced by each Sparse-IFT family at "
        "columns' sparsity s, with the largest width / branch count / inner width / rank whose "
        "FLOPs fit the dense layer's (Sparse Wide: the largest width multiplier whose whole "
        "model, widened dense stem and head included, fits the dense model's FLOPs). Sparse "
        f"kernels: RigL with a uniform distribution (update every {rigl.update_every_steps} "
        "steps until 75% of training, drop fraction 0.3, cosine), so every layer keeps its "
        "nonzero count and the inference FLOPs stay iso throughout (RigL's occasional dense "
        "gradient makes training FLOPs slightly higher). Sparse Doped's low-rank part is a "
        "dense rank-r `tensornets.FactorizedDense` (2-factor CP); the SLTrain row is the same "
        "low rank plus sparse structure with `tensornets.sltrain.SLTrainDense` (fixed random "
        "support, B = 0 at init, alpha = r), trained densely."
    )


TABLE = base.register(
    base.Table(
        "sparse_ift",
        "Sparse Iso-FLOP Transformations: dense vs Sparse Wide / Parallel / Factorized / Doped "
        "at the dense model's FLOPs (Thangarasa et al. 2023)",
        "sparsity",
        lambda s: f"{100 * s:g}%",
        _cells,
        _claims,
        _notes,
        extras=_extras,
    )
)
