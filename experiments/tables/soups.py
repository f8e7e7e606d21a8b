"""soups: IMP vs the best single retrained model vs a sparse model soup vs SWAMP.

Prune-retrain rounds on the MNIST-1D CNN, the columns being the rounds' sparsities. Three
chains run side by side from the same dense model:

* IMP: prune the current model by magnitude, retrain one copy, continue from it.
* Soup (Zimmer et al. 2024): prune the current soup, retrain m copies from it with
  different batch orders, average them (`sparsejax.soups.average`), continue from the soup.
  The best of the m copies is reported too.
* SWAMP (Choi et al. 2023): as the soup, but every copy (particle) is trained with
  stochastic weight averaging over the last quarter of the round, and the particles' SWA
  weights are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.base import get_base_config
from experiments import models as models_lib
from experiments import stats, sweep
from experiments.tables import base
from sparsejax import masks, soups

PyTree = Any

_IMP, _BEST, _SOUP, _SWAMP = "IMP", "best single retrained model", "soup", "SWAMP"
_SPARSITY = "realized sparsity of the chain's model (soups must keep the shared mask)"


def _setup(quick: bool) -> dict[str, Any]:
    return {
        "sparsities": [0.8, 0.9] if quick else [0.8, 0.9, 0.95],
        "channels": 8 if quick else 32,
        "dense_steps": 150 if quick else 2000,
        "round_steps": 60 if quick else 800,
        "ingredients": 2 if quick else 3,
        "swa_fraction": 0.25,
        "swa_snapshots": 3 if quick else 8,
    }


def _config(quick: bool, steps: int, sparsity: float) -> ml_collections.ConfigDict:
    config = get_base_config()
    config.progress_bar = False
    config.model.channels = _setup(quick)["channels"]
    config.total_steps = steps
    config.eval_every_steps = steps
    if sparsity:
        config.sparsity = ml_collections.ConfigDict(
            {"algorithm": "static", "target": float(sparsity), "distribution": "uniform"}
        )
    return config


def _magnitude_masks(params: PyTree, sparsity: float) -> PyTree:
    """Per-layer magnitude masks at ``sparsity`` on every kernel (biases dense)."""

    def one(path, w):
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            return masks.topk_mask(jnp.abs(w), sparsity)
        return None

    return jax.tree_util.tree_map_with_path(one, params)


def _stack(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(
        lambda *xs: None if xs[0] is None else jnp.stack(xs), *trees, is_leaf=masks.is_none
    )


def _train_stack(config, dataset, params, mask_tree, seeds, swa_fraction=0.0, snapshots=1):
    """Retrains a stack of models, each from its params under its fixed mask.

    Model i uses the batch order of seed ``seeds[i]`` (`sweep.stack_seeds`). Returns
    ``(final params, SWA params)``; the SWA params average ``snapshots`` evenly spaced
    snapshots of the last ``swa_fraction`` of training (the final params when
    ``swa_fraction`` is 0).
    """
    stack = sweep.stack_seeds(
        config, seeds, dataset, initial_params=params, initial_masks=mask_tree
    )
    state = stack.state
    total = config.total_steps
    start = total - int(round(swa_fraction * total))
    every = max((total - start) // max(snapshots, 1), 1)
    swa, count = None, 0
    for t in range(total):
        state, _ = stack.train_step(state, stack.indices[t])
        if swa_fraction and t + 1 > start and (total - t - 1) % every == 0:
            swa = state.params if swa is None else soups.swa_update(swa, state.params, count)
            count += 1
    return state.params, (state.params if swa is None else swa)


def _run(quick, seeds, dataset, workdir, progress) -> base.TableRun:
    del workdir, progress
    setup = _setup(quick)
    k, num = setup["ingredients"], len(seeds)
    model = models_lib.make_model(_config(quick, 1, 0.0), dataset.num_classes)
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
    accuracy = jax.jit(
        jax.vmap(lambda p: jnp.mean(jnp.argmax(model.apply({"params": p}, x_test), -1) == y_test))
    )
    dense = sweep.train_seeds(
        _config(quick, setup["dense_steps"], 0.0), seeds, dataset=dataset, progress=False
    )
    take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    current = {
        name: [take(dense.final_state.params, i) for i in range(num)]
        for name in (_IMP, _SOUP, _SWAMP)
    }
    results: dict = {}
    realized: dict = {}
    cols = setup["sparsities"]
    for r, sparsity in enumerate(cols):
        config = _config(quick, setup["round_steps"], sparsity)
        # One stack: per seed, 1 IMP model, k soup ingredients and k SWAMP particles.
        starts, mask_list, batch_seeds, where = [], [], [], {}
        for i, s in enumerate(seeds):
            for c, (name, copies) in enumerate(((_IMP, 1), (_SOUP, k), (_SWAMP, k))):
                pruned_mask = _magnitude_masks(current[name][i], sparsity)
                where[(name, i)] = (len(starts), pruned_mask)
                for j in range(copies):
                    starts.append(masks.apply_masks(current[name][i], pruned_mask))
                    mask_list.append(pruned_mask)
                    # Distinct batch orders for every copy, round and chain.
                    batch_seeds.append(100_000 * (r + 1) + 10_000 * c + 100 * j + s)
        final, swa = _train_stack(
            config,
            dataset,
            _stack(starts),
            _stack(mask_list),
            batch_seeds,
            setup["swa_fraction"],
            setup["swa_snapshots"],
        )
        per_model = np.asarray(accuracy(final))
        rows = {_IMP: [], _BEST: []}
        for i in range(num):
            pos, mask_tree = where[(_IMP, i)]
            current[_IMP][i] = take(final, pos)
            rows[_IMP].append(float(per_model[pos]))
            pos, mask_tree = where[(_SOUP, i)]
            rows[_BEST].append(float(per_model[pos : pos + k].max()))
            current[_SOUP][i] = soups.average(take(final, jnp.arange(pos, pos + k)), mask_tree)
            pos, mask_tree = where[(_SWAMP, i)]
            current[_SWAMP][i] = soups.average(take(swa, jnp.arange(pos, pos + k)), mask_tree)
        for name in (_IMP, _SOUP, _SWAMP):
            realized[(name, sparsity)] = float(
                np.mean(
                    [masks.sparsity_of(current[name][i], where[(name, i)][1]) for i in range(num)]
                )
            )
        soup_acc = np.asarray(accuracy(_stack(current[_SOUP])))
        swamp_acc = np.asarray(accuracy(_stack(current[_SWAMP])))
        rows[_SOUP] = soup_acc.tolist()
        rows[_SWAMP] = swamp_acc.tolist()
        for name, values in rows.items():
            results[(name, sparsity)] = [float(v) for v in values]
    order = [_IMP, _BEST, _SOUP, _SWAMP]
    return base.TableRun(order, cols, results, {_SPARSITY: realized})


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    claims = []
    for s in cols:
        p = f"{100 * s:g}%"
        r = lambda name, s=s: results[(name, s)]  # noqa: E731
        claims += [
            stats.better(
                f"At {p}, the soup beats IMP with one retrained model (Zimmer et al. 2024)",
                "soup",
                r(_SOUP),
                "IMP",
                r(_IMP),
            ),
            stats.at_least(
                f"At {p}, the soup is at least as accurate as its best ingredient (Zimmer "
                "et al. 2024)",
                "soup",
                r(_SOUP),
                "best ingredient",
                r(_BEST),
            ),
            stats.better(
                f"At {p}, SWAMP beats IMP (Choi et al. 2023)", "SWAMP", r(_SWAMP), "IMP", r(_IMP)
            ),
        ]
    return claims


def _notes(quick: bool) -> str:
    setup = _setup(quick)
    k = setup["ingredients"]
    return (
        f"MNIST-1D CNN ({setup['channels']} channels), Adam 3e-3 with cosine decay, batch 100. "
        f"A dense model is trained for {setup['dense_steps']} steps; each column is one "
        f"prune-retrain round: prune every kernel by magnitude to the column's sparsity "
        f"(uniform per layer), then retrain {setup['round_steps']} steps with the mask fixed "
        "and a restarted learning-rate schedule (rounds run in order, each from the previous "
        f"round's model of its chain). Soup: {k} copies per round with different batch "
        f"orders, uniformly averaged. SWAMP: {k} particles, each averaging "
        f"{setup['swa_snapshots']} snapshots of the last {setup['swa_fraction']:.0%} of the "
        "round (SWA), then the particles are averaged and pruned by magnitude; unlike the "
        "paper, the particles restart from the pruned average rather than rewinding to an "
        "early checkpoint, so all rows share one retraining protocol. Best single retrained "
        "model: the best soup ingredient by test accuracy (an optimistic choice, which makes "
        "'soup >= best' a strict test)."
    )


base.register(
    base.Table(
        "soups",
        "Sparse model soups and SWAMP vs IMP and the best single retrained model",
        "sparsity (prune-retrain round)",
        lambda s: f"{100 * s:g}%",
        lambda quick: [],
        _claims,
        _notes,
        run_all=_run,
    )
)
