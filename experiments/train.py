"""The training loop: ``train_and_evaluate(config, workdir)`` is the whole run.

It checks the config, builds the mesh, the data (`experiments.data`), the model
(`experiments.models`) and the train state (`experiments.state`, whose optimizer is
`experiments.optim`'s ``masked(optax_chain, algorithm)``: sparsity enters only
there, so the step is the same for dense, pruned and dynamic sparse training),
then steps, evaluates, logs metrics and saves checkpoints (`experiments.checkpoints`),
resuming from the workdir's latest checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

# Imported for its registrations too: `import tensornets` adds spectral_truncation and
# greedy_growth to `sparsejax.algorithms`, which `from_config` below resolves names in.
import tensornets  # noqa: F401
from experiments import block_execution, checkpoints, distributed, nnx_models, optim
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import state as state_lib
from experiments import tensorboard as tensorboard_lib
from sparsejax import algorithms, masks

__all__ = [
    "NonFiniteLossError",
    "make_mesh",
    "train_and_evaluate",
]

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """Training hit NaN or inf (loss, params, optimizer state) or skipped too many steps in a row.

    The checkpoints on disk are all finite; the message names the one a restart resumes from.
    """


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


_NONFINITE_MODES = ("stop", "skip")
# The default of config.max_consecutive_skipped_steps (configs/base.py sets the same).
_MAX_CONSECUTIVE_SKIPS = 20


def _check_config(config: ml_collections.ConfigDict) -> None:
    """A ValueError naming the key for any bad value, before anything is loaded or written."""
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
    max_skips = config.get("max_consecutive_skipped_steps", _MAX_CONSECUTIVE_SKIPS)
    if not isinstance(max_skips, int) or isinstance(max_skips, bool) or max_skips <= 0:
        raise ValueError(
            f"config.max_consecutive_skipped_steps must be a positive integer, got {max_skips!r}"
        )
    data_lib.check_dataset_config(config)
    state_lib.fsdp_min_size(config)
    optim.packs_masks(config)
    # Build the cheap pieces now, so a bad optimizer, sparsity or model value fails
    # before any data is loaded or anything is compiled or written.
    optim.make_optimizer(config, config.total_steps)
    block_execution.execution_of(config)
    algorithm = algorithms.from_config(config.sparsity, config.total_steps)
    nnx_models.check_algorithm(models_lib.make_model(config, 10), algorithm)
    block_execution.check_config(config, algorithm)


@jax.jit
def _finite_flags(leaves: tuple[jax.Array, ...]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _non_finite_leaves(state: state_lib.TrainState) -> list[str]:
    """Names of the float leaves of params and optimizer state holding a NaN or inf."""
    named = [
        (masks.path_name(path), x)
        for path, x in jax.tree_util.tree_flatten_with_path(
            {"params": state.params, "opt_state": state.opt_state}
        )[0]
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not named:
        return []
    finite = distributed.to_host(_finite_flags(tuple(x for _, x in named)))
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def _what_is_kept(last_good: int | None, ckpt_dir: str) -> str:
    """The end of a stop message: which checkpoint a restart resumes from."""
    if last_good is None:
        return f"no checkpoint has been saved yet, so {ckpt_dir} holds none to resume from."
    return f"the last good checkpoint (step {last_good}) in {ckpt_dir} is kept."


def _json_line(record: Mapping[str, Any]) -> str:
    """One strict-JSON line: NaN and infinite values are written as null."""
    clean = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }
    return json.dumps(clean, allow_nan=False) + "\n"


def _parse_record(line: bytes) -> dict[str, Any] | None:
    """A metrics record, or None for a torn, blank or garbage line."""
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and undecodable bytes
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def _rewind_metrics(path: str, start_step: int) -> None:
    """Keeps the records of steps up to ``start_step``; damaged lines are moved aside.

    Records after ``start_step`` were written after the checkpoint the run resumes
    from; the resumed run writes them again. A line that is not a JSON record
    (torn by a crash mid-write, blank, garbage) is not dropped: it goes, verbatim,
    to ``metrics.jsonl.damaged-<time>`` beside the file, with a warning.
    """
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the end of the last complete line
    kept, damaged = [], []
    for line in lines:
        record = _parse_record(line)
        if record is None:
            damaged.append(line + b"\n")
        elif record["step"] <= start_step:
            kept.append(_json_line(record))
    if damaged:
        aside = f"{path}.damaged-{time.time_ns()}"
        checkpoints.write_atomically(aside, b"".join(damaged))
        message = (
            f"{path}: {len(damaged)} damaged line(s) (not JSON records) moved to {aside}; "
            f"the records up to step {start_step}, where the run resumes, are kept"
        )
        logging.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    checkpoints.write_atomically(path, "".join(kept))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Mapping[str, Any]:
    """Trains the model described by ``config``, resuming from ``workdir`` if it holds checkpoints.

    Writes ``workdir/config.json``, ``workdir/metrics.jsonl`` (one strict JSON
    object a line with ``step``, ``train_loss``, ``train_accuracy``, ``test_loss``,
    ``test_accuracy``, ``sparsity``, ``steps_per_second``; a NaN or infinite value
    is written as ``null``) and orbax checkpoints in ``workdir/checkpoints`` every
    ``checkpoint_every_steps`` and at the end. With tensorboardX (or tensorboard)
    installed, the same rows also go to TensorBoard event files in
    ``workdir/tensorboard`` (`experiments.tensorboard`). The workdir is locked for the
    whole run (`checkpoints.lock_workdir`). On resume, metric lines that are not
    JSON records (a line torn by a crash) are moved aside with a warning.

    Every checkpoint holds finite parameters and optimizer state: before each
    save both are checked. With ``on_nonfinite="stop"`` (default) a non-finite
    loss stops the run; with ``"skip"`` such steps leave the state unchanged,
    and more than ``max_consecutive_skipped_steps`` of them in a row (checked
    every ``log_every_steps``) stop it.

    Args:
      config: the experiment config (see configs/).
      workdir: output directory; created if missing. Must not be empty.

    Returns:
      The last metrics record (a dict).

    Raises:
      NonFiniteLossError: on a NaN or infinite loss, non-finite parameters or
        optimizer state, or too many consecutive skipped steps, naming the step
        and the checkpoint a restart resumes from (if any).
      WorkdirLockedError: if another live process uses ``workdir``.
      ValueError: on bad config values or a bad ``workdir`` (empty, or a file),
        before anything is written.
    """
    workdir = checkpoints.check_workdir(workdir)
    _check_config(config)
    mesh = make_mesh(config)
    created = not os.path.exists(workdir)
    try:
        with checkpoints.lock_workdir(workdir, process_index=jax.process_index()):
            return _run(config, workdir, mesh)
    except BaseException:
        if created:
            # A run refused before it wrote anything leaves no empty folder behind.
            try:
                os.rmdir(workdir)
            except OSError:
                pass
        raise


def _run(
    config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh
) -> Mapping[str, Any]:
    """`train_and_evaluate` once the config is checked and the workdir locked."""
    is_chief = jax.process_index() == 0

    dataset = data_lib.load_from_config(config)
    model = models_lib.make_model(config, dataset.num_classes)
    state, tx, algorithm = state_lib.create_train_state(config, model, dataset, mesh=mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    skip_nonfinite = config.get("on_nonfinite", "stop") == "skip"
    train_step, eval_step, sparsity_fn = state_lib.make_step_functions(
        model,
        tx,
        algorithm,
        mesh=mesh,
        state_sharding=state_sharding,
        skip_nonfinite=skip_nonfinite,
        execution=block_execution.execution_of(config),
    )
    batch_sharding = distributed.batch_sharding(mesh)
    data_size = mesh.shape[distributed.DATA_AXIS]

    def put_eval(x, y):
        # A last partial eval batch the data axis does not divide is replicated instead.
        sharding = batch_sharding if len(x) % data_size == 0 else distributed.replicated(mesh)
        return distributed.host_to_global((x, y), sharding)

    ckpt_dir = checkpoints.checkpoint_dir(workdir)
    manager = checkpoints.open_manager(workdir, max_to_keep=config.get("keep_checkpoints", 3))
    state, latest = checkpoints.restore_latest(
        manager,
        state,
        quarantine_dir=os.path.join(os.path.abspath(workdir), "corrupt_checkpoints"),
    )
    if latest is not None:
        logging.info("Resumed from %s at step %d", ckpt_dir, latest)
    # Written only now that the config has built a model, data, optimizer and a state
    # matching the checkpoints: a bad config leaves an existing workdir as it was.
    if is_chief:
        config_json = config.to_json_best_effort(indent=2)
        checkpoints.write_atomically(os.path.join(workdir, "config.json"), config_json)
    start_step = int(distributed.to_host(state.step))

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if is_chief and start_step == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    elif is_chief and os.path.exists(metrics_path):
        _rewind_metrics(metrics_path, start_step)

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
    max_skips = config.get("max_consecutive_skipped_steps", _MAX_CONSECUTIVE_SKIPS)
    skip_run, skip_run_start = 0, None
    tick = time.perf_counter()
    tick_step = start_step
    # Opened last before the loop, so the `finally` below always closes it.
    scalar_writer = tensorboard_lib.open_writer(
        os.path.join(workdir, "tensorboard"), start_step=start_step, enabled=is_chief
    )

    def check_pending():
        """Mean loss and accuracy since the last check; raises on a non-finite loss."""
        nonlocal skipped_total, skip_run, skip_run_start
        losses, accs, skipped = distributed.to_host(
            (
                jnp.stack([m["loss"] for _, m in pending]),
                jnp.stack([m["accuracy"] for _, m in pending]),
                jnp.stack([m.get("skipped", jnp.int32(0)) for _, m in pending]),
            )
        )
        finite = np.isfinite(losses)
        if skip_nonfinite:
            for (step, _), was_skipped in zip(pending, skipped, strict=True):
                if not was_skipped:
                    skip_run = 0
                    continue
                logging.warning("non-finite loss or gradients at step %d; skipped", step)
                skip_run_start = step if skip_run == 0 else skip_run_start
                skip_run += 1
                if skip_run > max_skips:
                    # Skipped steps leave the state as it was: this many in a row means
                    # the run diverged rather than met a few bad batches.
                    raise NonFiniteLossError(
                        f"{skip_run} consecutive steps were skipped (from step {skip_run_start} "
                        f"to {step}), more than config.max_consecutive_skipped_steps="
                        f"{max_skips}; stopping: {_what_is_kept(last_good, ckpt_dir)}"
                    )
            skipped_total += int(skipped.sum())
            if not finite.any():
                return float("nan"), float("nan")
            return float(np.mean(losses[finite])), float(np.mean(accs[finite]))
        bad = np.flatnonzero(~finite)
        if bad.size:
            step = pending[bad[0]][0]
            raise NonFiniteLossError(
                f"non-finite loss {losses[bad[0]]} at step {step}; stopping: "
                f"{_what_is_kept(last_good, ckpt_dir)}"
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
                    **state_lib.evaluate(
                        eval_step, state, dataset.x_test, dataset.y_test, put=put_eval
                    ),
                    "sparsity": sparsity,
                    "steps_per_second": (done - tick_step) / max(now - tick, 1e-9),
                    **{
                        k: float(distributed.to_host(v))
                        for k, v in algorithm.metrics(
                            state_lib.algo_state_of(state.opt_state)
                        ).items()
                    },
                }
                if skip_nonfinite:
                    record["skipped_steps"] = skipped_total
                if is_chief:
                    with open(metrics_path, "a") as f:
                        f.write(_json_line(record))
                    scalar_writer.write(done, record)
                tick, tick_step = time.perf_counter(), done
            pending.clear()
            if is_ckpt:
                # The optimizer state too: a loss that grows large but stays finite can
                # overflow Adam's second moments to inf, which silently freezes weights.
                bad_leaves = _non_finite_leaves(state)
                if bad_leaves:
                    shown = ", ".join(bad_leaves[:4]) + (", ..." if len(bad_leaves) > 4 else "")
                    raise NonFiniteLossError(
                        f"non-finite values after step {done} in {len(bad_leaves)} leaves of "
                        f"the train state ({shown}); not saving them, stopping: "
                        f"{_what_is_kept(last_good, ckpt_dir)}"
                    )
                checkpoints.save(manager, done, state)
                last_good = done
    finally:
        bar.close()
        scalar_writer.close()
        manager.wait_until_finished()
        manager.close()
    return record
