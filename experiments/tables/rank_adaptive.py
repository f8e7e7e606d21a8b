"""rank_adaptive: fixed-rank vs spectral truncation vs greedy rank growth on MNIST-1D.

Every method trains the same low-rank MLP (`configs/rank_adaptive_mnist1d.py`) with
one compiled shape (factors at full rank, rank masks in the optimizer state), then
`tensornets.compact` slices the dead components out and the *compacted* model is
evaluated, so the accuracy and the parameter count are those of the small model.
The largest difference between the compacted and the masked model's test logits
is reported too (`compact` must not change the function).

Seeds train one after another: a `jax.vmap` over seeds of the spectral basis change
(QR, SVD and the Adam moments mapped through it) was seen to stall indefinitely in
XLA:CPU execution on this machine (jax 0.10.2), while the same step unbatched runs
in milliseconds. Run with ``OPENBLAS_NUM_THREADS=1`` on a shared machine: OpenBLAS
threads spinning on busy cores made each 128 x 128 QR / SVD ~100x slower here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import tensornets
from configs import rank_adaptive_mnist1d
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import optim, stats
from experiments import state as state_lib
from experiments.tables import base
from sparsejax import algorithms, transforms

_FULL = "fixed full rank"
_SMALL = "fixed rank, half the parameters"
_TAUS_FULL = (0.05, 0.1, 0.2, 0.3)
_TAUS_QUICK = (0.2,)
_PARAMS = "parameters after compaction (% of the fixed full-rank model)"
_LAYERS = ("hidden_0", "hidden_1")


def _spectral_row(tau: float) -> str:
    return f"spectral truncation (tau={tau:g})"


def _greedy_row(budget: float) -> str:
    return f"greedy growth (budget {100 * budget:g}% of factors)"


def _small_ranks(width: int) -> dict[str, int]:
    """Fixed ranks whose model has at most half the full-rank model's parameters."""
    return {"hidden_0": max(1, min(40, width) // 2), "hidden_1": max(1, (width * 15) // 32)}


def _model(config: ml_collections.ConfigDict, ranks: dict[str, int] | None = None):
    cfg = ml_collections.ConfigDict(config.to_dict())
    if ranks is not None:
        for layer, r in ranks.items():
            cfg.model.factorize[layer].rank = r
    return models_lib.make_model(cfg, num_classes=10)


def _algorithm(config: ml_collections.ConfigDict, method: str, tau: float = 0.0):
    ra = config.rank_adaptive
    if method == "spectral":
        return tensornets.SpectralTruncation(
            tau=tau,
            update_every_steps=ra.update_every_steps,
            begin_step=ra.begin_step,
            end_step=ra.end_step,
        )
    if method == "greedy":
        return tensornets.GreedyGrowth(
            budget=ra.budget,
            initial_rank=1,
            update_every_steps=ra.growth_every_steps,
            end_step=ra.end_step,
        )
    return algorithms.Dense()


def _train(config, model, algorithm, seeds, dataset, progress, desc) -> dict[str, Any]:
    """Trains one method for every seed; evaluates each seed's compacted model.

    Seeds run one after another through one jitted step (not vmapped: XLA:CPU was
    seen to stall on the vmapped basis change, see the module docstring).
    """
    tx = optim.make_masked_optimizer(config, algorithm)
    train_step = state_lib.step_functions(model, tx, algorithm)[0]
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
    total = config.total_steps

    @jax.jit
    def init_one(key):
        # The seed's key itself initializes the model (as this table always has), not
        # init_state's split of it; these algorithms make no random choices.
        params = model.init(key, x_train[:1])["params"]
        calibration = (x_train[:1], y_train[:1])
        return state_lib.init_state(
            config, model, algorithm, key, x_train[:1], calibration, params=params
        )

    @jax.jit
    def step(state, idx):
        return train_step(state, x_train[idx], y_train[idx])[0]

    finals = []
    for seed in seeds:
        indices = data_lib.batch_indices(
            len(dataset.x_train), batch_size=config.batch_size, seed=seed, num_steps=total
        )
        state = init_one(jax.random.key(seed))
        for t in range(total):
            state = step(state, indices[t])
        if progress:
            print(f"  {desc}: seed {seed} done", flush=True)
        finals.append((state.params, transforms.get_masks(state.opt_state)))

    full_model_params = None
    accs, sizes, gaps, ranks = [], [], [], []
    logits_fn = jax.jit(lambda p: model.apply({"params": p}, x_test))
    for p, masks in finals:
        rank_masks = tensornets.rank.rank_masks_from_param_masks(masks, p)
        small = tensornets.compact(p, rank_masks)
        layer_ranks = tensornets.compact_ranks(rank_masks)
        small_model = _model(config, layer_ranks)
        masked_logits = logits_fn(tensornets.apply_rank_masks(p, rank_masks))
        logits = small_model.apply({"params": small}, x_test)
        accs.append(float(jnp.mean(jnp.argmax(logits, -1) == y_test)))
        sizes.append(sum(int(np.size(v)) for v in jax.tree.leaves(small)))
        gaps.append(float(jnp.max(jnp.abs(logits - masked_logits))))
        ranks.append(layer_ranks)
        full_model_params = sum(int(np.size(v)) for v in jax.tree.leaves(p))
    return {
        "acc": accs,
        "params": sizes,
        "gap": max(gaps),
        "ranks": ranks,
        "max_params": full_model_params,
    }


def _run(quick, seeds, dataset, workdir, progress) -> base.TableRun:
    del workdir
    config = rank_adaptive_mnist1d.get_config("runlocal" if quick else None)
    width = config.model.features[0]
    taus = _TAUS_QUICK if quick else _TAUS_FULL
    runs = {
        _FULL: (_model(config), _algorithm(config, "fixed")),
        _SMALL: (_model(config, _small_ranks(width)), _algorithm(config, "fixed")),
    }
    for tau in taus:
        runs[_spectral_row(tau)] = (_model(config), _algorithm(config, "spectral", tau))
    runs[_greedy_row(config.rank_adaptive.budget)] = (_model(config), _algorithm(config, "greedy"))
    out = {row: _train(config, m, a, seeds, dataset, progress, row) for row, (m, a) in runs.items()}
    reference = out[_FULL]["params"][0]
    col = width
    rank_titles = {k: f"{k} rank after compaction, mean over seeds" for k in _LAYERS}
    results, extra = {}, {_PARAMS: {}, **{t: {} for t in rank_titles.values()}}
    for row, r in out.items():
        results[(row, col)] = r["acc"]
        frac = [n / reference for n in r["params"]]
        results[(row, col, "params")] = frac
        extra[_PARAMS][(row, col)] = frac
        for k, title in rank_titles.items():
            extra[title][(row, col)] = float(np.mean([rk[k] for rk in r["ranks"]]))
        results[(row, col, "gap")] = r["gap"]
    return base.TableRun(list(out), [col], results, extra)


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    col = cols[0]
    full = np.asarray(results[(_FULL, col)])
    rows = sorted({k[0] for k in results if len(k) == 2})
    adaptive = [r for r in rows if r.startswith(("spectral", "greedy"))]
    claims = []
    for row in adaptive:
        acc = np.asarray(results[(row, col)])
        frac = np.asarray(results[(row, col, "params")])
        d, lo, hi = stats.diff_ci(acc, full)
        holds = bool(d >= -0.02 and frac.max() <= 0.5)
        claims.append(
            stats.Claim(
                f"{row} reaches an accuracy within 2 points of the fixed full-rank factorized "
                "model with at most half its parameters",
                holds,
                f"{row} {stats.fmt(acc)} vs full rank {stats.fmt(full)}; difference "
                f"{100 * d:+.1f}, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]; parameters "
                f"{100 * frac.mean():.1f}% (max over seeds {100 * frac.max():.1f}%) of full rank",
            )
        )
    gaps = {r: results[(r, col, "gap")] for r in rows if (r, col, "gap") in results}
    claims.append(
        stats.Claim(
            "compact() gives the masked model's outputs (max |test logit difference| over "
            "seeds <= 1e-4, float32) with strictly fewer parameters (adaptive rows)",
            bool(
                max(gaps.values()) <= 1e-4
                and all(max(results[(r, col, "params")]) < 1.0 for r in adaptive)
            ),
            ", ".join(f"{r}: {g:.1e}" for r, g in gaps.items()),
        )
    )
    spectral = [r for r in adaptive if r.startswith("spectral")]
    if len(spectral) > 1:
        means = [float(np.mean(results[(r, col, "params")])) for r in spectral]
        claims.append(
            stats.Claim(
                "A larger truncation tolerance tau leaves fewer parameters",
                bool(all(a > b for a, b in zip(means, means[1:]))),
                ", ".join(f"{r}: {100 * m:.1f}%" for r, m in zip(spectral, means)),
            )
        )
    small = [r for r in rows if r == _SMALL]
    for row in spectral[:1] + [r for r in adaptive if r.startswith("greedy")]:
        if small:
            claims.append(
                stats.at_least(
                    f"{row} is at least as accurate as fixed ranks at half the parameters",
                    row,
                    results[(row, col)],
                    _SMALL,
                    results[(_SMALL, col)],
                )
            )
    return claims


def _notes(quick: bool) -> str:
    config = rank_adaptive_mnist1d.get_config("runlocal" if quick else None)
    ra = config.rank_adaptive
    width = config.model.features[0]
    small = _small_ranks(width)
    return (
        f"MNIST-1D MLP 40-{width}-{width}-10 whose hidden layers are low-rank matrices "
        f"W = A diag(w) B^T (hidden_0 rank <= {min(40, width)}, hidden_1 rank <= {width}; "
        "output layer dense), Adam "
        f"{config.optimizer.learning_rate} with cosine decay, batch {config.batch_size}, "
        f"{config.total_steps} steps. Fixed full rank: ranks ({min(40, width)}, {width}); fixed "
        f"half: ranks ({small['hidden_0']}, {small['hidden_1']}). Spectral truncation "
        "(Schotthöfer et al. 2022/2024): every "
        f"{ra.update_every_steps} steps from step {ra.begin_step} to {ra.end_step}, QR of both "
        "factors, SVD of the small core, factors and Adam moments rotated into the singular "
        "basis, and the smallest rank kept whose discarded tail is <= tau of the singular "
        "values' norm. Greedy growth (Hashemizadeh et al.): rank 1 per layer at start, one "
        f"component every {ra.growth_every_steps} steps until step {ra.end_step}, given to "
        "the layer whose dead component has the largest gradient on its gate (the first-order "
        f"loss decrease), while the factors stay within {100 * ra.budget:g}% of their "
        "full-rank count. Accuracy and parameters are those of the compacted model "
        "(`tensornets.compact`), parameters including biases and the dense output layer."
    )


base.register(
    base.Table(
        "rank_adaptive",
        "Rank-adaptive training: fixed rank vs spectral truncation vs greedy growth",
        "hidden width",
        lambda c: f"width {c:g}",
        lambda quick: [],
        _claims,
        _notes,
        run_all=_run,
    )
)
