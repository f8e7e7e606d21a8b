"""Train several seeds of one config in one compiled program.

The per-seed states are stacked on a leading axis, the data stay on device and
each seed gathers its own batches (the same batches `experiments.train` would
use for that seed), and one jitted, `jax.vmap`-ed step advances every seed.
The masked optimizer's step counters are shared by all seeds (unbatched), so
mask updates remain a real `lax.cond` rather than both branches every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

# Imported for its registrations too: `import tensornets` adds spectral_truncation and
# greedy_growth to `sparsejax.algorithms`, which `from_config` below resolves names in.
import tensornets  # noqa: F401
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import optim
from experiments import state as state_lib
from sparsejax import algorithms, masks, transforms
from sparsejax.masks import path_name

PyTree = Any

__all__ = ["SeedStack", "SweepResult", "stack_seeds", "state_axes", "train_seeds"]


class SweepResult(NamedTuple):
    """What a sweep returns, one entry per seed on the leading axis.

    Attributes:
      seeds: the seeds, in order.
      steps: evaluation steps.
      test_accuracy: float array [num_seeds, num_evals].
      train_loss: mean training loss over each evaluation interval, same shape.
      sparsity: realized fraction of zeros over the masked weights, [num_seeds].
      layer_density: {layer name: [num_seeds]} density of each masked leaf.
      final_state: the stacked final `experiments.state.TrainState`.
      initial_params: the stacked initial params (for rewinding).
      snapshots: ``{step: params stacked over seeds}`` after each of the
        ``snapshot_steps`` asked for (e.g. the weights to rewind to).
    """

    seeds: list[int]
    steps: list[int]
    test_accuracy: np.ndarray
    train_loss: np.ndarray
    sparsity: np.ndarray
    layer_density: dict[str, np.ndarray]
    final_state: Any
    initial_params: Any
    snapshots: dict[int, Any] | None = None


class SeedStack(NamedTuple):
    """One config's runs for several seeds, stacked on a leading axis to advance together.

    Attributes:
      model: the Flax module.
      algorithm: the config's `sparsejax.algorithms.Algorithm`.
      state: the stacked initial `state.TrainState` (leading axis: seeds), except
        the step counters, which all seeds share (see `state_axes`).
      axes: the vmap axes of ``state`` (`state_axes`).
      indices: int [total_steps - start_step, num_seeds, batch_size], seed i's
        batch at step ``start_step + t`` in ``indices[t, i]``
        (`experiments.data.batch_indices`).
      train_step: jitted ``(state, indices[t]) -> (state, {"loss", "accuracy"})``
        advancing every seed by one step on its own batch (metrics: [num_seeds]).
      eval_step: the un-jitted ``(one seed's state, x, y) -> (summed loss, number
        correct)`` of `state.step_functions`, to vmap with ``axes``.
    """

    model: Any
    algorithm: algorithms.Algorithm
    state: state_lib.TrainState
    axes: state_lib.TrainState
    indices: np.ndarray
    train_step: Callable
    eval_step: Callable


def state_axes(state: state_lib.TrainState) -> state_lib.TrainState:
    """The vmap axes of a stacked state: 0 everywhere but the shared step counters (None).

    The masked optimizer's step counter is shared by all seeds (unbatched), so
    mask updates remain a real `lax.cond` rather than both branches every step.

    Args:
      state: one seed's state (or its ``jax.eval_shape``).

    Returns:
      A tree of the same structure holding 0 or None.
    """
    axes = jax.tree.map(lambda _: 0, state)
    opt = axes.opt_state
    if isinstance(opt, transforms.MaskedState):
        opt = opt._replace(count=None)
    return axes._replace(step=None, opt_state=opt)


def stack_seeds(
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    dataset: data_lib.Dataset,
    *,
    initial_params: PyTree | None = None,
    initial_masks: PyTree | None = None,
    start_step: int = 0,
) -> SeedStack:
    """The initial states of ``config`` for every seed and the vmapped step that trains them.

    Seed s initializes and chooses its masks with ``jax.random.key(s)`` and
    trains on the batch order of `experiments.data.batch_at` with ``seed=s``:
    what `experiments.train` does for ``config.seed = s``.

    With ``start_step = k > 0`` the runs start at step k of a
    ``config.total_steps``-long run (Frankle et al. 2020, "Linear Mode Connectivity
    and the Lottery Ticket Hypothesis", train rewound networks from iteration k):
    the learning-rate schedule starts at its value of step k, the batches are
    those of steps k .. total_steps - 1, and the step counters (the state's and
    the algorithm's) start at k. The optimizer's moments start fresh, as a new
    optimizer's would (Adam's bias correction counts from the first step taken).

    Args:
      config: a run config (``config.seed`` is ignored).
      seeds: the seeds (ints).
      dataset: the training data (kept on device; each seed gathers its batches).
      initial_params: optional params stacked over seeds (leading axis), e.g.
        rewound weights of lottery-ticket rounds.
      initial_masks: optional masks stacked over seeds, used instead of the
        algorithm's initial masks.
      start_step: the step the runs start at, in [0, total_steps).

    Returns:
      A `SeedStack`.

    Raises:
      ValueError: for no seeds, a ``start_step`` out of range, an algorithm that
        reparametrizes (spectral truncation), which is not run vmapped over seeds, or
        ``config.sparsity.execution='bsr'``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must not be empty")
    if config.sparsity.get("execution", "masked") != "masked":
        # Each seed's block layout is built eagerly from its concrete masks
        # (experiments.block_execution), so the states are not one vmapped init.
        raise ValueError(
            f"config.sparsity.execution={config.sparsity.execution!r}: a sweep runs the "
            "seeds vmapped in the masked mode only; train each seed with experiments.main "
            "or set config.sparsity.execution='masked'"
        )
    _check_start_step(start_step, config.total_steps)
    model = models_lib.make_model(config, dataset.num_classes)
    algorithm = algorithms.from_config(config.sparsity, config.total_steps)
    if algorithm.reparametrizes:
        # Seen on XLA:CPU: the vmapped basis change (SVD/QR of every seed's factors with the
        # optimizer moments) stalls with every thread waiting on a lock.
        raise ValueError(
            f"config.sparsity.algorithm={config.sparsity.algorithm!r} rotates params on its "
            "update steps and is not run vmapped over seeds; train each seed with "
            "experiments.main (or see experiments/tables/rank_adaptive.py)"
        )
    tx = optim.make_masked_optimizer(config, algorithm)
    train_step, eval_step, _ = state_lib.step_functions(model, tx, algorithm)

    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    indices = np.stack(
        [
            data_lib.batch_indices(
                len(dataset.x_train),
                batch_size=config.batch_size,
                seed=s,
                num_steps=config.total_steps - start_step,
                start_step=start_step,
            )
            for s in seeds
        ],
        axis=1,
    )  # [steps, seeds, batch]
    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])

    def init_one(key_data, first_batch, params, masks_tree):
        calibration = (x_train[first_batch], y_train[first_batch])
        return state_lib.init_state(
            config,
            model,
            algorithm,
            jax.random.wrap_key_data(key_data),
            x_train[:1],
            calibration,
            params=params,
            masks_tree=masks_tree,
        )

    def one_step(state, batch_idx):
        return train_step(state, x_train[batch_idx], y_train[batch_idx])

    def first(tree):  # seed 0's slice of a stacked tree, for the state's shapes
        return jax.tree.map(lambda a: None if a is None else a[0], tree, is_leaf=masks.is_none)

    abstract = jax.eval_shape(
        init_one,
        keys[0],
        jnp.asarray(indices[0, 0]),
        None if initial_params is None else first(initial_params),
        None if initial_masks is None else first(initial_masks),
    )
    axes = state_axes(abstract)
    in_axes = (0, 0, None if initial_params is None else 0, None if initial_masks is None else 0)
    state = jax.vmap(init_one, in_axes=in_axes, out_axes=axes)(
        keys, jnp.asarray(indices[0]), initial_params, initial_masks
    )
    if start_step:
        state = _starting_at(state, start_step)
    # A Python loop over this jitted step, not lax.scan: XLA:CPU runs convolutions
    # inside while loops about 10x slower than at top level (measured here).
    step_all = jax.jit(jax.vmap(one_step, in_axes=(axes, 0), out_axes=(axes, 0)))
    return SeedStack(model, algorithm, state, axes, indices, step_all, eval_step)


def train_seeds(
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    *,
    dataset: data_lib.Dataset | None = None,
    initial_params: PyTree | None = None,
    initial_masks: PyTree | None = None,
    eval_every_steps: int | None = None,
    start_step: int = 0,
    snapshot_steps: Sequence[int] = (),
    progress: bool = True,
    desc: str = "",
) -> SweepResult:
    """Trains ``config`` once per seed, all seeds advanced by one vmapped step.

    Args:
      config: a run config as in configs/ (``config.seed`` is ignored).
      seeds: the seeds; seed s uses ``jax.random.key(s)`` for init and masks and
        the batch order of `experiments.data.batch_at` with ``seed=s``.
      dataset: data to use (default: ``config.dataset``).
      initial_params: optional params stacked over seeds (leading axis), e.g.
        rewound weights of lottery-ticket rounds.
      initial_masks: optional masks stacked over seeds, used instead of the
        algorithm's initial masks.
      eval_every_steps: evaluation interval (default ``config.eval_every_steps``).
      start_step: start at this step of a ``config.total_steps``-long run and train
        the steps from there to the end (`stack_seeds`); evaluations stay at the
        multiples of the interval after it, and at the end.
      snapshot_steps: steps in [start_step, total_steps] after which the params are
        kept (``SweepResult.snapshots``), e.g. the weights to rewind to.
      progress: show a progress bar.
      desc: progress-bar label.

    Returns:
      A `SweepResult`.

    Raises:
      ValueError: for no seeds, or a ``start_step`` or snapshot step out of range.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must not be empty")
    total = config.total_steps
    _check_start_step(start_step, total)
    for t in snapshot_steps:
        if isinstance(t, bool) or not isinstance(t, int) or not start_step <= t <= total:
            raise ValueError(
                f"snapshot_steps must be integers in [start_step={start_step}, "
                f"total_steps={total}], got {t!r}"
            )
    snapshot_steps = sorted(set(snapshot_steps))
    dataset = data_lib.load_from_config(config) if dataset is None else dataset
    stack = stack_seeds(
        config,
        seeds,
        dataset,
        initial_params=initial_params,
        initial_masks=initial_masks,
        start_step=start_step,
    )
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)

    def one_accuracy(s):
        _, correct = stack.eval_step(s, x_test, y_test)
        return correct / x_test.shape[0]

    state = stack.state
    start_params = state.params
    test_accuracy = jax.jit(jax.vmap(one_accuracy, in_axes=(stack.axes,)))

    every = eval_every_steps or config.eval_every_steps
    evals = [t for t in range(every, total, every) if t > start_step] + [total]
    steps, accs, losses = [], [], []
    snapshots = {}
    interval_losses = []  # the training losses since the last evaluation
    start = start_step
    with tqdm(total=total - start_step, disable=not progress, desc=desc, leave=False) as bar:
        for end in sorted(set(evals) | set(snapshot_steps)):
            for t in range(start, end):
                state, metrics = stack.train_step(state, stack.indices[t - start_step])
                interval_losses.append(metrics["loss"])
            bar.update(end - start)
            start = end
            if end in snapshot_steps:
                snapshots[end] = state.params
            if end in evals:
                steps.append(end)
                accs.append(np.asarray(test_accuracy(state)))
                losses.append(np.asarray(jnp.mean(jnp.stack(interval_losses), axis=0)))
                interval_losses = []
                bar.set_postfix(acc=f"{accs[-1].mean():.3f}", refresh=False)

    final_masks = transforms.get_masks(state.opt_state)
    effective = jax.vmap(stack.algorithm.forward_params)(state.params, final_masks)
    names_masks = jax.tree_util.tree_leaves_with_path(final_masks, is_leaf=masks.is_none)
    layer_density = {}
    zeros = total_size = None
    flat_params = dict(
        (jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(effective)
    )
    for path, m in names_masks:
        if m is None:
            continue
        m = np.asarray(m)
        per_seed = m.reshape(len(seeds), -1)
        layer_density[path_name(path)] = per_seed.mean(axis=1)
        w = np.asarray(flat_params[jax.tree_util.keystr(path)]).reshape(len(seeds), -1)
        z = (w == 0).sum(axis=1)
        zeros = z if zeros is None else zeros + z
        total_size = w.shape[1] if total_size is None else total_size + w.shape[1]
    sparsity = zeros / total_size if total_size else np.zeros(len(seeds))
    return SweepResult(
        seeds=seeds,
        steps=steps,
        test_accuracy=np.stack(accs, axis=1),
        train_loss=np.stack(losses, axis=1),
        sparsity=np.asarray(sparsity, np.float64),
        layer_density=layer_density,
        final_state=state,
        initial_params=start_params,
        snapshots=snapshots,
    )


def _check_start_step(start_step: Any, total_steps: int) -> None:
    if (
        isinstance(start_step, bool)
        or not isinstance(start_step, int)
        or not 0 <= start_step < total_steps
    ):
        raise ValueError(
            f"start_step must be an integer in [0, total_steps={total_steps}), got {start_step!r}"
        )


def _starting_at(state: state_lib.TrainState, step: int) -> state_lib.TrainState:
    """``state`` moved to ``step``: its counters and learning-rate schedules, not its moments.

    The schedules of an optax chain count their own steps (`optax.ScaleByScheduleState`);
    setting them to ``step`` fast-forwards the learning rate the way a trainer restarted
    at ``step`` would. Moment estimates and Adam's bias-correction count stay fresh.
    """

    def at_step(count):
        return jnp.full_like(count, step)

    def visit(node):
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=at_step(node.count))
        if isinstance(node, transforms.MaskedState):
            return node._replace(count=at_step(node.count), inner_state=forward(node.inner_state))
        return node

    def forward(tree):
        return jax.tree.map(
            visit,
            tree,
            is_leaf=lambda x: isinstance(x, (optax.ScaleByScheduleState, transforms.MaskedState)),
        )

    return state._replace(step=at_step(state.step), opt_state=forward(state.opt_state))
