"""Config-driven training: one jitted step, evaluation, metrics, checkpoints, resume.

``train_and_evaluate(config, workdir)`` is the whole run. Sparsity enters only
through the optimizer: ``sparsejax.transforms.masked(optax_chain, algorithm)``,
so the train step is the same for dense, pruned and dynamic sparse training.
"""

from __future__ import annotations

import json
import os
import time
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

from experiments import data as data_lib
from experiments import models as models_lib
from sparsejax import algorithms, masks, transforms

__all__ = [
    "NonFiniteLossError",
    "TrainState",
    "create_train_state",
    "init_state",
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
    if not opt.learning_rate > 0:
        raise ValueError(
            f"config.optimizer.learning_rate must be positive, got {opt.learning_rate!r}"
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
    their masks here, from the calibration batch (GraSP; the paper divides the
    logits by a temperature of 200) or from no data at all (SynFlow).

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
    if masks_tree is None and isinstance(algorithm, algorithms.PruneAtInit):
        x0, y0 = calibration
        temperature = 200.0 if algorithm.score == "grasp" else 1.0
        masks_tree = algorithm.masks_from_model(
            params,
            key=mask_key,
            loss_fn=lambda p: _cross_entropy(model.apply({"params": p}, x0) / temperature, y0),
            apply_fn=lambda q, x: model.apply({"params": q}, x),
            input_shape=x_example.shape[1:],
        )
    tx = transforms.masked(
        make_optimizer(config, config.total_steps), algorithm, key=mask_key, masks=masks_tree
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
    so one transform serves every seed.
    """
    return transforms.masked(make_optimizer(config, config.total_steps), algorithm)


def create_train_state(
    config: ml_collections.ConfigDict, model: Any, dataset: data_lib.Dataset
) -> tuple[TrainState, optax.GradientTransformation, algorithms.Algorithm]:
    """Builds the algorithm, the masked optimizer and the initial state for ``config.seed``.

    Returns:
      (state, tx, algorithm).
    """
    algorithm = algorithms.from_config(config.sparsity, config.total_steps)
    calibration = data_lib.batch_at(
        dataset.x_train, dataset.y_train, batch_size=config.batch_size, seed=config.seed, step=0
    )
    state = jax.jit(lambda key, x, cal: init_state(config, model, algorithm, key, x, cal))(
        jax.random.key(config.seed), jnp.asarray(dataset.x_train[:1]), calibration
    )
    return state, make_tx(config, algorithm), algorithm


def step_functions(model, tx, algorithm):
    """Un-jitted (train_step, eval_step, sparsity) bodies; see `make_step_functions`."""

    def effective(state: TrainState):
        return algorithm.forward_params(state.params, transforms.get_masks(state.opt_state))

    def loss_fn(params, masks_tree, x, y):
        logits = model.apply({"params": algorithm.forward_params(params, masks_tree)}, x)
        return _cross_entropy(logits, y), logits

    def train_step(state: TrainState, x, y):
        masks_tree = transforms.get_masks(state.opt_state)
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, masks_tree, x, y
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        new_state = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, {"loss": loss, "accuracy": accuracy}

    def eval_step(state: TrainState, x, y):
        logits = model.apply({"params": effective(state)}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return loss, correct

    def sparsity(state: TrainState):
        return masks.sparsity_of(effective(state), transforms.get_masks(state.opt_state))

    return train_step, eval_step, sparsity


def make_step_functions(model, tx, algorithm):
    """Jitted (train_step, eval_step, sparsity) for ``model`` trained with ``tx``.

    The model always runs on ``algorithm.forward_params(params, masks)`` (the
    params themselves, except for straight-through algorithms).
    train_step(state, x, y) -> (state, {"loss", "accuracy"}) donates ``state``;
    eval_step(state, x, y) -> (summed loss, number correct);
    sparsity(state) -> fraction of zeros over the masked weights the model uses.
    """
    train_step, eval_step, sparsity = step_functions(model, tx, algorithm)
    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step), jax.jit(sparsity)


def evaluate(eval_step, state: TrainState, x: np.ndarray, y: np.ndarray, batch_size: int = 1000):
    """Mean loss and accuracy of the model in ``state`` over (x, y), in fixed-size batches."""
    total_loss, total_correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        loss, correct = eval_step(
            state, x[start : start + batch_size], y[start : start + batch_size]
        )
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


def _check_config(config: ml_collections.ConfigDict) -> None:
    for key in ("total_steps", "batch_size", "eval_every_steps", "checkpoint_every_steps"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config.{key} must be a positive integer, got {value!r}")


def _all_finite(tree: PyTree) -> bool:
    return bool(
        jax.tree.reduce(lambda a, b: a & b, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree))
    )


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
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    dataset = _load_data(config)
    model = make_model(config, dataset.num_classes)
    state, tx, algorithm = create_train_state(config, model, dataset)
    train_step, eval_step, sparsity_fn = make_step_functions(model, tx, algorithm)

    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.get("keep_checkpoints", 3), create=True
        ),
    )
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        logging.info("Resumed from %s at step %d", ckpt_dir, latest)
    start_step = int(state.step)

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if start_step == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    elif os.path.exists(metrics_path):
        # Drop records written after the checkpoint we resumed from.
        with open(metrics_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start_step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)

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
        disable=not config.get("progress_bar", True),
        dynamic_ncols=True,
        desc=os.path.basename(os.path.normpath(workdir)),
    )
    last_good = latest
    tick = time.perf_counter()
    tick_step = start_step

    def check_pending():
        """Mean loss and accuracy since the last check; raises on a non-finite loss."""
        losses, accs = jax.device_get(
            (
                jnp.stack([m["loss"] for _, m in pending]),
                jnp.stack([m["accuracy"] for _, m in pending]),
            )
        )
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            step = pending[bad[0]][0]
            raise NonFiniteLossError(
                f"non-finite loss {losses[bad[0]]} at step {step}; stopping. The last good "
                f"checkpoint (step {last_good}) in {ckpt_dir} is kept."
            )
        return float(np.mean(losses)), float(np.mean(accs))

    try:
        for step in range(start_step, config.total_steps):
            x, y = next(batches)
            state, step_metrics = train_step(state, x, y)
            pending.append((step, step_metrics))
            done = step + 1
            is_eval = done % config.eval_every_steps == 0 or done == config.total_steps
            is_ckpt = done % config.checkpoint_every_steps == 0 or done == config.total_steps
            if not (is_eval or is_ckpt or done % config.get("log_every_steps", 100) == 0):
                continue
            train_loss, train_acc = check_pending()
            sparsity = float(sparsity_fn(state))
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
                    **evaluate(eval_step, state, dataset.x_test, dataset.y_test),
                    "sparsity": sparsity,
                    "steps_per_second": (done - tick_step) / max(now - tick, 1e-9),
                }
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
