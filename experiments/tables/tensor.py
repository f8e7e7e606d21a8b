"""The ``tensor`` table: tensor-network layers at equal parameter budgets, scratch vs fine-tuned.

    python -m experiments.reproduce --table=tensor --workdir=runs/tables --seeds=5

An MNIST-1D MLP 40-w-w-10 whose ``hidden_1`` kernel is replaced by a low-rank matrix, CP,
Tucker, TT-matrix (Novikov et al. 2015, "Tensorizing Neural Networks") or tubal t-product
layer (Newman et al. 2018) at 5/10/25% of the dense kernel's entries, each trained from
scratch and decomposed from the trained dense layer then fine-tuned (Lebedev et al. 2015;
Kim et al. 2016). Extra tables give the realized parameter and FLOP ratios and the accuracy
right after decomposition.
"""

from __future__ import annotations

import math

import flax.linen
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import tensornets
from configs.base import get_base_config
from experiments import models as models_lib
from experiments import stats, sweep
from experiments.tables import base

# (row label, format name in experiments.models)
_FORMATS = (
    ("low-rank matrix", "low_rank"),
    ("CP", "cp"),
    ("Tucker", "tucker"),
    ("TT-matrix", "tt_matrix"),
    ("tubal", "tubal"),
)
_QUICK_ROWS = ("low-rank matrix (scratch)", "TT-matrix (scratch)", "TT-matrix (fine-tuned)")
_SCRATCH, _FINETUNED = "scratch", "fine-tuned"
_DECOMPOSED = "test accuracy right after decomposition, before fine-tuning (%, mean ± 95% CI)"


def _width(quick: bool) -> int:
    return 64 if quick else 256


def _shapes(fmt: str, width: int) -> dict[str, tuple[int, ...]]:
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


def _dense_config(quick: bool) -> ml_collections.ConfigDict:
    """The dense MLP 40-w-w-10: the 'dense' row and every fine-tuned cell's pretraining."""
    config = get_base_config()
    config.progress_bar = False
    width = _width(quick)
    config.model = ml_collections.ConfigDict({"name": "mlp", "features": (width, width)})
    config.total_steps = 300 if quick else 3000
    config.eval_every_steps = config.total_steps
    return config


def _cell_config(quick: bool, fmt: str, budget: float, finetune: bool):
    dense = _dense_config(quick)
    config = ml_collections.ConfigDict(dense.to_dict())
    entry = {"format": fmt, "rank": budget, **_shapes(fmt, _width(quick))}
    config.model.factorize = {"hidden_1": entry}
    if finetune:
        # Lebedev et al. 2015 / Kim et al. 2016: decompose the trained dense layer, then
        # fine-tune the whole network briefly at a lower learning rate.
        config.total_steps = dense.total_steps // 2
        config.eval_every_steps = config.total_steps
        config.optimizer.learning_rate = dense.optimizer.learning_rate / 3
        config.finetune = ml_collections.ConfigDict({"pretrained": dense.to_dict()})
    return config


def _cells(quick: bool) -> list[base.Cell]:
    dense = _dense_config(quick)
    cells = []
    for budget in [0.1] if quick else [0.05, 0.1, 0.25]:
        cells.append(base.Cell("dense", budget, dense))
        for label, fmt in _FORMATS:
            for mode in (_SCRATCH, _FINETUNED):
                row = f"{label} ({mode})"
                if quick and row not in _QUICK_ROWS:
                    continue
                config = _cell_config(quick, fmt, budget, mode == _FINETUNED)
                cells.append(base.Cell(row, budget, config))
    return cells


def _model(config: ml_collections.ConfigDict):
    return models_lib.make_model(config, num_classes=10)


def _run(config, seeds, dataset, cache) -> sweep.SweepResult:
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
    model = _model(run_config)
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


def _cost(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(model parameters, hidden_1 kernel parameters, forward FLOPs per example).

    FLOPs: 2 per multiply-add plus the bias adds for dense layers (as
    `sparsejax.flops`), `tensornets.factorized_dense_cost` for factorized ones;
    activations are not counted.
    """
    model = _model(config)
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


def _extras(cell: base.Cell, result: sweep.SweepResult) -> dict:
    quick = cell.config.model.features[0] == _width(True)
    dense_total, dense_hidden, dense_flops = _cost(_dense_config(quick))
    total, hidden, flops_count = _cost(cell.config)
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


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    def r(label, mode, b):
        return results.get((f"{label} ({mode})", b))

    claims = []
    for b in cols:
        tt, lr = r("TT-matrix", _SCRATCH, b), r("low-rank matrix", _SCRATCH, b)
        if tt is not None and lr is not None:
            claims.append(
                stats.at_least(
                    f"At {base.percent(b)} of the layer's parameters, a TT-matrix layer trained "
                    "from scratch is at least as accurate as the low-rank matrix baseline "
                    "(Novikov et al. 2015)",
                    "TT-matrix",
                    tt,
                    "low-rank",
                    lr,
                )
            )
    for label, _ in _FORMATS:
        for b in cols:
            ft, sc = r(label, _FINETUNED, b), r(label, _SCRATCH, b)
            if ft is None or sc is None:
                continue
            claims.append(
                stats.at_least(
                    f"At {base.percent(b)}, {label} decomposed from the trained dense layer and "
                    "fine-tuned is at least as accurate as the same layer trained from scratch "
                    "(Lebedev et al. 2015; Kim et al. 2016)",
                    "fine-tuned",
                    ft,
                    "scratch",
                    sc,
                )
            )
    b = cols[0]
    for label, _ in _FORMATS:
        ft = r(label, _FINETUNED, b)
        before = results.get((f"{label} ({_FINETUNED})", b, _DECOMPOSED))
        if ft is None or before is None:
            continue
        claims.append(
            stats.better(
                f"At {base.percent(b)}, fine-tuning recovers accuracy lost by decomposing {label}: "
                "fine-tuned beats decomposed-only (Lebedev et al. 2015)",
                "fine-tuned",
                ft,
                "decomposed",
                before,
            )
        )
    claims += base.grows(
        results,
        cols,
        f"TT-matrix ({_SCRATCH})",
        "TT-matrix accuracy grows with the parameter budget: {high} beats {low}, from scratch "
        "(Novikov et al. 2015, accuracy vs TT-rank)",
    )
    return claims


def _notes(quick: bool) -> str:
    dense = _dense_config(quick)
    w = _width(quick)
    shapes = {fmt: _shapes(fmt, w) for _, fmt in _FORMATS}
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


TABLE = base.register(
    base.Table(
        "tensor",
        "Tensor-network layers at equal parameter budgets, from scratch and decomposed then "
        "fine-tuned",
        "hidden_1 parameter budget",
        base.percent,
        _cells,
        _claims,
        _notes,
        run=_run,
        extras=_extras,
    )
)
