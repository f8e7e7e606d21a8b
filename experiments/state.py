"""The train state and the functions that advance it: init, the jitted steps, evaluation.

A `TrainState` is everything a run needs to resume (step, params, optimizer state
with the masks, key), checkpointed as one pytree. `init_state` is a pure function
of the key (vmap it over seeds); `create_train_state` builds one run's state from
its config, on a mesh or not; `step_functions` / `make_step_functions` give the
train and eval steps every trainer uses (`experiments.train`, `experiments.sweep`,
the tables), so a step is the same wherever it runs.

With ``config.sparsity.execution = "bsr"`` (`experiments.block_execution`) the
state's params are the stored block values, its optimizer state a
`sparsejax.block_sparse.SparseBlocksState` holding the block positions, and the
steps run the model block-sparse (``step_functions(..., execution="bsr")``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# Imported for its registrations too: `import tensornets` adds spectral_truncation and
# greedy_growth to `sparsejax.algorithms`, which `from_config` below resolves names in.
import tensornets  # noqa: F401
from experiments import block_execution, distributed, nnx_models, optim
from experiments import data as data_lib
from sparsejax import algorithms, block_sparse, masks, transforms

PyTree = Any

__all__ = [
    "TrainState",
    "algo_state_of",
    "create_train_state",
    "evaluate",
    "fsdp_min_size",
    "init_state",
    "make_step_functions",
    "step_functions",
]


class TrainState(NamedTuple):
    """Everything a run needs to resume: checkpointed as one pytree.

    Attributes:
      step: int32 scalar, the number of optimizer steps taken.
      params: model parameters (block values with ``execution="bsr"``).
      opt_state: optimizer state; holds the masks (`sparsejax.transforms.MaskedState`),
        or the block layouts (`sparsejax.block_sparse.SparseBlocksState`).
      rng: uint32 key data of the run's key (``jax.random.key_data``).
    """

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    rng: jax.Array


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _initial_draw(model, algorithm, key, x_example, calibration, *, params=None, masks_tree=None):
    """``(params, masks, mask_key, run_key)`` of a run's ``key``: one draw for both executions.

    The masked (`init_state`) and the block-sparse (`_create_block_state`) starts share it, so
    a bsr run starts from exactly the masked run's params and masks.
    """
    init_key, mask_key, run_key = jax.random.split(key, 3)
    if params is None:
        params = model.init(init_key, x_example[:1])["params"]
    if masks_tree is None:
        masks_tree = algorithm.masks_from_model(
            params,
            key=mask_key,
            apply_fn=lambda q, x: model.apply({"params": q}, x),
            batch=calibration,
            loss_fn=_cross_entropy,
            input_shape=x_example.shape[1:],
        )
    return params, masks_tree, mask_key, run_key


def init_state(
    config: ml_collections.ConfigDict,
    model: Any,
    algorithm: algorithms.Algorithm,
    key: jax.Array,
    x_example: jax.Array,
    calibration: tuple[jax.Array, jax.Array],
    *,
    params: PyTree | None = None,
    masks_tree: PyTree | None = None,
) -> TrainState:
    """The initial `TrainState` of one run: a pure function of ``key`` (vmap it over seeds).

    Algorithms that prune with the model before training (GraSP, SynFlow) get
    their masks here (``algorithm.masks_from_model``), from the calibration batch
    (GraSP) or from no data at all (SynFlow).

    Args:
      config: the run config (``optimizer``, ``total_steps``, ``pack_masks``).
      model: a Flax module.
      algorithm: from `sparsejax.algorithms`.
      key: the run's ``jax.random.key``.
      x_example: inputs with a batch axis, for shapes.
      calibration: ``(x, y)``, the first training batch.
      params: start from these params instead of a fresh init (e.g. rewinding).
      masks_tree: start from these masks instead of the algorithm's.

    Returns:
      The state; params are already sparse (except for straight-through algorithms).
    """
    params, masks_tree, mask_key, run_key = _initial_draw(
        model, algorithm, key, x_example, calibration, params=params, masks_tree=masks_tree
    )
    tx = optim.make_masked_optimizer(config, algorithm, key=mask_key, masks=masks_tree)
    opt_state = tx.init(params)
    if not algorithm.straight_through:
        params = transforms.sparsify(params, opt_state)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.random.key_data(run_key),
    )


def create_train_state(
    config: ml_collections.ConfigDict,
    model: Any,
    dataset: data_lib.Dataset,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[TrainState, optax.GradientTransformation, algorithms.Algorithm]:
    """Builds the algorithm, the masked optimizer and the initial state for ``config.seed``.

    Args:
      config: the run config.
      model: a Flax module.
      dataset: the training data (the first batch calibrates prune-at-init).
      mesh: place the state on this mesh by `distributed.state_shardings`
        (``config.mesh.fsdp_min_size``); None: the default device.

    Returns:
      (state, tx, algorithm): ``tx`` is `optim.make_masked_optimizer` of the config, or
      with ``config.sparsity.execution="bsr"`` `block_execution.make_optimizer` (the
      state's params then are block values; built eagerly, not vmappable over seeds).

    Raises:
      ValueError: a bsr config `sparsejax.block_sparse` cannot run
        (`block_execution.check_config`).
    """
    algorithm = algorithms.from_config(config.sparsity, config.total_steps)
    calibration = data_lib.batch_at(
        dataset.x_train, dataset.y_train, batch_size=config.batch_size, seed=config.seed, step=0
    )
    x_example = dataset.x_train[:1]
    if block_execution.execution_of(config) == "bsr":
        block_execution.check_config(config, algorithm)
        return _create_block_state(config, model, algorithm, x_example, calibration, mesh)

    # The key is made inside the jitted function: a host-made key would be a
    # single-device array that a multi-process computation cannot take.
    def init(x, cal):
        return init_state(config, model, algorithm, jax.random.key(config.seed), x, cal)

    if mesh is None:
        state = jax.jit(init)(jnp.asarray(x_example), calibration)
    else:
        abstract = jax.eval_shape(init, x_example, calibration)
        shardings = distributed.state_shardings(abstract, mesh, min_size=fsdp_min_size(config))
        inputs = distributed.host_to_global((x_example, calibration), distributed.replicated(mesh))
        state = jax.jit(init, out_shardings=shardings)(*inputs)
        if distributed.steps_must_block(mesh):
            # Nothing may still run on the mesh when the first step is dispatched.
            state = jax.block_until_ready(state)
    return state, optim.make_masked_optimizer(config, algorithm), algorithm


def _create_block_state(config, model, algorithm, x_example, calibration, mesh):
    """`create_train_state` for ``execution="bsr"``: built eagerly, then placed."""
    params, masks_tree, mask_key, run_key = _initial_draw(
        model, algorithm, jax.random.key(config.seed), x_example, calibration
    )
    values, opt_state = block_execution.init_values(
        config, algorithm, params, masks_tree, key=mask_key
    )
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=values,
        opt_state=opt_state,
        rng=jax.random.key_data(run_key),
    )
    if mesh is not None:
        shardings = distributed.state_shardings(state, mesh, min_size=fsdp_min_size(config))
        state = jax.device_put(state, shardings)
        if distributed.steps_must_block(mesh):
            state = jax.block_until_ready(state)
    tx = block_execution.make_optimizer(config, algorithm, block_sparse.get_layouts(opt_state))
    return state, tx, algorithm


def fsdp_min_size(config: ml_collections.ConfigDict) -> int:
    """``config.mesh.fsdp_min_size`` (default 2**16): smaller leaves are replicated on a mesh.

    Raises:
      ValueError: if it is not a positive integer.
    """
    value = config.get("mesh", {}).get("fsdp_min_size", 2**16)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.mesh.fsdp_min_size must be a positive integer, got {value!r}")
    return value


def algo_state_of(opt_state: optax.OptState) -> PyTree:
    """The algorithm's own state inside ``opt_state`` (``()`` without a `MaskedState`)."""
    found = [
        node
        for node in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, transforms.MaskedState)
        )
        if isinstance(node, transforms.MaskedState)
    ]
    return found[0].algo_state if found else ()


def step_functions(
    model, tx, algorithm, *, skip_nonfinite: bool = False, execution: str = "masked"
):
    """Un-jitted (train_step, eval_step, sparsity) bodies; see `make_step_functions`.

    Vmap or jit them as the trainer needs (`experiments.sweep` vmaps them over seeds).
    With ``skip_nonfinite`` a step whose loss or gradients are not finite leaves
    params and optimizer state unchanged (the step counter still advances, so
    the batch order stays that of an uninterrupted run) and reports
    ``skipped = 1`` in its metrics.

    With ``execution="bsr"`` (a state from `create_train_state` of a bsr config, ``tx``
    a `sparsejax.block_sparse.sparse_blocks` transform) the model runs inside
    ``block_sparse_calls(layouts)`` in training and evaluation, the dense gradient
    reaches ``tx`` as ``dense_grads`` (computed only on its mask-update steps), and
    ``sparsity`` is the layouts' exact fraction (`block_execution.layout_sparsity`).

    Raises:
      ValueError: for an algorithm ``model`` cannot run (`nnx_models.check_algorithm`: a
        Linen method interceptor with an NNX model), an unknown ``execution``.
    """
    nnx_models.check_algorithm(model, algorithm)
    if execution not in block_execution.EXECUTIONS:
        raise ValueError(
            f"execution={execution!r} is unknown; known: {list(block_execution.EXECUTIONS)}"
        )
    bsr = execution == "bsr"

    def effective(state: TrainState):
        return algorithm.forward_params_with_state(
            state.params, transforms.get_masks(state.opt_state), algo_state_of(state.opt_state)
        )

    def loss_fn(params, masks_tree, algo_state, x, y):
        forward = algorithm.forward_params_with_state(params, masks_tree, algo_state)
        with algorithm.model_context(params, masks_tree, algo_state):
            logits = model.apply({"params": forward}, x)
        return _cross_entropy(logits, y), logits

    def values_loss_fn(values, batch):
        # The model on block values: only ever called inside block_sparse_calls.
        logits = model.apply({"params": values}, batch[0])
        return _cross_entropy(logits, batch[1]), logits

    def masked_grads(state: TrainState, x, y):
        masks_tree = transforms.get_masks(state.opt_state)
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, masks_tree, algo_state_of(state.opt_state), x, y
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return loss, logits, grads, updates, opt_state

    def block_grads(state: TrainState, x, y):
        layouts = block_sparse.get_layouts(state.opt_state)

        def sparse_loss(values):
            with block_sparse.block_sparse_calls(layouts):
                return values_loss_fn(values, (x, y))

        (loss, logits), grads = jax.value_and_grad(sparse_loss, has_aux=True)(state.params)
        updates, opt_state = tx.update(
            grads,
            state.opt_state,
            state.params,
            dense_grads=lambda: block_sparse.dense_gradients(
                values_loss_fn, state.params, layouts, (x, y), has_aux=True
            ),
        )
        return loss, logits, grads, updates, opt_state

    def train_step(state: TrainState, x, y):
        loss, logits, grads, updates, opt_state = (block_grads if bsr else masked_grads)(
            state, x, y
        )
        params = optax.apply_updates(state.params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        metrics = {"loss": loss, "accuracy": accuracy}
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jax.tree.reduce(
                jnp.logical_and, jax.tree.map(lambda g: jnp.all(jnp.isfinite(g)), grads)
            )
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state),
                (state.params, state.opt_state),
            )
            metrics["skipped"] = (~finite).astype(jnp.int32)
        new_state = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    def logits_of(state: TrainState, x):
        if not bsr:
            return model.apply({"params": effective(state)}, x)
        with block_sparse.block_sparse_calls(block_sparse.get_layouts(state.opt_state)):
            return model.apply({"params": state.params}, x)

    def eval_step(state: TrainState, x, y):
        logits = logits_of(state, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return loss, correct

    def sparsity(state: TrainState):
        if bsr:
            return block_execution.layout_sparsity(block_sparse.get_layouts(state.opt_state))
        return masks.sparsity_of(effective(state), transforms.get_masks(state.opt_state))

    return train_step, eval_step, sparsity


def make_step_functions(
    model,
    tx,
    algorithm,
    *,
    mesh: jax.sharding.Mesh | None = None,
    state_sharding: PyTree | None = None,
    skip_nonfinite: bool = False,
    execution: str = "masked",
):
    """Jitted (train_step, eval_step, sparsity) for ``model`` trained with ``tx``.

    The model always runs on ``algorithm.forward_params_with_state(params, masks,
    algo_state)`` (the params themselves, except for straight-through algorithms).
    train_step(state, x, y) -> (state, {"loss", "accuracy"}) donates ``state``;
    eval_step(state, x, y) -> (summed loss, number correct);
    sparsity(state) -> fraction of zeros over the masked weights the model uses.

    With a ``mesh`` (and the state's ``state_sharding``, from
    `distributed.state_shardings`) the same bodies are compiled for the mesh:
    the state keeps its sharding from step to step and metrics come back
    replicated; the batch must be sharded over the data axis by the caller.
    On a mesh of several CPU devices of one process each function returns
    only once its results are computed (`distributed.blocking_steps`: XLA:CPU's
    in-process collectives deadlock when steps are dispatched ahead);
    elsewhere dispatch stays asynchronous. ``execution`` as in `step_functions`.
    """
    train_step, eval_step, sparsity = step_functions(
        model, tx, algorithm, skip_nonfinite=skip_nonfinite, execution=execution
    )
    if mesh is None:
        return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step), jax.jit(sparsity)
    if state_sharding is None:
        raise ValueError("make_step_functions with a mesh needs state_sharding")
    repl = distributed.replicated(mesh)
    return distributed.blocking_steps(
        mesh,
        jax.jit(
            train_step,
            out_shardings=(state_sharding, repl),
            donate_argnums=0,
        ),
        jax.jit(eval_step, out_shardings=repl),
        jax.jit(sparsity, out_shardings=repl),
    )


def evaluate(
    eval_step,
    state: TrainState,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 1000,
    *,
    put=None,
):
    """Mean loss and accuracy of the model in ``state`` over (x, y), in fixed-size batches.

    ``put(x_batch, y_batch)`` places a batch (e.g. on a mesh); None passes numpy.

    Returns:
      ``{"test_loss": float, "test_accuracy": float}``.
    """
    total_loss, total_correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        batch = (x[start : start + batch_size], y[start : start + batch_size])
        loss, correct = distributed.to_host(eval_step(state, *(put(*batch) if put else batch)))
        total_loss += float(loss)
        total_correct += int(correct)
    return {"test_loss": total_loss / len(x), "test_accuracy": total_correct / len(x)}
