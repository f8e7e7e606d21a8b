"""Iterative magnitude pruning with rewinding (lottery tickets), as a recipe over the library.

Each round trains the current sparse network, removes ``prune_fraction`` of
each layer's surviving weights by magnitude, and rewinds the survivors to their
values at step ``rewind_step`` = k of the first, dense run (0 = the
initialization). With k > 0 that run is the full-length one (its learning-rate
schedule is that of all ``total_steps``), and every later round resumes at step
k: the schedule at its value of step k and the batches of steps k .. T - 1, for
T - k steps (Frankle et al. 2020). Two controls are trained at every round's
sparsity, from the same step: the same masks with a new random initialization,
and random masks with the same per-layer densities on the rewound weights.

References: Frankle & Carbin 2019, "The Lottery Ticket Hypothesis: Finding
Sparse, Trainable Neural Networks" (prune p% per layer per round, rewind to
init; the reinit and random-mask controls); Frankle et al. 2020, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis" (rewinding to an early step k).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import checkpoints, sweep
from experiments import data as data_lib
from sparsejax import masks, transforms

PyTree = Any

__all__ = ["imp_masks", "run_imp"]


def imp_masks(params: PyTree, current: PyTree, prune_fraction: float) -> PyTree:
    """Next IMP masks: drop ``prune_fraction`` of each layer's live weights, smallest |w| first.

    Args:
      params: trained params (one seed).
      current: current masks (None for leaves that are not pruned).
      prune_fraction: p in [0, 1).

    Returns:
      Masks keeping round((1 - p) * live) weights of each layer.
    """
    masks.validate_sparsity(prune_fraction, "prune_fraction")

    def one(m, w):
        if m is None:
            return None
        live = int(np.sum(np.asarray(m)))
        keep = int(np.round((1.0 - prune_fraction) * live))
        return masks.topk_mask_by_count(jnp.where(m, jnp.abs(w), -jnp.inf), keep)

    return jax.tree.map(one, current, params, is_leaf=masks.is_none)


def _config_for(config: ml_collections.ConfigDict, sparsity: float) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.sparsity = ml_collections.ConfigDict(
        {"algorithm": "static", "target": float(sparsity), "distribution": "uniform"}
    )
    return config


def run_imp(
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    *,
    rounds: int,
    prune_fraction: float = 0.2,
    rewind_step: int = 0,
    dataset: data_lib.Dataset | None = None,
    workdir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs ``rounds`` rounds of IMP (plus the two controls at each round) for every seed.

    Args:
      config: run config (model, optimizer, steps per round); its sparsity is ignored.
      seeds: seeds, trained together with `experiments.sweep.train_seeds`.
      rounds: number of prune-rewind rounds after the dense run.
      prune_fraction: fraction of surviving weights removed per round (0.2 in the paper).
      rewind_step: k, rewind survivors to their values after k steps of the dense run
        (of all ``config.total_steps``); each later round trains steps k .. T - 1.
      dataset: data (default from the config).
      workdir: if given, per-round masks (``imp_round_K.npz``) and the
        accuracies so far (``imp_rounds.json``) are written there after each round.
      progress: progress bars.

    Returns:
      ``{"sparsity": [...], "ticket": [[acc per seed] per round], "reinit": ...,
      "random": ...}``; round 0 is the dense network (the three coincide there).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    if (
        isinstance(rewind_step, bool)
        or not isinstance(rewind_step, int)
        or not 0 <= rewind_step < config.total_steps
    ):
        raise ValueError(
            f"rewind_step must be an integer in [0, total_steps={config.total_steps}), "
            f"got {rewind_step!r}"
        )
    seeds = list(seeds)
    # theta_k is the dense run's state at step k, under the full run's schedule (a
    # separate run of k steps would have decayed its schedule to ~0 by then).
    result = sweep.train_seeds(
        _config_for(config, 0.0),
        seeds,
        dataset=dataset,
        snapshot_steps=(rewind_step,),
        progress=progress,
        desc="IMP round 0",
    )
    rewind_params = result.snapshots[rewind_step]
    current = transforms.get_masks(result.final_state.opt_state)
    record = {
        "sparsity": [0.0],
        "ticket": [result.test_accuracy[:, -1].tolist()],
        "reinit": [result.test_accuracy[:, -1].tolist()],
        "random": [result.test_accuracy[:, -1].tolist()],
    }
    reinit_seeds = [s + 10_000 for s in seeds]  # Fresh initializations, disjoint from seeds.
    for k in range(1, rounds + 1):
        current = _prune_each_seed(result.final_state.params, current, prune_fraction)
        sparsity = _pooled_sparsity(current)
        cfg = _config_for(config, sparsity)
        # All three resume at the rewind step, so they differ only in weights or masks.
        result = sweep.train_seeds(
            cfg,
            seeds,
            dataset=dataset,
            initial_params=rewind_params,
            initial_masks=current,
            start_step=rewind_step,
            progress=progress,
            desc=f"IMP round {k} ticket",
        )
        reinit = sweep.train_seeds(
            cfg,
            reinit_seeds,
            dataset=dataset,
            initial_masks=current,
            start_step=rewind_step,
            progress=False,
        )
        random = sweep.train_seeds(
            cfg,
            seeds,
            dataset=dataset,
            initial_params=rewind_params,
            start_step=rewind_step,
            progress=False,
        )
        record["sparsity"].append(sparsity)
        record["ticket"].append(result.test_accuracy[:, -1].tolist())
        record["reinit"].append(reinit.test_accuracy[:, -1].tolist())
        record["random"].append(random.test_accuracy[:, -1].tolist())
        if workdir:
            # Every finished round is on disk before the next starts, so a long run
            # that is stopped keeps its rounds.
            os.makedirs(workdir, exist_ok=True)
            leaves = {f"{i}": np.asarray(m) for i, m in enumerate(_mask_leaves(current))}
            checkpoints.write_atomically(
                os.path.join(workdir, f"imp_round_{k}.npz"),
                lambda f, leaves=leaves: np.savez_compressed(f, **leaves),
            )
            checkpoints.write_atomically(
                os.path.join(workdir, "imp_rounds.json"), json.dumps(record, indent=1)
            )
    return record


def _mask_leaves(tree: PyTree) -> list:
    return [m for m in jax.tree.leaves(tree, is_leaf=masks.is_none) if m is not None]


def _pooled_sparsity(stacked_masks: PyTree) -> float:
    leaves = _mask_leaves(stacked_masks)
    kept = sum(int(np.sum(np.asarray(m))) for m in leaves)
    total = sum(int(np.asarray(m).size) for m in leaves)
    return 1.0 - kept / total


def _prune_each_seed(stacked_params: PyTree, stacked_masks: PyTree, fraction: float) -> PyTree:
    """`imp_masks` seed by seed on stacked trees (counts are per seed, so no vmap)."""
    num = jax.tree.leaves(stacked_params)[0].shape[0]
    per_seed = []
    for i in range(num):
        p = jax.tree.map(lambda x, i=i: x[i], stacked_params)
        m = jax.tree.map(
            lambda x, i=i: None if x is None else x[i], stacked_masks, is_leaf=masks.is_none
        )
        per_seed.append(imp_masks(p, m, fraction))
    return jax.tree.map(
        lambda *ms: None if ms[0] is None else jnp.stack(ms), *per_seed, is_leaf=masks.is_none
    )
