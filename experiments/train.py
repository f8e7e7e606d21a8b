"""Config-driven training: one jitted step, evaluation, metrics, checkpoints, resume.

``train_and_evaluate(config, workdir)`` is the whole run. Sparsity enters only
through the optimizer: ``sparsejax.transforms.masked(optax_chain, algorithm)``,
so the train step is the same for dense, pruned and dynamic sparse training.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from tqdm import tqdm

# Imported for its registrations too: `import tensornets` adds spectral_truncation and
# greedy_growth to `sparsejax.algorithms`, which `from_config` below resolves names in.
import tensornets  # noqa: F401
from experiments import data as data_lib
from experiments import distributed
from experiments import models as models_lib
from sparsejax import algorithms, masks, transforms

__all__ = [
    "NonFiniteLossError",
    "TrainState",
    "create_train_state",
    "init_state",
    "load_checkpoint",
    "make_mesh",
    "make_tx",
    "step_functions",
    "make_model",
    "make_optimizer",
    "make_step_functions",
    "train_and_evaluate",
]

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class TrainState(NamedTuple):
    """Everything a run needs to resume: checkpointed as one pytree.

    Attributes:
      step: int32 scalar, the number of optimizer steps taken.
      params: model parameters.
      opt_state: optimizer state; holds the masks (`sparsejax.transforms.MaskedState`).
      rng: uint32 key data of the run's key (``jax.random.key_data``).
    """

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    rng: jax.Array


_OPTIMIZERS = ("adam", "adamw", "lion", "momentum", "sgd")


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """The dense optax optimizer described by ``config.optimizer``.

    Keys: ``name`` (sgd, momentum, adam, adamw, lion), ``learning_rate``,
    ``schedule`` ('constant' or 'cosine'), ``warmup_steps``, ``momentum``,
    ``nesterov``, ``weight_decay``, ``grad_clip_norm`` (0 disables).
    """
    opt = config.optimizer
    if opt.name not in _OPTIMIZERS:
        raise ValueError(f"config.optimizer.name={opt.name!r} is unknown; known: {_OPTIMIZERS}")
    if not _is_number(opt.learning_rate) or not opt.learning_rate > 0:
        raise ValueError(
            f"config.optimizer.learning_rate must be positive, got {opt.learning_rate!r}"
        )
    for key, low, high in (
        ("warmup_steps", 0, None),
        ("weight_decay", 0.0, None),
        ("momentum", 0.0, 1.0),
        ("grad_clip_norm", 0.0, None),
    ):
        value = opt.get(key, 0)
        integral = key == "warmup_steps"
        if (
            not _is_number(value)
            or (integral and not isinstance(value, int))
            or not value >= low
            or (high is not None and not value < high)
        ):
            bounds = f"in [{low}, {high})" if high is not None else f">= {low}"
            raise ValueError(
                f"config.optimizer.{key} must be {'an integer' if integral else 'a number'} "
                f"{bounds}, got {value!r}"
            )
    warmup = int(opt.get("warmup_steps", 0))
    if opt.get("schedule", "constant") == "cosine" and not warmup:
        lr = optax.cosine_decay_schedule(opt.learning_rate, decay_steps=max(total_steps, 1))
    elif opt.get("schedule", "constant") == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=opt.learning_rate,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
        )
    elif opt.get("schedule", "constant") == "constant":
        lr = optax.linear_schedule(0.0, opt.learning_rate, warmup) if warmup else opt.learning_rate
    else:
        raise ValueError(
            f"config.optimizer.schedule={opt.schedule!r} is unknown; known: ['constant', 'cosine']"
        )
    wd = float(opt.get("weight_decay", 0.0))
    if opt.name == "sgd":
        tx = optax.sgd(lr)
    elif opt.name == "momentum":
        tx = optax.sgd(lr, momentum=opt.get("momentum", 0.9), nesterov=opt.get("nesterov", False))
    elif opt.name == "adam":
        tx = optax.adam(lr)
    elif opt.name == "adamw":
        tx = optax.adamw(lr, weight_decay=wd)
    else:
        tx = optax.lion(lr, weight_decay=wd)
    if wd and opt.name in ("sgd", "momentum", "adam"):
        tx = optax.chain(optax.add_decayed_weights(wd), tx)
    clip = float(opt.get("grad_clip_norm", 0.0))
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


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
      config: the run config (``optimizer``, ``total_steps``).
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
    tx = transforms.masked(
        make_optimizer(config, config.total_steps),
        algorithm,
        key=mask_key,
        masks=masks_tree,
        packed=_packed(config),
    )
    opt_state = tx.init(params)
    if not algorithm.straight_through:
        params = transforms.sparsify(params, opt_state)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.random.key_data(run_key),
    )


def make_tx(
    config: ml_collections.ConfigDict, algorithm: algorithms.Algorithm
) -> optax.GradientTransformation:
    """``masked(optimizer, algorithm)`` for updating any state made by `init_state`.

    The update depends only on the state (masks, counters and keys live there),
    so one transform serves every seed. ``config.pack_masks`` keeps the masks
    bit-packed in the state.
    """
    return transforms.masked(
        make_optimizer(config, config.total_steps), algorithm, packed=_packed(config)
    )


def _packed(config: ml_collections.ConfigDict) -> bool:
    value = config.get("pack_masks", False)
    if not isinstance(value, bool):
        raise ValueError(f"config.pack_masks must be a bool, got {value!r}")
    return value


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
      (state, tx, algorithm).
    """
    algorithm = algorithms.from_config(config.sparsity, config.total_steps)
    calibration = data_lib.batch_at(
        dataset.x_train, dataset.y_train, batch_size=config.batch_size, seed=config.seed, step=0
    )
    x_example = dataset.x_train[:1]

    # The key is made inside the jitted function: a host-made key would be a
    # single-device array that a multi-process computation cannot take.
    def init(x, cal):
        return init_state(config, model, algorithm, jax.random.key(config.seed), x, cal)

    if mesh is None:
        state = jax.jit(init)(jnp.asarray(x_example), calibration)
    else:
        abstract = jax.eval_shape(init, x_example, calibration)
        shardings = distributed.state_shardings(abstract, mesh, min_size=_fsdp_min_size(config))
        inputs = distributed.host_to_global((x_example, calibration), distributed.replicated(mesh))
        state = jax.jit(init, out_shardings=shardings)(*inputs)
    return state, make_tx(config, algorithm), algorithm


def _fsdp_min_size(config: ml_collections.ConfigDict) -> int:
    return int(config.get("mesh", {}).get("fsdp_min_size", 2**16))


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's device mesh from ``config.mesh`` (``data``, ``model``; all devices by default)."""
    mesh_config = config.get("mesh", {})
    mesh = distributed.make_mesh(
        data=mesh_config.get("data", -1), model=mesh_config.get("model", 1)
    )
    data_size = mesh.shape[distributed.DATA_AXIS]
    if config.batch_size % data_size:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the data axis "
            f"(config.mesh.data={data_size})"
        )
    return mesh


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


def step_functions(model, tx, algorithm, *, skip_nonfinite: bool = False):
    """Un-jitted (train_step, eval_step, sparsity) bodies; see `make_step_functions`.

    With ``skip_nonfinite`` a step whose loss or gradients are not finite leaves
    params and optimizer state unchanged (the step counter still advances, so
    the batch order stays that of an uninterrupted run) and reports
    ``skipped = 1`` in its metrics.
    """

    def effective(state: TrainState):
        return algorithm.forward_params_with_state(
            state.params, transforms.get_masks(state.opt_state), algo_state_of(state.opt_state)
        )

    def loss_fn(params, masks_tree, algo_state, x, y):
        forward = algorithm.forward_params_with_state(params, masks_tree, algo_state)
        with algorithm.model_context(params, masks_tree, algo_state):
            logits = model.apply({"params": forward}, x)
        return _cross_entropy(logits, y), logits

    def train_step(state: TrainState, x, y):
        masks_tree = transforms.get_masks(state.opt_state)
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, masks_tree, algo_state_of(state.opt_state), x, y
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
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

    def eval_step(state: TrainState, x, y):
        logits = model.apply({"params": effective(state)}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return loss, correct

    def sparsity(state: TrainState):
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
):
    """Jitted (train_step, eval_step, sparsity) for ``model`` trained with ``tx``.

    The model always runs on ``algorithm.forward_params(params, masks)`` (the
    params themselves, except for straight-through algorithms).
    train_step(state, x, y) -> (state, {"loss", "accuracy"}) donates ``state``;
    eval_step(state, x, y) -> (summed loss, number correct);
    sparsity(state) -> fraction of zeros over the masked weights the model uses.

    With a ``mesh`` (and the state's ``state_sharding``, from
    `distributed.state_shardings`) the same bodies are compiled for the mesh:
    the state keeps its sharding from step to step and metrics come back
    replicated; the batch must be sharded over the data axis by the caller.
    """
    train_step, eval_step, sparsity = step_functions(
        model, tx, algorithm, skip_nonfinite=skip_nonfinite
    )
    if mesh is None:
        return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step), jax.jit(sparsity)
    if state_sharding is None:
        raise ValueError("make_step_functions with a mesh needs state_sharding")
    repl = distributed.replicated(mesh)
    return (
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
    """
    total_loss, total_correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        batch = (x[start : start + batch_size], y[start : start + batch_size])
        loss, correct = distributed.to_host(eval_step(state, *(put(*batch) if put else batch)))
        total_loss += float(loss)
        total_correct += int(correct)
    return {"test_loss": total_loss / len(x), "test_accuracy": total_correct / len(x)}


def _load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
    kwargs = {k: v for k, v in config.dataset.items() if k != "name"}
    # Empty strings in configs mean "the default" (ConfigDict cannot override None).
    kwargs = {k: v for k, v in kwargs.items() if v != ""}
    return data_lib.load_dataset(config.dataset.name, **kwargs)


def make_model(config: ml_collections.ConfigDict, num_classes: int):
    """The Flax model named by ``config.model`` (its other keys are the attributes)."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    return models_lib.get_model(config.model.name, num_classes=num_classes, **kwargs)


_NONFINITE_MODES = ("stop", "skip")


def _check_config(config: ml_collections.ConfigDict) -> None:
    for key in ("total_steps", "batch_size", "eval_every_steps", "checkpoint_every_steps"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config.{key} must be a positive integer, got {value!r}")
    log_every = config.get("log_every_steps", 100)
    if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every <= 0:
        raise ValueError(f"config.log_every_steps must be a positive integer, got {log_every!r}")
    seed = config.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"config.seed must be an integer >= 0, got {seed!r}")
    keep = config.get("keep_checkpoints", 3)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep <= 0:
        raise ValueError(f"config.keep_checkpoints must be a positive integer, got {keep!r}")
    mode = config.get("on_nonfinite", "stop")
    if mode not in _NONFINITE_MODES:
        raise ValueError(
            f"config.on_nonfinite={mode!r} is unknown; known: {list(_NONFINITE_MODES)}"
        )
    min_size = config.get("mesh", {}).get("fsdp_min_size", 2**16)
    if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 1:
        raise ValueError(f"config.mesh.fsdp_min_size must be a positive integer, got {min_size!r}")
    _packed(config)
    # Build the cheap pieces now, so a bad optimizer, sparsity or model value fails
    # before any data is loaded or anything is compiled or written.
    make_optimizer(config, config.total_steps)
    algorithms.from_config(config.sparsity, config.total_steps)
    make_model(config, 10)


@jax.jit
def _tree_all_finite(tree: PyTree) -> jax.Array:
    return jax.tree.reduce(
        jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree), jnp.bool_(True)
    )


def _all_finite(tree: PyTree) -> bool:
    return bool(distributed.to_host(_tree_all_finite(tree)))


def _restore_latest(
    manager: ocp.CheckpointManager, state: TrainState, ckpt_dir: str, quarantine_dir: str
) -> tuple[TrainState, int | None]:
    """The newest checkpoint that restores; unreadable ones are moved aside with a warning.

    A checkpoint directory only appears once its save is complete (orbax writes
    into a temporary directory and renames it), so a run killed mid-save never
    leaves a step directory behind. A step that still fails to restore (files
    truncated or deleted afterwards, a disk error) is moved to
    ``quarantine_dir`` (nothing is deleted) and the next older one is tried.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    expected = _signature(state)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            saved = _saved_signature(os.path.join(ckpt_dir, str(step), "default"))
        except Exception:  # noqa: BLE001 -- unreadable metadata: handled as corrupt below
            saved = None
        # Damaged array files can make the metadata read back as an empty tree.
        saved = saved or None
        if saved is not None and saved != expected:
            # A readable checkpoint of another model or optimizer is not corrupt: refuse
            # to touch it rather than set a valid run aside.
            raise ValueError(
                f"workdir={os.path.dirname(ckpt_dir)!r} holds checkpoint {step} of a different "
                "model or optimizer than this config builds; use a new workdir"
            )
        try:
            if saved is None:
                raise ValueError("its metadata cannot be read")
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
            if int(distributed.to_host(restored.step)) != step:
                raise ValueError(f"holds step {int(restored.step)}")
            return restored, step
        except Exception as error:  # noqa: BLE001 -- any unreadable checkpoint is skipped
            message = (
                f"checkpoint {step} in {ckpt_dir} cannot be restored ({type(error).__name__}: "
                f"{str(error)[:200]}); moving it to {quarantine_dir} and trying an older one"
            )
            logging.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            if jax.process_index() == 0:
                os.makedirs(quarantine_dir, exist_ok=True)
                target = os.path.join(quarantine_dir, f"{step}-{time.time_ns()}")
                shutil.move(os.path.join(ckpt_dir, str(step)), target)
            _sync("quarantine")
            manager.reload()
    return state, None


def _signature(tree: PyTree) -> list[tuple[tuple[int, ...], str]]:
    # Sorted (shape, dtype) of every leaf: independent of how the tree's nodes
    # are stored (a checkpoint's metadata turns NamedTuples into dicts).
    return sorted((tuple(x.shape), np.dtype(x.dtype).str) for x in jax.tree.leaves(tree))


def _saved_signature(path: str) -> list[tuple[tuple[int, ...], str]]:
    with ocp.StandardCheckpointer() as checkpointer:
        return _signature(checkpointer.metadata(path).item_metadata)


def load_checkpoint(workdir: str, step: int | None = None) -> dict[str, Any]:
    """A checkpoint of ``workdir`` as numpy arrays, whatever mesh or processes saved it.

    Args:
      workdir: a run's workdir (checkpoints in ``workdir/checkpoints``).
      step: which step; None: the latest.

    Returns:
      The saved `TrainState` as a nested dict (``step``, ``params``, ``opt_state``,
      ``rng``) of numpy arrays.

    Raises:
      ValueError: if ``workdir`` holds no checkpoint or not that step.
    """
    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    steps = []
    if os.path.isdir(ckpt_dir):
        with ocp.CheckpointManager(ckpt_dir) as manager:
            steps = list(manager.all_steps())
    if not steps or (step is not None and step not in steps):
        raise ValueError(
            f"step={step!r} is not among the checkpoints {sorted(steps)} in {ckpt_dir}"
        )
    path = os.path.join(ckpt_dir, str(max(steps) if step is None else step), "default")
    checkpointer = ocp.StandardCheckpointer()
    # The saved shardings may name devices this process does not have: restore
    # every leaf onto the first local device instead.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata,
    )
    try:
        return jax.device_get(checkpointer.restore(path, target))
    finally:
        checkpointer.close()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Mapping[str, Any]:
    """Trains the model described by ``config``, resuming from ``workdir`` if it holds checkpoints.

    Writes ``workdir/config.json``, ``workdir/metrics.jsonl`` (one JSON object a
    line with ``step``, ``train_loss``, ``train_accuracy``, ``test_loss``,
    ``test_accuracy``, ``sparsity``, ``steps_per_second``) and orbax checkpoints
    in ``workdir/checkpoints`` every ``checkpoint_every_steps`` and at the end.

    Args:
      config: the experiment config (see configs/).
      workdir: output directory; created if missing.

    Returns:
      The last metrics record (a dict).

    Raises:
      NonFiniteLossError: on a NaN or infinite loss, naming the step; the
        checkpoints on disk all hold finite parameters.
      ValueError: on bad config values.
    """
    _check_config(config)
    mesh = make_mesh(config)
    is_chief = jax.process_index() == 0

    dataset = _load_data(config)
    model = make_model(config, dataset.num_classes)
    state, tx, algorithm = create_train_state(config, model, dataset, mesh=mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    skip_nonfinite = config.get("on_nonfinite", "stop") == "skip"
    train_step, eval_step, sparsity_fn = make_step_functions(
        model,
        tx,
        algorithm,
        mesh=mesh,
        state_sharding=state_sharding,
        skip_nonfinite=skip_nonfinite,
    )
    batch_sharding = distributed.batch_sharding(mesh)
    data_size = mesh.shape[distributed.DATA_AXIS]

    def put_eval(x, y):
        # A last partial eval batch the data axis does not divide is replicated instead.
        sharding = batch_sharding if len(x) % data_size == 0 else distributed.replicated(mesh)
        return distributed.host_to_global((x, y), sharding)

    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.get("keep_checkpoints", 3),
            create=True,
            # Temporary directories of saves killed midway are never restored; drop them.
            cleanup_tmp_directories=True,
        ),
    )
    state, latest = _restore_latest(
        manager, state, ckpt_dir, os.path.join(os.path.abspath(workdir), "corrupt_checkpoints")
    )
    if latest is not None:
        logging.info("Resumed from %s at step %d", ckpt_dir, latest)
    # Written only now that the config has built a model, data, optimizer and a state
    # matching the checkpoints: a bad config leaves an existing workdir as it was.
    if is_chief:
        config_json = config.to_json_best_effort(indent=2)
        _write_atomically(os.path.join(workdir, "config.json"), config_json)
    start_step = int(distributed.to_host(state.step))

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if is_chief and start_step == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    elif is_chief and os.path.exists(metrics_path):
        # Drop records written after the checkpoint we resumed from.
        with open(metrics_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start_step]
        _write_atomically(metrics_path, "".join(kept))

    batches = data_lib.batches(
        dataset.x_train,
        dataset.y_train,
        batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
    )
    pending: list[tuple[int, dict]] = []
    record: dict[str, Any] = {}
    bar = tqdm(
        total=config.total_steps,
        initial=start_step,
        disable=not (config.get("progress_bar", True) and is_chief),
        dynamic_ncols=True,
        desc=os.path.basename(os.path.normpath(workdir)),
    )
    last_good = latest
    skipped_total = 0
    tick = time.perf_counter()
    tick_step = start_step

    def check_pending():
        """Mean loss and accuracy since the last check; raises on a non-finite loss."""
        nonlocal skipped_total
        losses, accs, skipped = distributed.to_host(
            (
                jnp.stack([m["loss"] for _, m in pending]),
                jnp.stack([m["accuracy"] for _, m in pending]),
                jnp.stack([m.get("skipped", jnp.int32(0)) for _, m in pending]),
            )
        )
        finite = np.isfinite(losses)
        if skip_nonfinite:
            for i in np.flatnonzero(skipped):
                logging.warning("non-finite loss or gradients at step %d; skipped", pending[i][0])
            skipped_total += int(skipped.sum())
            if not finite.any():
                return float("nan"), float("nan")
            return float(np.mean(losses[finite])), float(np.mean(accs[finite]))
        bad = np.flatnonzero(~finite)
        if bad.size:
            step = pending[bad[0]][0]
            raise NonFiniteLossError(
                f"non-finite loss {losses[bad[0]]} at step {step}; stopping. The last good "
                f"checkpoint (step {last_good}) in {ckpt_dir} is kept."
            )
        return float(np.mean(losses)), float(np.mean(accs))

    try:
        for step in range(start_step, config.total_steps):
            x, y = distributed.host_to_global(next(batches), batch_sharding)
            state, step_metrics = train_step(state, x, y)
            pending.append((step, step_metrics))
            done = step + 1
            is_eval = done % config.eval_every_steps == 0 or done == config.total_steps
            is_ckpt = done % config.checkpoint_every_steps == 0 or done == config.total_steps
            if not (is_eval or is_ckpt or done % config.get("log_every_steps", 100) == 0):
                continue
            train_loss, train_acc = check_pending()
            sparsity = float(distributed.to_host(sparsity_fn(state)))
            bar.set_postfix(
                loss=f"{train_loss:.3f}",
                acc=f"{train_acc:.3f}",
                sparsity=f"{sparsity:.4f}",
                refresh=False,
            )
            bar.update(done - bar.n)
            if is_eval:
                now = time.perf_counter()
                record = {
                    "step": done,
                    "train_loss": train_loss,
                    "train_accuracy": train_acc,
                    **evaluate(eval_step, state, dataset.x_test, dataset.y_test, put=put_eval),
                    "sparsity": sparsity,
                    "steps_per_second": (done - tick_step) / max(now - tick, 1e-9),
                    **{
                        k: float(distributed.to_host(v))
                        for k, v in algorithm.metrics(algo_state_of(state.opt_state)).items()
                    },
                }
                if skip_nonfinite:
                    record["skipped_steps"] = skipped_total
                if is_chief:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                tick, tick_step = time.perf_counter(), done
            pending.clear()
            if is_ckpt:
                if not _all_finite(state.params):
                    raise NonFiniteLossError(
                        f"non-finite parameters after step {done}; stopping. The last good "
                        f"checkpoint (step {last_good}) in {ckpt_dir} is kept."
                    )
                manager.save(done, args=ocp.args.StandardSave(state))
                last_good = done
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
    return record


def _write_atomically(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
